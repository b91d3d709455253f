"""Activation checkpointing, applied from outside the model (models stay plain torch).

`train.activation_checkpointing: true` wraps every block of the types the Method names (`Method.checkpoint_blocks`):
its activations are dropped after the forward pass and recomputed in the backward pass, less memory for about
one extra forward.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)

from facegen_dist.errors import ConfigError


def checkpoint_blocks(modules: dict[str, nn.Module], block_types: tuple[type[nn.Module], ...], model_name: str) -> int:
    """Wrap the blocks in place; returns how many were wrapped (a one-line error if the method has none)."""
    if not block_types:
        raise ConfigError(
            f"train.activation_checkpointing: model.name={model_name} has no blocks to checkpoint "
            f"(its BatchNorm stages would update their running statistics twice on recompute); set it to false"
        )
    count = 0

    def check(module: nn.Module) -> bool:
        nonlocal count
        hit = isinstance(module, block_types)
        count += hit
        return hit

    # torch's own wrapper (the one torchtitan and FSDP use), non-reentrant: it works under DDP and DeepSpeed and with
    # torch.autograd.grad (the VQ-GAN's adaptive weight), and strips its prefix from state_dict keys, so checkpoints
    # read the same with or without it.
    for module in modules.values():
        apply_activation_checkpointing(
            module,
            checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=check,
        )
    return count


def retained_activation_bytes(forward) -> tuple[object, int]:
    """Run `forward()` and count the bytes autograd keeps for the backward pass (non-parameter tensors saved outside
    checkpointed blocks, each storage once; inside one, the checkpoint's own hooks keep nothing). Works on any device,
    which makes it the CPU stand-in for a GPU's peak-memory figure. Returns (forward's result, bytes)."""
    import torch

    seen: dict[int, int] = {}

    def pack(tensor):
        if tensor.is_leaf and tensor.requires_grad:  # a parameter: memory the model holds anyway
            return tensor
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    return result, sum(seen.values())
