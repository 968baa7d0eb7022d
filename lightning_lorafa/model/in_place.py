"""Behaviour added to a module in place: a subclass of its own class, made at run time and assigned to the
instance's ``__class__`` (how torch's ``fully_shard`` adds its hooks). The instance keeps its attributes,
parameters, state-dict keys and ``isinstance`` checks, and no method is replaced on the instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class InPlaceSubclass:
    """Base of the mixins such subclasses start with (``RecomputedMLP``, ``Int8LinearKeepingNoInput``).

    ``made_by`` is ``(factory, args)``, set on each made class: ``factory(*args)`` makes the class again (the
    factory is cached, so it returns the same class). Pickling (``torch.save(model)``, ``copy.deepcopy``) goes
    through it, since a class made at run time cannot be found by name.
    """

    made_by: tuple[Callable[..., type], tuple[Any, ...]]

    def __reduce_ex__(self, protocol):
        reduced = super().__reduce_ex__(protocol)
        return (_empty_instance, type(self).made_by, *reduced[2:])


def _empty_instance(factory: Callable[..., type], args: tuple[Any, ...]) -> Any:
    """An instance of ``factory(*args)`` with no state yet (unpickling sets it)."""
    cls = factory(*args)
    return cls.__new__(cls)
