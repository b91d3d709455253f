"""The distributed strategy `accelerate launch` chose, and what it changes for the training loop.

`accelerate launch --config_file configs/accelerate/<name>.yaml train.py ...` picks the
strategy (DDP, DeepSpeed ZeRO-1/2/3, FSDP); the run config still decides batch size,
gradient accumulation, clipping and precision. This module is the one place that knows the
differences, so the loop stays one loop:

- DeepSpeed owns the optimizer step: `accelerator.backward` runs `engine.step()` at the
  accumulation boundary, clips by its own config and divides the loss by its own accumulation
  count. We write batch size, accumulation and clipping into DeepSpeed's config from the run
  config before `prepare`, so both agree.
- DeepSpeed in accelerate takes one model and one optimizer per plugin. Methods with several
  optimizers (the GANs, IntroVAE, the two VQ-VAE2 priors) are refused at start-up with one
  line: accelerate's multi-plugin DeepSpeed is marked experimental, and these models are small
  enough (≤ ~100 M parameters) that optimizer-state sharding saves little next to activation
  memory; they run under DDP (+ activation checkpointing, bf16) or FSDP instead.
- Under DeepSpeed mixed precision the module itself is cast to bf16/fp16 and accelerate's
  autocast is off; we autocast ourselves so fp32 inputs and fp32-only ops (norms, quantizer
  distances) still work.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType

from facegen_dist.errors import ConfigError


def _allow_deepspeed_without_transformers() -> None:
    """accelerate (1.15) imports transformers whenever a DeepSpeed plugin is selected, only to register a
    weak reference that transformers' from_pretrained uses for ZeRO-3 init. We never load transformers
    models, so without transformers installed that registration is skipped instead of crashing."""
    import importlib.util

    if importlib.util.find_spec("transformers") is not None:
        return
    from accelerate.utils.dataclasses import DeepSpeedPlugin

    def set_deepspeed_weakref(plugin):
        if plugin.zero3_init_flag:
            raise ConfigError("zero3_init_flag: true needs the transformers package; set zero3_init_flag: false in the accelerate config")

    DeepSpeedPlugin.set_deepspeed_weakref = set_deepspeed_weakref


def build_accelerator(cfg) -> Accelerator:
    import os

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        _allow_deepspeed_without_transformers()
    kwargs = {"timeout": timedelta(minutes=60)}  # long: the first process of a node may render the embedded set while others wait
    if not torch.cuda.is_available():
        kwargs["backend"] = "gloo"  # DeepSpeed's CPU accelerator would ask for oneCCL otherwise
    return Accelerator(
        mixed_precision=None if cfg.train.precision == "auto" else cfg.train.precision,
        kwargs_handlers=[InitProcessGroupKwargs(**kwargs)],
    )


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int | None:
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else None


def strategy_name(accelerator: Accelerator) -> str:
    """ddp, deepspeed-zero2, fsdp, ... (single: one process, nothing wrapped)."""
    if is_deepspeed(accelerator):
        plugin = accelerator.state.deepspeed_plugin
        offload = plugin.offload_optimizer_device not in (None, "none") or plugin.offload_param_device not in (None, "none")
        return f"deepspeed-zero{plugin.zero_stage}{'-offload' if offload else ''}"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_supported(accelerator: Accelerator, method, model_name: str) -> None:
    """One-line ConfigError for a method the chosen strategy cannot run (raised before any module is wrapped)."""
    if not is_deepspeed(accelerator):
        return
    phases = method.phases()
    if len(phases) > 1 or len(phases[0].modules) > 1:
        raise ConfigError(
            f"model.name={model_name}: {len(phases)} optimizers ({', '.join(p.name for p in phases)}); DeepSpeed through accelerate "
            f"runs one model with one optimizer: use configs/accelerate/ddp.yaml or fsdp.yaml for this method (README: strategy table)"
        )
    if zero_stage(accelerator) == 3 and method.ema_modules():
        raise ConfigError(
            f"model.name={model_name}: ZeRO-3 partitions the parameters, and this method keeps an EMA copy of them; "
            f"use ds_zero2.yaml (or train.ema_beta with ZeRO-1/2)"
        )


def configure_deepspeed(accelerator: Accelerator, cfg) -> None:
    """Write the run config's batch, accumulation and clipping into DeepSpeed's config before prepare()."""
    if not is_deepspeed(accelerator):
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds_config["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds_config["train_batch_size"] = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    ds_config["gradient_clipping"] = float(cfg.train.grad_clip) if cfg.train.grad_clip > 0 else 0.0
    ds_config.setdefault("steps_per_print", 10**9)  # our logger reports; DeepSpeed's own lines would interleave
    ds_config.setdefault("wall_clock_breakdown", False)


def autocast(accelerator: Accelerator):
    """The forward pass's autocast: accelerate's, or under DeepSpeed mixed precision our own (see module docstring)."""
    if is_deepspeed(accelerator) and accelerator.mixed_precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=accelerator.device.type, dtype=dtype)
    return accelerator.autocast()


def deepspeed_weights_for_inference(accelerator: Accelerator, modules: dict[str, torch.nn.Module]) -> list[dict[str, torch.Tensor]] | None:
    """Full state dicts of the modules (gathered under ZeRO-3; every rank must call); None outside DeepSpeed,
    where save_state already writes model.safetensors."""
    if not is_deepspeed(accelerator):
        return None
    return [accelerator.get_state_dict(module) for module in modules.values()]
