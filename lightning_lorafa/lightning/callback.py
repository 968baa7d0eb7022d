"""``LoraFA``: the Lightning callback that turns any fine-tuning LightningModule into LoRA-FA training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_lorafa import _compat
from lightning_lorafa.lightning.checkpoints import (
    fill_frozen_tensors,
    keep_adapter_only,
    legacy_optimizer_message,
    wrote_legacy_optimizer_state,
)
from lightning_lorafa.lightning.memory_report import MemoryReport
from lightning_lorafa.lightning.strategies import (
    check_not_sharded,
    check_resume_supported,
    keep_lora_A_out_of_ddp_buffer_sync,
    prepare_for_strategy,
)
from lightning_lorafa.model.adapter_state import rng_state, set_rng_state
from lightning_lorafa.model.convert import get_lorafa_config, prepare_model
from lightning_lorafa.model.optim import (
    LoraFAOptimizer,
    attach_gradient_correction,
    keep_trainable_only,
    lora_layers_by_parameter,
    warn_adapters_without_gradient,
)
from lightning_lorafa.model.recompute import check_recompute_strategy
from lightning_lorafa.settings import LoraFASettings, _check_bool, _help

#: Learning rate of the optimizer the callback supplies when ``configure_optimizers`` returns None.
DEFAULT_LR = 1e-4


@dataclass(kw_only=True, eq=False)
class LoraFA(LoraFASettings, pl.Callback):
    """Fine-tune with LoRA-FA: ``Trainer(callbacks=[LoraFA(r=8)])``.

    The arguments are the fields of ``LoraFASettings`` (``r``, ``alpha``, ``dropout``, ``target_modules``,
    ``exclude``, ``modules_to_save``, ``seed``, ``use_rslora``, ``init_a``, ``gradient_correction``,
    ``recompute_dropout``, ``attn_implementation``, ``recompute``; see ``lightning_lorafa.settings``) and the
    callback's own ``lr``, ``model_attr``, ``adapter_only_checkpoints`` and ``report_memory`` below.

    - ``setup``: prepares the module's model with ``prepare_model`` (conversion: frozen W and A, trainable B;
      the new task head trained fully; attention; seed-kept dropouts; recomputation), once. A module that builds
      its model in ``configure_model`` calls ``lightning_lorafa.convert_before_sharding(self)`` at its end.
    - ``on_fit_start``: keeps the optimizers ``configure_optimizers`` returned, with their class, settings and LR
      schedulers, drops the frozen parameters from their param groups (with a log line) and corrects B's
      gradient before each of their steps (after gradient clipping). If it returned None, the callback supplies a
      ``LoraFAOptimizer`` (lr ``lr``, default 1e-4).
    - Checkpoints hold only the adapter (A, B, ``modules_to_save``), the optimizer state and the RNG state;
      ``Trainer.fit(ckpt_path=...)`` restores them into the freshly loaded base model, and
      ``lightning_lorafa.load_from_checkpoint(MyModule, path)`` rebuilds a trained module from one.

    Raises ``TypeError``/``ValueError`` naming the argument for bad settings, when built.
    """

    lr: float | None = _help(
        "Learning rate of the LoraFAOptimizer supplied when configure_optimizers returns None (default 1e-4). "
        "Your own optimizer keeps its learning rate.",
        default=None,
    )
    model_attr: str | None = _help(
        "Attribute of the LightningModule holding the model to convert. Default: 'model' when the module has such "
        "an nn.Module attribute, else the LightningModule itself.",
        default=None,
    )
    adapter_only_checkpoints: bool = _help(
        "Save only the adapter (A, B, modules_to_save) in Lightning checkpoints.", default=True
    )
    report_memory: bool = _help(
        "Log the saved-for-backward bytes of the first training step by op, and at the end the tokens/s of the "
        "timed steps and, on CUDA, the peak allocated memory.",
        default=False,
    )

    # A callback is one object in a Trainer: equal only to itself, hashable (settings compare by value).
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __post_init__(self) -> None:
        super().__post_init__()
        self._hooked_modules: set[int] = set()
        self._pending: set[int] = set()
        self._corrections: dict[int, RemovableHandle] = {}
        self._config: dict[str, Any] | None = None
        self._legacy_optimizer_state = False
        self._unused_checked: set[int] | None = None
        self._memory_report = MemoryReport() if self.report_memory else None

    def _check(self) -> None:
        super()._check()
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, int | float) or self.lr <= 0):
            raise ValueError(f"LoraFA(lr={self.lr!r}): lr must be a positive number, or None.")
        if self.model_attr is not None and (not isinstance(self.model_attr, str) or not self.model_attr):
            raise TypeError(f"LoraFA(model_attr={self.model_attr!r}): model_attr must be an attribute name, or None.")
        _check_bool("LoraFA", "adapter_only_checkpoints", self.adapter_only_checkpoints)
        _check_bool("LoraFA", "report_memory", self.report_memory)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(r=self.r, model_attr=self.model_attr)

    # ----------------------------------------------------------------- conversion
    def lorafa_model(self, pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
        """The model this callback converts and its state-dict prefix inside ``pl_module``.

        Raises:
            ValueError: ``model_attr`` names no ``nn.Module`` attribute of the module.
        """
        if self.model_attr is not None:
            model = getattr(pl_module, self.model_attr, None)
            if not isinstance(model, nn.Module):
                raise ValueError(
                    f"LoraFA(model_attr={self.model_attr!r}): {type(pl_module).__name__} has no nn.Module attribute "
                    f"{self.model_attr!r} (set it in __init__ or configure_model, or pass another model_attr)."
                )
            return model, self.model_attr + "."
        model = getattr(pl_module, "model", None)
        if isinstance(model, nn.Module):
            return model, "model."
        return pl_module, ""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Prepare the module's model (``prepare_model``; a model converted already with the same settings is used
        as it is) and set it up for the trainer's strategy; a model built in ``configure_model`` waits for
        ``convert_before_sharding``, which calls this hook again.

        Raises:
            RuntimeError: the model is unconverted but already sharded (FSDP1 or FSDP2).
            ValueError: the model is converted already with other settings (both named), bad settings, or no model
                to convert.
        """
        if id(pl_module) not in self._hooked_modules:
            self._hooked_modules.add(id(pl_module))
            pl_module.register_load_state_dict_pre_hook(self._load_state_dict_pre_hook)
        check_resume_supported(trainer, self.adapter_only_checkpoints)
        if not self._model_is_built(pl_module):
            if is_overridden("configure_model", pl_module):
                self._pending.add(id(pl_module))
                return
            self.lorafa_model(pl_module)  # names a missing model_attr
            raise ValueError(
                f"LoraFA: {type(pl_module).__name__} has no model to convert at the callback's setup hook, which "
                "Lightning runs before LightningModule.setup, so a model built in setup() does not exist yet. Build "
                "it in __init__, or in configure_model (which Lightning runs after every setup hook) ending with "
                "lightning_lorafa.convert_before_sharding(self)."
            )
        model, _ = self.lorafa_model(pl_module)
        if getattr(model, "lorafa_config", None) is None:
            check_not_sharded(model)
        done = prepare_model(model, self, device=trainer.strategy.root_device)
        if self._config is None or not done.adopted:
            for line in done.summary(model):
                rank_zero_info(line)
        self._config = get_lorafa_config(model).to_dict()
        prepare_for_strategy(model, trainer.strategy, self.gradient_correction)
        if isinstance(trainer.strategy, DDPStrategy):
            keep_lora_A_out_of_ddp_buffer_sync(pl_module)
        check_recompute_strategy(self.recompute, trainer.strategy)
        self._pending.discard(id(pl_module))

    def _model_is_built(self, pl_module: pl.LightningModule) -> bool:
        """Whether the model to convert exists (has parameters) at ``setup``, before ``configure_model`` runs."""
        if self.model_attr is not None and not isinstance(getattr(pl_module, self.model_attr, None), nn.Module):
            return False
        model, _ = self.lorafa_model(pl_module)
        return any(True for _ in model.parameters())

    def _require_converted(self, pl_module: pl.LightningModule) -> None:
        if id(pl_module) in self._pending:
            raise RuntimeError(
                f"LoraFA: {type(pl_module).__name__} builds its model in configure_model, and a callback cannot run "
                "after that hook. Call lightning_lorafa.convert_before_sharding(self) at the end of configure_model "
                "(before any fully_shard), or build the model in __init__."
            )

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_converted(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_converted(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._require_converted(pl_module)

    # ----------------------------------------------------------------- optimizers
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Keep the user's optimizers: drop their frozen parameters and correct B's gradient before each step."""
        self._require_converted(pl_module)
        model, _ = self.lorafa_model(pl_module)
        # optimizers checked for B's without a gradient; None: not checked (sharded strategies spread B's gradient)
        sharded = isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))
        self._unused_checked = None if sharded else set()
        optimizers = trainer.optimizers
        if not optimizers or all(_compat.is_placeholder_optimizer(opt) for opt in optimizers):
            params = [p for p in pl_module.parameters() if p.requires_grad]
            lr = self.lr or DEFAULT_LR
            optimizer = LoraFAOptimizer(
                [{"params": params, "lr": lr}],
                lora_layers=lora_layers_by_parameter(model),
                gradient_correction=self.gradient_correction,
            )
            trainer.optimizers = [optimizer]
            rank_zero_info(
                f"LoRA-FA: configure_optimizers returned None; training with LoraFAOptimizer(lr={lr}) over "
                f"{len(params)} trainable tensors."
            )
            return
        if self.lr is not None:
            rank_zero_warn(
                f"LoraFA(lr={self.lr}) applies only when configure_optimizers returns None; your "
                f"{', '.join(type(opt).__name__ for opt in optimizers)} keeps its own learning rate."
            )
        if self._legacy_optimizer_state and not all(isinstance(opt, LoraFAOptimizer) for opt in optimizers):
            raise ValueError(legacy_optimizer_message(optimizers))
        keep_trainable_only(optimizers, pl_module)
        for optimizer in optimizers:
            if self.gradient_correction and not isinstance(optimizer, LoraFAOptimizer):
                if id(optimizer) not in self._corrections:
                    self._corrections[id(optimizer)] = attach_gradient_correction(optimizer, model, check_unused=False)
                    rank_zero_info(
                        f"LoRA-FA: {type(optimizer).__name__} keeps its settings and LR schedule; B's gradient is "
                        "corrected before each of its steps (after gradient clipping)."
                    )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """At each optimizer's first step: warn by name about the adapters it holds whose B got no gradient (they
        take no part in the loss), before DDP fails on them at the next step."""
        optimizer = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer's own
        if self._unused_checked is not None and id(optimizer) not in self._unused_checked:
            self._unused_checked.add(id(optimizer))
            warn_adapters_without_gradient(self.lorafa_model(pl_module)[0], [optimizer])

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            for handle in self._corrections.values():
                handle.remove()
            self._corrections.clear()

    # ----------------------------------------------------------------- memory report (report_memory=True)
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._memory_report is not None:
            self._memory_report.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._memory_report is not None:
            self._memory_report.on_before_backward(trainer, pl_module, loss)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._memory_report is not None:
            self._memory_report.on_train_end(trainer, pl_module)

    # ----------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        model, _ = self.lorafa_model(pl_module)
        if self.adapter_only_checkpoints and getattr(model, "lorafa_config", None) is not None:
            checkpoint["state_dict"] = keep_adapter_only(checkpoint["state_dict"], pl_module)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._legacy_optimizer_state = wrote_legacy_optimizer_state(checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The settings, the converted layers, and the RNG states that draw dropout masks (so a resumed run
        continues exactly)."""
        state = {
            "lora": self.adapter_kwargs(),
            "adapter_only_checkpoints": self.adapter_only_checkpoints,
            "rng": rng_state(),
        }
        if self._config is not None:
            state["config"] = dict(self._config)
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_rng_state(state_dict.get("rng", {}))

    def _load_state_dict_pre_hook(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Before ``pl_module.load_state_dict``: check the adapter tensors of the checkpoint (names, shapes,
        rank) and fill in the frozen base tensors that an adapter-only checkpoint leaves out."""
        if getattr(self.lorafa_model(module)[0], "lorafa_config", None) is not None:
            fill_frozen_tensors(module, state_dict, prefix)
