"""``LoraFA``: the Lightning callback that turns any fine-tuning LightningModule into LoRA-FA training."""

from __future__ import annotations

import functools
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from lightning_lorafa.attention import set_attention_implementation
from lightning_lorafa.checkpoint import adapter_keys, check_adapter_state
from lightning_lorafa.convert import Targets, apply_lorafa, count_parameters, get_lorafa_config, lorafa_layers
from lightning_lorafa.distributed import (
    check_no_frozen_parameters,
    check_not_sharded,
    check_resume_supported,
    keep_lora_A_out_of_ddp_buffer_sync,
    prepare_for_strategy,
)
from lightning_lorafa.init import check_init_a
from lightning_lorafa.layer import is_quantized
from lightning_lorafa.memory import SavedActivationRecorder
from lightning_lorafa.optim import LoraFAOptimizer, lora_layers_by_parameter
from lightning_lorafa.prepare import keep_dropout_seeds
from lightning_lorafa.quantization import keep_no_quantized_inputs
from lightning_lorafa.recompute import Recompute, apply_recompute, check_recompute, check_recompute_strategy

#: Learning rate used when ``configure_optimizers`` returns None and ``LoraFA(lr=...)`` is not given.
DEFAULT_LR = 1e-4


class LoraFA(pl.Callback):
    """Fine-tune with LoRA-FA: ``Trainer(callbacks=[LoraFA(r=8)])``.

    On ``setup`` the callback converts the module's model (``apply_lorafa``): target ``nn.Linear``
    layers get a frozen A and a trainable B, everything else is frozen except ``modules_to_save``.
    A module whose model has no linear layers yet at ``setup`` (it builds them in ``configure_model``)
    is converted right after that hook; one that shards its model there (FSDP2 ``fully_shard``) calls
    ``convert_before_sharding(self)`` first, and the callback adopts the converted model. Under FSDP1
    (``strategy="fsdp"``) B's gradient is corrected in backward, before FSDP shards it.
    The optimizer that ``configure_optimizers`` returns is replaced by a ``LoraFAOptimizer`` over the
    trainable parameters only (same param groups, lr and weight decay unless given here; LR schedulers
    are re-bound to it); if it returns None, the callback supplies one. Checkpoints then hold only the
    adapter (A, B, modules_to_save) and the optimizer state; ``Trainer.fit(ckpt_path=...)`` restores them
    into the freshly loaded base model.

    Args:
        r, alpha, dropout, target_modules, exclude, modules_to_save, seed, use_rslora, init_a: see ``apply_lorafa``.
        lr, weight_decay, betas, eps: optimizer settings; ``None`` takes them from the module's optimizer.
        gradient_correction: apply the closed-form correction of B's gradient (default True).
        model_attr: attribute of the LightningModule holding the model to convert. Default: ``model``
            when the module has such an ``nn.Module`` attribute, else the LightningModule itself.
        adapter_only_checkpoints: save only the adapter in Lightning checkpoints (default True).
        recompute_dropout: make the model's own dropouts (hidden and attention probabilities) keep a seed
            instead of a mask, like the LoRA-FA layers do (``replace_dropout``; default True).
        recompute: ``"none"`` (default), ``"mlp"`` (each transformer block's MLP keeps only its input and is
            recomputed in backward) or ``"block"`` (whole blocks are checkpointed); see ``apply_recompute``.
        attn_implementation: ``"auto"`` (FlashAttention-2 where installed and supported, else SDPA, else
            eager), an explicit ``"flash_attention_2"``/``"sdpa"``/``"eager"``, or None to leave it alone.
        report_memory: log the saved-activation bytes of the first training step by op, and at the end of
            training the tokens/s of the timed steps and, on CUDA, the peak allocated memory.
    """

    def __init__(
        self,
        r: int = 8,
        alpha: float = 32,
        dropout: float = 0.0,
        target_modules: Targets = "all-linear",
        exclude: Targets = None,
        modules_to_save: list[str] | None = None,
        seed: int = 0,
        use_rslora: bool = False,
        init_a: str = "kaiming",
        lr: float | None = None,
        weight_decay: float | None = None,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        gradient_correction: bool = True,
        model_attr: str | None = None,
        adapter_only_checkpoints: bool = True,
        recompute_dropout: bool = True,
        recompute: Recompute = "none",
        attn_implementation: str | None = "auto",
        report_memory: bool = False,
    ) -> None:
        check_init_a(init_a)
        self.lora_kwargs = {
            "r": r,
            "alpha": alpha,
            "dropout": dropout,
            "target_modules": target_modules,
            "exclude": exclude,
            "modules_to_save": modules_to_save,
            "seed": seed,
            "use_rslora": use_rslora,
            "init_a": init_a,
        }
        self.optimizer_overrides = {"lr": lr, "weight_decay": weight_decay, "betas": betas, "eps": eps}
        self.gradient_correction = gradient_correction
        self.model_attr = model_attr
        self.adapter_only_checkpoints = adapter_only_checkpoints
        self.recompute_dropout = recompute_dropout
        check_recompute(recompute)
        self.recompute = recompute
        self._recomputed: set[int] = set()
        self.attn_implementation = attn_implementation
        self.report_memory = report_memory
        self._wrapped: set[int] = set()
        self._hooked: set[int] = set()
        self._recorder: SavedActivationRecorder | None = None
        self._timing: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(r=self.lora_kwargs["r"], model_attr=self.model_attr)

    # ----------------------------------------------------------------- conversion
    def lorafa_model(self, pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
        """The model this callback converts and its state-dict prefix inside ``pl_module``."""
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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if id(pl_module) not in self._wrapped:
            self._wrapped.add(id(pl_module))
            pl_module.configure_optimizers = self._wrap_configure_optimizers(pl_module)
            if is_overridden("configure_model", pl_module):
                pl_module.configure_model = self._wrap_configure_model(pl_module)
        if not is_overridden("configure_model", pl_module) or self._model_is_built(pl_module):
            self.convert(pl_module)
        check_resume_supported(trainer, self.adapter_only_checkpoints)

    def _model_is_built(self, pl_module: pl.LightningModule) -> bool:
        """Whether the model to convert exists already (has linear layers) before ``configure_model`` runs."""
        if self.model_attr is not None and not isinstance(getattr(pl_module, self.model_attr, None), nn.Module):
            return False
        model, _ = self.lorafa_model(pl_module)
        return any(isinstance(module, nn.Linear) for module in model.modules())

    def _wrap_configure_model(self, pl_module: pl.LightningModule):
        original = pl_module.configure_model

        @functools.wraps(original)
        def configure_model() -> None:
            original()
            self.convert(pl_module)

        return configure_model

    def convert(self, pl_module: pl.LightningModule) -> list[str]:
        """Convert the module's model (once; a model converted already is adopted as it is) and prepare it for
        adapter-only checkpoint loading and for the trainer's strategy.

        Raises:
            RuntimeError: the model is unconverted but already sharded (FSDP1 or FSDP2).
        """
        model, prefix = self.lorafa_model(pl_module)
        if getattr(model, "lorafa_config", None) is None:
            check_not_sharded(model)
            names = apply_lorafa(model, **self.lora_kwargs)
            self._log_conversion(pl_module, model, names)
            if any(is_quantized(module) for module in model.modules()):
                keep_no_quantized_inputs(model)  # bitsandbytes' int8 matmul would keep each layer's input x
            if self.attn_implementation is not None:
                chosen = set_attention_implementation(
                    model, self.attn_implementation, pl_module.trainer.strategy.root_device
                )
                rank_zero_info(f"LoRA-FA: attention implementation {chosen} (asked for {self.attn_implementation!r}).")
            if self.recompute_dropout:
                changed = keep_dropout_seeds(model)
                rank_zero_info(f"LoRA-FA: {len(changed)} dropouts keep a seed instead of a mask (recompute_dropout).")
        else:
            names = get_lorafa_config(model).target_modules
        if id(pl_module) not in self._hooked:
            self._hooked.add(id(pl_module))
            pl_module.register_load_state_dict_pre_hook(self._load_state_dict_pre_hook)
        prepare_for_strategy(model, pl_module.trainer.strategy, self.gradient_correction)
        if isinstance(pl_module.trainer.strategy, DDPStrategy):
            keep_lora_A_out_of_ddp_buffer_sync(pl_module)
        if self.recompute != "none" and id(model) not in self._recomputed:
            check_recompute_strategy(self.recompute, pl_module.trainer.strategy)
            regions = apply_recompute(model, self.recompute)
            self._recomputed.add(id(model))
            rank_zero_info(f"LoRA-FA: recompute={self.recompute!r}: {len(regions)} regions recomputed in backward.")
        return names

    def _log_conversion(self, pl_module: pl.LightningModule, model: nn.Module, names: list[str]) -> None:
        config = get_lorafa_config(model)
        trainable, total = count_parameters(pl_module)
        b_params = sum(layer.lora_B.numel() for layer in lorafa_layers(model).values())
        scaling = next(iter(lorafa_layers(model).values())).scaling
        rank_zero_info(
            f"LoRA-FA: converted {len(names)} linear layers of {type(model).__name__} "
            f"(r={config.r}, alpha={config.alpha}, scaling={scaling:g}, dropout={config.dropout}): "
            f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names}))}"
            + (f"; fully trained: {', '.join(config.modules_to_save)}" if config.modules_to_save else "")
        )
        rank_zero_info(
            f"LoRA-FA: trainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%): "
            f"B = r * sum(d_out) = {b_params:,}, modules_to_save = {trainable - b_params:,}"
        )

    # ----------------------------------------------------------------- optimizer
    def _wrap_configure_optimizers(self, pl_module: pl.LightningModule):
        original = pl_module.configure_optimizers

        @functools.wraps(original)
        def configure_optimizers() -> Any:
            return self.replace_optimizers(pl_module, original())

        return configure_optimizers

    def replace_optimizers(self, pl_module: pl.LightningModule, result: Any) -> Any:
        """Return ``result`` (any ``configure_optimizers`` return shape) with each optimizer replaced by a
        ``LoraFAOptimizer`` over its trainable parameters and each LR scheduler re-bound to the replacement."""
        model, _ = self.lorafa_model(pl_module)
        lora_layers = lora_layers_by_parameter(model)
        if not lora_layers:
            raise RuntimeError("LoraFA: the model has no LoRA-FA layers when configure_optimizers runs.")
        if result is None:
            params = [p for p in pl_module.parameters() if p.requires_grad]
            lr = self.optimizer_overrides["lr"] or DEFAULT_LR
            optimizer = self._build(params_groups=[{"params": params, "lr": lr}], lora_layers=lora_layers)
            rank_zero_info(f"LoRA-FA: configure_optimizers returned None; using {self._describe(optimizer)}.")
            return optimizer
        replaced: dict[int, LoraFAOptimizer] = {}

        def swap_optimizer(old: torch.optim.Optimizer) -> LoraFAOptimizer:
            if id(old) not in replaced:
                replaced[id(old)] = self._replace(old, lora_layers)
                rank_zero_info(f"LoRA-FA: replaced {type(old).__name__} by {self._describe(replaced[id(old)])}.")
            return replaced[id(old)]

        def swap(obj: Any) -> Any:
            if isinstance(obj, LoraFAOptimizer):
                check_no_frozen_parameters(obj, pl_module)
                return obj
            if isinstance(obj, torch.optim.Optimizer):
                return swap_optimizer(obj)
            if isinstance(obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)):
                _rebind_scheduler(obj, swap(obj.optimizer))
                return obj
            if isinstance(obj, dict):
                return {key: swap(value) for key, value in obj.items()}
            if isinstance(obj, (list, tuple)):
                return type(obj)(swap(value) for value in obj)
            return obj

        return swap(result)

    def _replace(self, old: torch.optim.Optimizer, lora_layers: dict) -> LoraFAOptimizer:
        ours = {"lr", "betas", "eps", "weight_decay"}
        dropped = set(old.defaults) - ours  # e.g. amsgrad, foreach, momentum: not AdamW-HF settings
        groups = []
        for group in old.param_groups:
            new = {key: value for key, value in group.items() if key != "params" and key not in dropped}
            new["params"] = [p for p in group["params"] if p.requires_grad]
            lr = self.optimizer_overrides["lr"]
            if lr is not None:
                base = new.get("initial_lr", new["lr"])
                new["lr"] = lr * (new["lr"] / base if base else 1.0)
                if "initial_lr" in new:
                    new["initial_lr"] = lr
            new.update({k: v for k, v in self.optimizer_overrides.items() if v is not None and k != "lr"})
            groups.append(new)
        if not any(group["params"] for group in groups):
            raise ValueError(
                f"The {type(old).__name__} from configure_optimizers holds none of the LoRA-FA trainable parameters. "
                "Build it over self.parameters() (the callback keeps only the trainable ones), or return None."
            )
        return self._build(groups, lora_layers)

    def _build(self, params_groups: list[dict], lora_layers: dict) -> LoraFAOptimizer:
        overrides = {k: v for k, v in self.optimizer_overrides.items() if v is not None}
        return LoraFAOptimizer(
            params_groups, lora_layers=lora_layers, gradient_correction=self.gradient_correction, **overrides
        )

    @staticmethod
    def _describe(optimizer: LoraFAOptimizer) -> str:
        tensors = sum(len(g["params"]) for g in optimizer.param_groups)
        lrs = sorted({g.get("initial_lr", g["lr"]) for g in optimizer.param_groups})  # before any warm-up
        wds = sorted({g["weight_decay"] for g in optimizer.param_groups})
        return (
            f"LoraFAOptimizer over {tensors} trainable tensors (lr={lrs}, weight_decay={wds}, "
            f"gradient_correction={optimizer.defaults['gradient_correction']})"
        )

    # ----------------------------------------------------------------- memory report
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if not self.report_memory:
            return
        if not self._timing:
            self._recorder = SavedActivationRecorder(pl_module).__enter__()
            self._timing = {"steps": 0, "tokens": 0, "start": 0.0}
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
        elif self._timing["steps"] == 0:  # time from the second step on: the first one warms up
            _synchronize()
            self._timing["start"] = time.perf_counter()
        if self._timing["start"]:
            self._timing["steps"] += 1
            self._timing["tokens"] += _count_tokens(batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            rank_zero_info(f"LoRA-FA: saved for backward in the first training step:\n{self._recorder.report()}")
            self._recorder = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.report_memory or not self._timing.get("start"):
            return
        _synchronize()
        seconds = time.perf_counter() - self._timing["start"]
        message = f"LoRA-FA: {self._timing['steps']} timed steps, {self._timing['tokens'] / seconds:,.0f} tokens/s"
        if torch.cuda.is_available():
            message += f", peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        rank_zero_info(message)

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        model, prefix = self.lorafa_model(pl_module)
        if not self.adapter_only_checkpoints or getattr(model, "lorafa_config", None) is None:
            return
        keep = set(adapter_keys(model, prefix))
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def state_dict(self) -> dict[str, Any]:
        """The settings, and the RNG states that draw dropout masks (so a resumed run continues exactly)."""
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"lora": dict(self.lora_kwargs), "adapter_only_checkpoints": self.adapter_only_checkpoints, "rng": rng}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        rng = state_dict.get("rng", {})
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _load_state_dict_pre_hook(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Before ``pl_module.load_state_dict``: check the adapter tensors of the checkpoint (names, shapes,
        rank) and fill in the frozen base tensors that an adapter-only checkpoint leaves out."""
        model, model_prefix = self.lorafa_model(module)
        own = module.state_dict(prefix=prefix, keep_vars=True)
        expected = {key: own[key] for key in adapter_keys(model, prefix + model_prefix)}
        given = {
            key: value for key, value in state_dict.items() if key in expected or key.endswith((".lora_A", ".lora_B"))
        }
        check_adapter_state(expected, given, "The checkpoint", get_lorafa_config(model).r)
        for key, value in own.items():
            state_dict.setdefault(key, value.detach())


def _rebind_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Point an LR scheduler built over the user's optimizer at the replacement optimizer."""
    scheduler.optimizer = optimizer
    if hasattr(scheduler, "base_lrs"):
        scheduler.base_lrs = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    _track_step_calls(optimizer)


def _track_step_calls(optimizer: torch.optim.Optimizer) -> None:
    """Mark ``optimizer.step`` the way ``torch.optim.lr_scheduler`` does when it is built over an optimizer,
    so that it knows ``optimizer.step()`` ran before ``scheduler.step()``."""
    if hasattr(optimizer.step, "_wrapped_by_lr_sched"):
        return
    step = optimizer.step

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        optimizer._opt_called = True
        return step(*args, **kwargs)

    wrapper._wrapped_by_lr_sched = True
    optimizer.step = wrapper


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _count_tokens(batch: Any) -> int:
    """Tokens in a batch: ``input_ids`` of a mapping, or the first tensor of a sequence (its element count)."""
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel()
    return 0
