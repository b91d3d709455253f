"""What memory.py and throughput.py share: a method's real modules, optimizers and the loop's own phase step
(train/step.py) outside the Trainer, so that each memory/speed lever can be switched on and off in one process.
The Trainer's logging, EMA and checkpoints are left out."""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.state import AcceleratorState

from facegen_dist.accelerator import make_accelerator
from facegen_dist.config import load_config
from facegen_dist.methods import MicroBatch
from facegen_dist.runs import build_method
from facegen_dist.train.activation_checkpointing import checkpoint_blocks
from facegen_dist.train.loop import phase_optimizer
from facegen_dist.train.step import phase_clip, run_phase

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class Levers:
    """The memory/speed settings a benchmark row names."""

    bf16: bool = False
    channels_last: bool = False
    fused_optimizer: bool = False  # fused AdamW on CUDA, foreach elsewhere; False: the per-parameter for-loop
    activation_checkpointing: bool = False
    compile: bool = False

    def label(self) -> str:
        parts = [
            name
            for name, on in (
                ("bf16", self.bf16),
                ("channels_last", self.channels_last),
                ("fused/foreach AdamW", self.fused_optimizer),
                ("act. ckpt", self.activation_checkpointing),
                ("compile", self.compile),
            )
            if on
        ]
        return " + ".join(parts) or "naive (fp32, NCHW, for-loop AdamW)"


BASELINE = Levers()


# The tiny VQ-GAN the CPU smoke runs of memory.py and throughput.py use (32 px, f=4, tiny perceptual net).
TINY_VQGAN = [
    "data.resolution=32",
    "model.channels=16",
    "model.channel_mult=[1,2,2]",
    "model.res_blocks=1",
    "model.attn_resolutions=[8]",
    "model.z_channels=16",
    "model.embed_dim=16",
    "model.num_codes=64",
    "model.perceptual=tiny",
    "model.disc_channels=16",
]


def random_vgg16_weights(folder: Path) -> str:
    """A torchvision vgg16 state dict with random weights: LPIPS costs the same memory and time whatever its weights,
    and this machine may not hold the real ones (no download at run time)."""
    import torchvision

    path = folder / "vgg16-random.pth"
    if not path.exists():
        torch.save(
            {k: v for k, v in torchvision.models.vgg16(weights=None).state_dict().items() if k.startswith("features.")},
            path,
        )
    return str(path)


def load_method(config: str, overrides: list[str], scratch: Path):
    """(cfg, method) for a shipped config name ('vqgan_ffhq512') or path; a vgg16 perceptual loss gets random trunk weights."""
    path = Path(config) if Path(config).suffix == ".yaml" else CONFIGS / f"{config}.yaml"
    # the benchmarks feed their own images; the config's shards may not exist here
    overrides = [
        "data.path=embedded:avatars",
        *overrides,
    ]
    cfg = load_config([str(path)], overrides)
    if getattr(cfg.model, "perceptual", None) == "vgg16" and not cfg.model.perceptual_weights:
        cfg = load_config([str(path)], [*overrides, f"model.perceptual_weights={random_vgg16_weights(scratch)}"])
    return cfg, build_method(cfg.model, cfg.data.resolution)


def images_seen_for_all_phases(cfg) -> int:
    """An images-seen count at which every phase runs (a discriminator past its start)."""
    return int(getattr(cfg.model, "disc_start_images", 0) or 0) + 1


class Setup:
    """A method's modules and per-phase optimizers on one device, with the given levers."""

    def __init__(self, cfg, method, device: torch.device, levers: Levers):
        self.cfg, self.method, self.device, self.levers = cfg, method, device, levers
        # One process, nothing wrapped: the accelerator only carries the precision into the real step. A benchmark
        # measures several lever sets in one process, and accelerate's state is a singleton: reset it for each.
        AcceleratorState._reset_state()
        self.accelerator = make_accelerator(mixed_precision="bf16" if levers.bf16 else "no", cpu=device.type == "cpu")
        torch.manual_seed(0)
        modules = method.build_modules()
        if levers.activation_checkpointing:
            checkpoint_blocks(modules, method.checkpoint_blocks(), cfg.model.name)
        method.prepare_training()
        memory_format = torch.channels_last if levers.channels_last else torch.contiguous_format
        self.modules = {
            name: module.to(device, memory_format=memory_format).train() for name, module in modules.items()
        }
        self.phases = method.phases()
        kwargs = (
            ({"fused": True} if device.type == "cuda" else {"foreach": True})
            if levers.fused_optimizer
            else {"foreach": False}
        )
        self.optimizers = {phase.name: phase_optimizer(phase, self.modules, cfg, **kwargs) for phase in self.phases}
        self.images_seen = images_seen_for_all_phases(cfg)
        if levers.compile:
            for name, module in self.modules.items():
                self.modules[name] = torch.compile(module)

    def num_params(self) -> int:
        return sum(p.numel() for module in self.modules.values() for p in module.parameters())

    def inputs(self, images_uint8: torch.Tensor) -> torch.Tensor:
        images = images_uint8.to(self.device, non_blocking=True).float().div_(255.0)
        return images.contiguous(memory_format=torch.channels_last) if self.levers.channels_last else images

    def autocast(self):
        return self.accelerator.autocast()

    def batch(self, images: torch.Tensor) -> MicroBatch:
        """What the phases of a step get for `images`, as the loop prepares it."""
        return self.method.prepare(MicroBatch(self.images_seen, images=images))

    def step(self, images: torch.Tensor, timer: SegmentTimer | None = None) -> None:
        """One training step of every active phase; `timer` splits it into forward / backward / optimizer."""
        timer = timer or SegmentTimer(self.device, enabled=False)
        with timer("forward"):  # a prior's encoding of the batch is part of its forward cost
            batch = self.batch(images)
        for phase in self.phases:
            if self.method.phase_active(phase.name, self.images_seen):
                optimizer = self.optimizers[phase.name]
                run_phase(
                    self.accelerator,
                    self.method,
                    phase,
                    self.modules,
                    optimizer,
                    [batch],
                    phase_clip(phase, self.cfg),
                    timed=timer,
                )


class SegmentTimer:
    """Wall time per named segment, summed over calls (CUDA synchronised at each boundary so the time lands where it is spent)."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device, self.enabled, self.seconds = device, enabled, {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="facegen-bench-"))
