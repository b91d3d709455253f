"""The distributed strategy `accelerate launch` chose, and what it changes for the training loop.

`accelerate launch --config_file configs/accelerate/<name>.yaml train.py ...` picks the strategy (DDP,
DeepSpeed ZeRO-1/2/3, FSDP); the run config still decides batch size, gradient accumulation, clipping and
precision. This module is the one place that knows the differences, so the loop stays one loop.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from facegen_dist.accelerator import make_accelerator
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
            raise ConfigError(
                "zero3_init_flag: true needs the transformers package; set zero3_init_flag: false in the accelerate config"
            )

    DeepSpeedPlugin.set_deepspeed_weakref = set_deepspeed_weakref


def build_accelerator(cfg) -> Accelerator:
    backend = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        _allow_deepspeed_without_transformers()
        if not torch.cuda.is_available():
            backend = "gloo"  # DeepSpeed's CPU accelerator would ask for oneCCL otherwise
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if cfg.train.precision not in ("auto", launcher_precision) and launcher_precision != "no":
        raise ConfigError(
            f"train.precision={cfg.train.precision} but the launcher asked for --mixed_precision {launcher_precision}: "
            f"drop one, or set train.precision=auto to follow the launcher"
        )
    accelerator = make_accelerator(
        backend, mixed_precision=None if cfg.train.precision == "auto" else cfg.train.precision
    )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and not is_deepspeed(accelerator):
        # accelerate (1.15) drops DeepSpeed silently when ACCELERATE_USE_CPU=true is set as well.
        raise ConfigError(
            "the accelerate config asks for DeepSpeed but accelerate set up "
            f"{accelerator.distributed_type.value.lower()} (ACCELERATE_USE_CPU=true drops DeepSpeed): unset ACCELERATE_USE_CPU"
        )
    launched = int(os.environ.get("WORLD_SIZE") or accelerator.num_processes)  # what torchrun/accelerate launch started
    if launched != accelerator.num_processes or (launched > 1 and accelerator.distributed_type == DistributedType.NO):
        # E.g. fsdp.yaml without a GPU: accelerate sets up no process group for the processes the launcher
        # started, and each would train its own model into the same folder.
        raise ConfigError(
            f"the launcher started {launched} processes but accelerate set up {accelerator.num_processes} with no distributed strategy "
            f"(accelerate's FSDP needs GPUs): use configs/accelerate/ddp.yaml or a ds_zero*.yaml config here"
        )
    return accelerator


def is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def zero_stage(accelerator: Accelerator) -> int | None:
    return accelerator.state.deepspeed_plugin.zero_stage if is_deepspeed(accelerator) else None


def strategy_name(accelerator: Accelerator) -> str:
    """ddp, deepspeed-zero2, fsdp, ... (single: one process, nothing wrapped)."""
    if is_deepspeed(accelerator):
        plugin = accelerator.state.deepspeed_plugin
        offload = plugin.offload_optimizer_device not in (None, "none") or plugin.offload_param_device not in (
            None,
            "none",
        )
        return f"deepspeed-zero{plugin.zero_stage}{'-offload' if offload else ''}"
    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if accelerator.num_processes > 1 else "single"


def check_supported(accelerator: Accelerator, method, model_name: str) -> None:
    """One-line ConfigError for a method the chosen strategy cannot run (raised before any module is wrapped)."""
    if not is_deepspeed(accelerator):
        return
    phases = method.phases()
    # accelerate's DeepSpeed takes one model and one optimizer per plugin, and its multi-plugin mode is
    # experimental. These models (<= ~100 M parameters) save little by sharding optimizer states next to their
    # activation memory: they run under DDP (+ activation checkpointing, bf16) or FSDP instead.
    if len(phases) > 1 or len(phases[0].modules) > 1:
        raise ConfigError(
            f"model.name={model_name}: {len(phases)} optimizers ({', '.join(p.name for p in phases)}); DeepSpeed through accelerate "
            f"runs one model with one optimizer: use configs/accelerate/ddp.yaml for this method (docs/scale.md: strategy table)"
        )


def configure_deepspeed(accelerator: Accelerator, cfg) -> None:
    """Write the run config's batch, accumulation and clipping into DeepSpeed's config before prepare().

    DeepSpeed owns the optimizer step: `accelerator.backward` runs `engine.step()` at the accumulation
    boundary, clips by its own config and divides the loss by its own accumulation count, so both must agree.
    """
    if not is_deepspeed(accelerator):
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    ds_config["gradient_accumulation_steps"] = cfg.train.grad_accum
    ds_config["train_batch_size"] = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    ds_config["gradient_clipping"] = float(cfg.train.grad_clip) if cfg.train.grad_clip > 0 else 0.0
    low_precision = next(
        (dtype for dtype in ("bf16", "fp16") if str(ds_config.get(dtype, {}).get("enabled", False)).lower() == "true"),
        None,
    )
    # DeepSpeed's "bf16" mode (accelerate's choice) casts parameters, not buffers: BatchNorm then meets bf16
    # weights and fp32 running statistics (an error on CPU), and EMA copies, codebooks and checkpoints would be
    # bf16. torch_autocast keeps fp32 parameters and optimizer states with bf16 compute, as our DDP bf16 runs.
    if low_precision:
        ds_config[low_precision] = {"enabled": False}
        ds_config["torch_autocast"] = {"enabled": True, "dtype": {"bf16": "bfloat16", "fp16": "float16"}[low_precision]}
    # checkpoints carry whole weights for sampling (checkpoint.py)
    if ds_config.get("zero_optimization", {}).get("stage") == 3:
        ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    ds_config.setdefault("steps_per_print", 10**9)  # our logger reports; DeepSpeed's own lines would interleave
    ds_config.setdefault("wall_clock_breakdown", False)


def _rank_order_mean(process_group, bucket) -> torch.futures.Future:
    """A DDP comm hook: every rank's gradients gathered, then summed in rank order and averaged.

    Why not DDP's all-reduce: with 3+ ranks a ring all-reduce adds an element's contributions in an
    order set by its offset in the bucket, and DDP lays buckets out differently on the first step
    after every start (one bucket) than later (rebuilt in gradient-ready order). A resumed run's
    first step then rounds differently from the uninterrupted run's (1-2 ulp, growing). Summing the
    gathered copies in rank order gives each element the same sum whatever the layout.
    """
    group = process_group if process_group is not None else torch.distributed.group.WORLD
    world = torch.distributed.get_world_size(group)
    buffer = bucket.buffer()
    gathered = torch.empty(world * buffer.numel(), dtype=buffer.dtype, device=buffer.device)
    gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    future = gather(gathered, buffer, group=group, async_op=True).get_future()

    def mean(done):
        done.value()  # a failed gather (a peer lost) raises here, instead of averaging an unfilled buffer
        parts = gathered.view(world, -1)
        total = parts[0].clone()
        for rank in range(1, world):
            total += parts[rank]
        return total.div_(world)

    return future.then(mean)


# DDP checks it; the future import made it a string
_rank_order_mean.__annotations__["return"] = torch.futures.Future[torch.Tensor]


def use_exact_gradient_reduction(accelerator: Accelerator, cfg) -> bool:
    """train.exact_allreduce: on / off, or auto = on for 3+ processes on gloo (CPU), where it costs little."""
    setting = cfg.train.exact_allreduce
    if setting == "auto":
        return accelerator.num_processes > 2 and accelerator.device.type == "cpu"
    return setting == "on"


def make_gradient_reduction_exact(accelerator: Accelerator, cfg, modules: dict[str, torch.nn.Module]) -> bool:
    """Register the rank-order mean on every DDP-wrapped module when asked (see _rank_order_mean); True if it was."""
    if is_deepspeed(accelerator) or not use_exact_gradient_reduction(accelerator, cfg):
        return False
    wrapped = [m for m in modules.values() if isinstance(m, torch.nn.parallel.DistributedDataParallel)]
    for module in wrapped:
        module.register_comm_hook(state=None, hook=_rank_order_mean)
    return bool(wrapped)


def full_parameters(accelerator: Accelerator, module: torch.nn.Module):
    """Context in which `module`'s parameters are whole on every rank: ZeRO-3 gathers its partitions
    (for the EMA update and the rank checksums); a no-op everywhere else."""
    if zero_stage(accelerator) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def mixed_precision(accelerator: Accelerator) -> str:
    """no / bf16 / fp16 as this run computes (accelerate reports "no" under DeepSpeed's torch_autocast mode)."""
    if is_deepspeed(accelerator):
        autocast_cfg = accelerator.state.deepspeed_plugin.deepspeed_config.get("torch_autocast", {})
        return (
            {"bfloat16": "bf16", "float16": "fp16"}.get(autocast_cfg.get("dtype"), "no")
            if autocast_cfg.get("enabled")
            else "no"
        )
    return accelerator.mixed_precision


def autocast(accelerator: Accelerator):
    """The forward pass's autocast: accelerate's, or under DeepSpeed's torch_autocast mode our own (the loss
    is computed outside the engine, so we autocast it as accelerate does for DDP; see configure_deepspeed)."""
    precision = mixed_precision(accelerator)
    if is_deepspeed(accelerator) and precision != "no":
        return torch.autocast(
            device_type=accelerator.device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16
        )
    return accelerator.autocast()


def optimizer_kwargs(accelerator: Accelerator) -> dict:
    """Fused AdamW (one kernel for all parameters) on CUDA; DeepSpeed steps its own flattened partitions instead."""
    return {"fused": True} if accelerator.device.type == "cuda" and not is_deepspeed(accelerator) else {}


def clear_gradients(accelerator: Accelerator, modules: dict[str, torch.nn.Module]) -> None:
    """Before a phase: every module's gradients cleared (a generator's loss back-propagates into the discriminator
    too, so no phase may step on gradients another left). DeepSpeed keeps partitioned gradients of its own and
    clears them after its step."""
    if is_deepspeed(accelerator):
        return
    for module in modules.values():
        module.zero_grad(set_to_none=True)


def accumulating(accelerator: Accelerator, phase_modules: list[torch.nn.Module], last: bool):
    """Context for one micro-batch's forward and backward: gradients all-reduced on the last micro-batch only."""
    if is_deepspeed(accelerator):  # the engine accumulates and steps at the boundary it is told of
        accelerator.sync_gradients = last
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    if not last:
        for module in phase_modules:
            stack.enter_context(accelerator.no_sync(module))
    return stack


def backward(accelerator: Accelerator, loss: torch.Tensor, micro_batches: int) -> None:
    """Backward of one micro-batch's loss, scaled to the mean over the step (DeepSpeed divides by its own count)."""
    accelerator.backward(loss if is_deepspeed(accelerator) else loss / micro_batches)


def clip_and_step(
    accelerator: Accelerator, optimizer, params: list[torch.nn.Parameter], clip: float
) -> tuple[bool, torch.Tensor]:
    """Clip to `clip` (0: off) and step unless a gradient is non-finite; (stepped, gradient norm).

    The norm of all-reduced gradients is the same on every rank, so every rank decides alike (no extra sync)."""
    grad_norm = accelerator.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if is_deepspeed(accelerator):  # the engine stepped already, skipping a non-finite step itself
        grad_norm = torch.tensor(float("nan") if grad_norm is None else float(grad_norm))
        return bool(torch.isfinite(grad_norm)) and not optimizer.step_was_skipped, grad_norm
    finite = bool(torch.isfinite(grad_norm))
    if accelerator.scaler is not None:
        optimizer.step()  # the fp16 scaler skips non-finite steps itself and lowers its scale
        finite = finite and not optimizer.step_was_skipped
    elif finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite, grad_norm


def deepspeed_weights_for_inference(
    accelerator: Accelerator, modules: dict[str, torch.nn.Module]
) -> list[dict[str, torch.Tensor]] | None:
    """Full state dicts of the modules (gathered under ZeRO-3; every rank must call); None outside DeepSpeed,
    where save_state already writes model.safetensors."""
    if not is_deepspeed(accelerator):
        return None
    return [accelerator.get_state_dict(module) for module in modules.values()]
