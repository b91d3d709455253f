"""The Method seam: the only place that knows a model family.

The training loop asks a Method for its modules, its phases (one optimizer each: the AE has
one, a GAN has a generator and a discriminator phase), the loss of a phase on a batch, and
how to reconstruct and sample for the picture grids. It never branches on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from facegen_dist.errors import ConfigError

# Methods whose runs hold a VQ model as the module "vqvae": codes, priors and sampling read them alike.
VQ_METHODS = ("vqvae", "vqvae2", "vqgan")


def plain_module(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the module itself otherwise)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


def normal_latents(num: int, dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """z ~ N(0, I) drawn on the CPU from `generator`, so a seed gives the same samples on any device."""
    return torch.randn(num, dim, generator=generator, device="cpu").to(device)


@dataclass
class MicroBatch:
    """One micro-batch as every phase of a step sees it: built once by `Method.prepare`, then handed to each phase
    in order, so what one phase leaves for the next (a GAN's fakes) travels with the batch, not in the Method."""

    images_seen: int  # before this step: schedules such as a discriminator's start read it
    images: torch.Tensor | None = None  # in [0, 1]; None when a code dataset streams codes
    codes: dict[str, torch.Tensor] | None = None  # {level: code grid}

    def extended(self, cls: type[MicroBatch]) -> MicroBatch:
        """This batch as `cls`, a subclass that adds fields (left at their defaults)."""
        return cls(**{f.name: getattr(self, f.name) for f in fields(MicroBatch)})


@dataclass(frozen=True)
class Phase:
    name: str
    modules: tuple[str, ...]  # whose parameters this phase's optimizer updates
    lr: float | None = None  # None: optim.lr (the schedule scales every phase's lr alike)
    betas: tuple[float, float] | None = None  # None: optim.betas
    grad_clip: float | None = None  # None: train.grad_clip


class Method:
    config_class: ClassVar[type]
    upstream = None  # the RestoredRun facegen_dist.runs handed in (use_upstream), or None

    def __init__(self, model_cfg, resolution: int):
        self.cfg = model_cfg
        self.resolution = resolution

    def build_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def phases(self) -> list[Phase]:
        raise NotImplementedError

    def upstream_run(self) -> tuple[str, str] | None:
        """The finished run this method builds on, as (run folder, checkpoint name; "" = its newest), or None.

        The method reads no files itself: facegen_dist.runs.build_method restores that run and calls `use_upstream`.
        """
        return None

    def use_upstream(self, restored) -> None:
        """Take the run `upstream_run` names (a facegen_dist.runs.RestoredRun, frozen), or raise ConfigError."""

    def prepare_training(self) -> None:
        """Called once by the training loop before the first step, not when a run is restored for sampling
        or code extraction: load what only training needs (a perceptual network), failing early."""

    def prepare(self, batch: MicroBatch) -> MicroBatch:
        """What every phase of this step gets for `batch`, computed once (a prior's codes) before the first phase."""
        return batch

    def phase_active(self, phase: str, images_seen: int) -> bool:
        """Whether `phase` runs this step (a discriminator waits for its start); the same answer on every rank."""
        return True

    def checkpoint_blocks(self) -> tuple[type[nn.Module], ...]:
        """Block types that train.activation_checkpointing recomputes in backward. None with BatchNorm
        inside: the recompute would update its running statistics a second time."""
        return ()

    def ema_modules(self) -> tuple[str, ...]:
        """Modules that get an exponential moving average (used for grids and evaluation)."""
        return ()

    def loss(
        self, phase: str, modules: dict[str, nn.Module], batch: MicroBatch
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar loss of `phase` on a prepared micro-batch, and named stats to log."""
        raise NotImplementedError

    def sampling_protocol(self) -> dict:
        """How `sample` draws (prior, temperature, top-k ...), recorded with every metric."""
        return {}

    @torch.no_grad()
    def reconstruct(self, modules: dict[str, nn.Module], images: torch.Tensor) -> torch.Tensor | None:
        return None

    def check_code_dataset(self, manifest: dict, path: str) -> None:
        """Accept a code dataset (data/codes.py) as training data, or raise ConfigError; batches then carry codes only."""
        raise ConfigError(
            f"data.path: {path} holds VQ codes ({manifest.get('name')}), which train a pixelcnn_prior or gpt_prior, not '{self.cfg.name}'"
        )

    def can_sample(self) -> bool:
        """Whether `sample` draws images (the base class draws none)."""
        return type(self).sample is not Method.sample

    @torch.no_grad()
    def sample(self, modules: dict[str, nn.Module], num: int, generator: torch.Generator) -> torch.Tensor | None:
        return None

    def figures(self, modules: dict[str, nn.Module], out_dir: Path, tag: str) -> dict[str, str]:
        """Extra PNGs saved with the grids (e.g. codebook usage); name -> path. Main process only, no collectives."""
        return {}

    def latent_model(self, modules: dict[str, nn.Module]) -> nn.Module | None:
        """The module the latent-space tools read, or None when the method has no continuous latent.

        It has `encode(images) -> (mean, logvar or None)` and `decode(latents)` with
        decode(encode(x)[0]) the reconstruction; a VQ method exposes its pre-quantisation latent.
        """
        return None
