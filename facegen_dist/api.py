"""The Python API: `model = facegen_dist.load(run_or_export)`, then sample, reconstruct, encode, decode."""

from __future__ import annotations

from pathlib import Path

import torch

from facegen_dist.errors import FacegenError
from facegen_dist.methods.base import VQ_METHODS
from facegen_dist.runs import RestoredRun, restore_run


class Model:
    """A trained run's modules in eval mode (EMA weights where kept), behind the calls a user makes."""

    def __init__(self, restored: RestoredRun):
        self.run = restored
        self.cfg, self.method, self.modules = restored.cfg, restored.method, restored.modules
        self.device = next(next(iter(self.modules.values())).parameters()).device

    @property
    def name(self) -> str:
        return self.cfg.model.name

    @torch.no_grad()
    def sample(self, num: int, seed: int = 0) -> torch.Tensor:
        """`num` images in [0, 1], shape (num, 3, H, W); the same seed gives the same images on any device."""
        if not self.method.can_sample():
            raise FacegenError(f"{self.name} draws no samples: {self.method.sampling_protocol().get('samples', '')}")
        return self.method.sample(self.modules, num, torch.Generator().manual_seed(seed)).float()

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstructions of images in [0, 1] (N, 3, H, W)."""
        output = self.method.reconstruct(self.modules, images.to(self.device).float())
        if output is None:
            raise FacegenError(f"{self.name} does not reconstruct (no encoder)")
        return output.float()

    def _vq(self):
        if self.name in VQ_METHODS:
            return self.modules["vqvae"]
        return getattr(self.method, "vq", None)  # a prior: its VQ model's codes

    @torch.no_grad()
    def encode(self, images: torch.Tensor):
        """VQ models and priors: {level: integer code grid}; autoencoders: the latent mean (N, D)."""
        images = images.to(self.device).float()
        vq = self._vq()
        if vq is not None:
            return vq.encode(images)[1]
        latent = self.method.latent_model(self.modules)
        if latent is None:
            raise FacegenError(f"{self.name} has no encoder")
        return latent.encode(images)[0]

    @torch.no_grad()
    def decode(self, codes) -> torch.Tensor:
        """Images in [0, 1] from what `encode` returns."""
        vq = self._vq()
        if vq is not None:
            return vq.decode_codes({level: c.to(self.device) for level, c in codes.items()}).clamp(0, 1).float()
        latent = self.method.latent_model(self.modules)
        if latent is None:
            raise FacegenError(f"{self.name} has no decoder from latents")
        return latent.decode(codes.to(self.device)).float()


def load(path: str | Path, device: str | torch.device = "cpu", checkpoint: str = "", ema: bool = True) -> Model:
    """A run folder (its newest checkpoint, or `checkpoint`) or a `facegen export` folder, ready to use."""
    return Model(restore_run(path, device=device, use_ema=ema, checkpoint_name=checkpoint))
