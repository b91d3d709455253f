"""The prior stage: an autoregressive model over the codes of a finished VQ run (VQ-VAE, VQ-VAE2, VQ-GAN).

`CodePriorMethod` holds what every prior shares: the frozen VQ model (`model.vq_run`), the codes (code shards
or encoded on the fly, see docs/choices.md), the checks, and decoding samples. `pixelcnn_prior`: one gated
PixelCNN per code level (VQ-VAE2's bottom one conditioned on the top codes); `gpt_prior`: VQ-GAN's transformer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from facegen_dist.errors import ConfigError
from facegen_dist.methods.base import VQ_METHODS, Method, MicroBatch, Phase
from facegen_dist.models.gpt import Block, CodeGPT, flatten_codes
from facegen_dist.models.pixelcnn import GatedLayer, GatedPixelCNN


@dataclass
class PixelCNNPriorConfig:
    name: str = "pixelcnn_prior"
    vq_run: str = ""  # folder of the trained VQ run whose codes are modelled (EMA weights)
    # A checkpoint folder name of vq_run, e.g. ckpt-000000064000; empty = its newest. Name one when the VQ
    # run may still train: a resumed prior (and `facegen sample`) must see the same codes.
    vq_checkpoint: str = ""
    channels: int = 128
    layers: int = 12
    kernel_size: int = 5
    temperature: float = 1.0  # sampling
    top_k: int = 0  # sampling: keep the k most likely codes (0 = all)


@dataclass
class GPTPriorConfig:
    name: str = "gpt_prior"
    vq_run: str = ""  # as pixelcnn_prior's: a VQ run with one code grid (vqvae, vqgan)
    vq_checkpoint: str = ""
    layers: int = 8
    heads: int = 8
    width: int = 256  # n_embd
    dropout: float = 0.0
    temperature: float = 1.0  # sampling
    top_k: int = 0  # keep the k most likely codes (0 = all)
    top_p: float = 1.0  # then keep the smallest set of codes holding this probability (1 = all)


class CodePriorMethod(Method):
    """A prior over a frozen VQ run's codes; subclasses build the model, its loss on one level and sampling."""

    def __init__(self, model_cfg, resolution: int):
        super().__init__(model_cfg, resolution)
        if not model_cfg.vq_run:
            raise ConfigError(
                f"model.vq_run: required: the folder of a trained {'/'.join(VQ_METHODS)} run, e.g. runs/vqvae2_avatars64"
            )
        top_p = getattr(model_cfg, "top_p", 1.0)
        bad = [
            f"model.{name} (--{name.replace('_', '-')}) is {value}: must be {rule}"
            for name, value, ok, rule in (
                ("temperature", model_cfg.temperature, model_cfg.temperature > 0, "> 0"),
                ("top_k", model_cfg.top_k, model_cfg.top_k >= 0, ">= 0 (0: off)"),
                ("top_p", top_p, 0 < top_p <= 1, "in (0, 1] (1: off)"),
            )
            if not ok
        ]
        if bad:
            raise ConfigError("; ".join(bad))

    def upstream_run(self) -> tuple[str, str]:
        return self.cfg.vq_run, self.cfg.vq_checkpoint

    def use_upstream(self, vq_run) -> None:
        """The frozen VQ run whose codes this prior models (EMA weights, on the CPU)."""
        if vq_run.cfg.model.name not in VQ_METHODS:
            raise ConfigError(
                f"model.vq_run: {self.cfg.vq_run} is a '{vq_run.cfg.model.name}' run, not {'/'.join(VQ_METHODS)}"
            )
        if vq_run.cfg.data.resolution != self.resolution:
            raise ConfigError(
                f"data.resolution: {self.resolution} differs from the VQ run's {vq_run.cfg.data.resolution}"
            )
        self.vq_run = vq_run
        self.vq = vq_run.modules["vqvae"]
        self.num_codes = vq_run.cfg.model.num_codes
        self.grids = self.vq.grid_shapes(self.resolution)

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.grids)  # ("top", "bottom") or ("bottom",): sampling order

    def phases(self) -> list[Phase]:  # one prior per code level, trained side by side on the same batches
        return [Phase(f"prior_{level}", (f"prior_{level}",)) for level in self.levels]

    def ema_modules(self) -> tuple[str, ...]:
        return tuple(f"prior_{level}" for level in self.levels)

    @torch.no_grad()
    def codes(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Code grids of a batch of images in [0, 1], by the frozen VQ encoder in fp32."""
        self.vq.to(images.device)
        with torch.autocast(images.device.type, enabled=False):
            _, indices, _, _ = self.vq.encode(images.float())
        return indices

    def prepare(self, batch: MicroBatch) -> MicroBatch:
        """A code dataset's batch as it is; an image batch encoded once, for every level's phase."""
        if batch.codes is None:
            # An encoder pass costs a fraction of the prior's, and the stream's flips then augment the codes.
            batch.codes = self.codes(batch.images)
        return batch

    def check_code_dataset(self, manifest: dict, path: str) -> None:
        """Codes from `facegen codes` must come from this prior's VQ run and checkpoint, at its grid sizes."""
        if Path(manifest.get("vq_run", "")).resolve() != Path(self.cfg.vq_run).resolve():
            raise ConfigError(
                f"data.path: the codes at {path} come from {manifest.get('vq_run')}, not model.vq_run={self.cfg.vq_run}"
            )
        if manifest.get("vq_checkpoint") != self.vq_run.checkpoint.name:
            raise ConfigError(
                f"data.path: the codes at {path} come from {manifest.get('vq_checkpoint')}, model.vq_run's is "
                f"{self.vq_run.checkpoint.name}; set model.vq_checkpoint={manifest.get('vq_checkpoint')}"
            )
        if {level: tuple(shape) for level, shape in manifest.get("levels", {}).items()} != dict(self.grids):
            raise ConfigError(
                f"data.path: the code grids at {path} ({manifest.get('levels')}) are not this VQ model's {dict(self.grids)}"
            )

    def level_loss(self, module: nn.Module, level: str, codes: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy (nats per code) of `level`'s codes; through the module's forward, so DDP's hooks run."""
        raise NotImplementedError

    def loss(self, phase, modules, batch):
        level = phase[len("prior_") :]
        loss = self.level_loss(modules[phase], level, batch.codes)
        # nats per code -> bits per code, the figure PixelCNN papers report
        return loss, {"nll": loss.detach(), "bits_per_code": loss.detach() / math.log(2)}

    def sample_codes(self, modules, num: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _protocol(self, prior: str) -> dict:
        return {
            "prior": prior,
            "temperature": self.cfg.temperature,
            "top_k": self.cfg.top_k,
            "vq_run": str(self.cfg.vq_run),
            "vq_checkpoint": self.vq_run.checkpoint.name,
            "vq_ema": self.vq_run.ema,
        }

    @torch.no_grad()
    def sample(self, modules, num, generator):
        codes = self.sample_codes(modules, num, generator)
        device = codes[self.levels[0]].device
        self.vq.to(device)
        with torch.autocast(device.type, enabled=False):
            return self.vq.decode_codes(codes).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, modules, images):
        """The VQ model's reconstruction: the best a perfect prior could sample."""
        self.vq.to(images.device)
        with torch.autocast(images.device.type, enabled=False):
            reconstruction, _, _, _ = self.vq(images.float())
        return reconstruction


class PixelCNNPriorMethod(CodePriorMethod):
    config_class = PixelCNNPriorConfig

    def checkpoint_blocks(self) -> tuple[type[nn.Module], ...]:
        return (GatedLayer,)

    def build_modules(self) -> dict[str, nn.Module]:
        cfg, modules = self.cfg, {}
        for level in self.levels:
            conditioned = level == "bottom" and "top" in self.grids
            modules[f"prior_{level}"] = GatedPixelCNN(
                self.num_codes,
                cfg.channels,
                cfg.layers,
                cfg.kernel_size,
                cond_codes=self.num_codes if conditioned else 0,
                cond_scale=2,
            )
        return modules

    def _condition(self, level: str, codes: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return codes["top"] if level == "bottom" and "top" in codes else None

    def level_loss(self, module, level, codes):
        logits = module(codes[level], self._condition(level, codes))
        return F.cross_entropy(logits.float(), codes[level])

    def sampling_protocol(self) -> dict:
        return self._protocol(f"gated PixelCNN over {', '.join(self.levels)} codes")

    @torch.no_grad()
    def sample_codes(self, modules, num: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        codes: dict[str, torch.Tensor] = {}
        for level in self.levels:
            height, width = self.grids[level]
            codes[level] = modules[f"prior_{level}"].sample(
                num,
                height,
                width,
                cond=self._condition(level, codes),
                generator=generator,
                temperature=self.cfg.temperature,
                top_k=self.cfg.top_k,
            )
        return codes


class GPTPriorMethod(CodePriorMethod):
    """VQ-GAN's second stage: a decoder-only transformer over the raster-ordered codes of one grid."""

    config_class = GPTPriorConfig

    def use_upstream(self, vq_run) -> None:
        super().use_upstream(vq_run)
        if self.levels != ("bottom",):
            raise ConfigError(
                f"model.vq_run: {self.cfg.vq_run} has {len(self.levels)} code grids; gpt_prior models one "
                "(a vqvae or vqgan run); for vqvae2 use pixelcnn_prior"
            )
        height, width = self.grids["bottom"]
        self.seq_len = height * width

    def checkpoint_blocks(self) -> tuple[type[nn.Module], ...]:
        return (Block,)

    def build_modules(self) -> dict[str, nn.Module]:
        cfg = self.cfg
        return {"prior_bottom": CodeGPT(self.num_codes, self.seq_len, cfg.layers, cfg.heads, cfg.width, cfg.dropout)}

    def level_loss(self, module, level, codes):
        flat = flatten_codes(codes[level])
        logits = module(flat)
        return F.cross_entropy(logits.float().flatten(0, 1), flat.flatten())

    def sampling_protocol(self) -> dict:
        return {**self._protocol(f"GPT over {self.seq_len} raster-ordered codes"), "top_p": self.cfg.top_p}

    @torch.no_grad()
    def sample_codes(self, modules, num, generator):
        cfg = self.cfg
        flat = modules["prior_bottom"].sample(
            num, generator=generator, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p
        )
        return {"bottom": flat.view(num, *self.grids["bottom"])}
