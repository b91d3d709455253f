"""The one training loop: any Method, any number of processes, counted in images.

Accelerate owns devices, DDP/DeepSpeed wrapping, mixed precision and the grad scaler. The loop owns the rest:
phases with their optimizers, gradient accumulation, clipping, skipping non-finite steps on every rank at once,
EMA, the image-based schedule, logging, grids and atomic checkpoints that resume bit-for-bit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from ema_pytorch import EMA
from omegaconf import OmegaConf

from facegen_dist import runs
from facegen_dist.checkpoints import (
    checkpoint_folders,
    checkpoint_problem,
    list_checkpoints,
    load_ema_state,
    read_trainer_state,
)
from facegen_dist.cluster.preemption import PreemptionWatcher
from facegen_dist.config import to_dict, to_yaml
from facegen_dist.data.codes import image_dir, is_code_dataset
from facegen_dist.data.pipeline import StreamSpec, continue_after, make_train_loader, read_images
from facegen_dist.data.resolve import resolve_data_dir
from facegen_dist.data.shards import read_manifest, split_shards
from facegen_dist.errors import ConfigError, FacegenError
from facegen_dist.eval.evaluate import FEATURE_METRICS, check_metrics, evaluate
from facegen_dist.eval.extractors import build_extractor
from facegen_dist.eval.metrics import METRICS
from facegen_dist.log.images import interleave_rows, save_grid
from facegen_dist.log.logger import NullLogger, RunLogger, truncate_metrics
from facegen_dist.log.stats import StatsCollector
from facegen_dist.methods import MicroBatch
from facegen_dist.schedule import lr_factor
from facegen_dist.train import strategy, universal_checkpoint
from facegen_dist.train.activation_checkpointing import checkpoint_blocks
from facegen_dist.train.checkpoint import rank_file, save_checkpoint
from facegen_dist.train.resume_checks import changed_shapes, non_finite_parameter
from facegen_dist.train.step import phase_clip, run_phase
from facegen_dist.train.sync import parameter_checksums


@dataclass
class TrainerState:
    step: int = 0
    images_seen: int = 0
    batches_consumed: int = 0  # per rank, since the data layout below began: the data stream's position
    skipped_steps: int = 0
    bad_samples: int = 0  # summed over ranks
    train_seconds: float = 0.0
    world_size: int = 1
    num_workers: int = 0
    wandb_run_id: str | None = None
    # The data layout the stream position refers to (0: checkpoints before elastic resume, read as the current settings).
    batch_size: int = 0
    shuffle_group: int = 0
    data_offset: int = 0  # where in the shard sequence this layout began (data.pipeline.continue_after)


def phase_optimizer(phase, modules: dict[str, torch.nn.Module], cfg, **adamw_kwargs) -> torch.optim.AdamW:
    """AdamW over the phase's modules, with the phase's lr and betas where it sets them (else optim.*)."""
    params = [p for name in phase.modules for p in modules[name].parameters()]
    lr = phase.lr if phase.lr is not None else cfg.optim.lr
    betas = tuple(phase.betas) if phase.betas is not None else tuple(cfg.optim.betas)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=cfg.optim.weight_decay, **adamw_kwargs)


def _crossed(images_seen: int, images_per_step: int, interval: int) -> bool:
    return images_seen // interval > (images_seen - images_per_step) // interval


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)


def _set_cpu_threads(cfg, accelerator) -> None:
    if accelerator.device.type != "cpu":
        return
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    torch.set_num_threads(cfg.train.cpu_threads or max(1, len(os.sched_getaffinity(0)) // local_processes))


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class Trainer:
    def __init__(self, cfg, preemption: PreemptionWatcher | None = None):
        self.cfg = cfg
        self.preemption = preemption or PreemptionWatcher()
        self.accelerator = acc = strategy.build_accelerator(cfg)
        self.deepspeed = strategy.is_deepspeed(acc)
        _set_cpu_threads(cfg, acc)
        self.run_dir = Path(cfg.run.dir) / cfg.run.name
        self.ckpt_root = self.run_dir / "checkpoints"
        if acc.is_main_process:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
        data_dir = self.data_dir = resolve_data_dir(cfg.data, acc)
        self.train_shards = split_shards(data_dir, "train")
        manifest = read_manifest(data_dir)
        # A code dataset streams codes; grids and evaluation read the images its codes encode.
        self.code_levels = tuple(manifest["levels"]) if is_code_dataset(manifest) else ()
        self.image_dir = image_dir(data_dir)
        self.val_shards = split_shards(self.image_dir, "val")

        set_seed(cfg.run.seed)  # identical initial weights on every rank
        self.method = runs.build_method(cfg.model, cfg.data.resolution)
        strategy.check_supported(acc, self.method, cfg.model.name)
        strategy.configure_deepspeed(acc, cfg)
        if self.code_levels:
            self.method.check_code_dataset(manifest, cfg.data.path)
        modules = self.method.build_modules()
        if cfg.train.activation_checkpointing:  # before the EMA copies, so that both have the same structure
            checkpoint_blocks(modules, self.method.checkpoint_blocks(), cfg.model.name)
        if cfg.train.channels_last:
            modules = {name: module.to(memory_format=torch.channels_last) for name, module in modules.items()}
        self.method.prepare_training()
        self.phases = self.method.phases()
        self.ema = {
            name: EMA(
                modules[name], beta=cfg.train.ema_beta, update_after_step=0, update_every=1, include_online_model=False
            )
            for name in self.method.ema_modules()
        }
        fused = strategy.optimizer_kwargs(acc)
        optimizers = {phase.name: phase_optimizer(phase, modules, cfg, **fused) for phase in self.phases}
        self.base_lr = {name: optimizer.param_groups[0]["lr"] for name, optimizer in optimizers.items()}
        names, phase_names = list(modules), list(optimizers)
        prepared = acc.prepare(*[modules[n] for n in names], *[optimizers[n] for n in phase_names])
        self.modules = dict(zip(names, prepared[: len(names)]))
        self.exact_allreduce = strategy.make_gradient_reduction_exact(acc, cfg, self.modules)
        self.optimizers = dict(zip(phase_names, prepared[len(names) :]))
        for ema in self.ema.values():
            ema.to(acc.device)  # saved as ema_<name>.safetensors by checkpoint.py, never pickled

        set_seed(cfg.run.seed, device_specific=True)  # per-rank noise; replaced by the checkpoint's on resume
        self.state = self._fresh_state()
        self._resume_notes: list[str] = []
        self._partial_stats: dict | None = None
        self.images_per_step = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        self.resumed_from = self._resume()
        # Counted in images, so a resume with another world size or batch still stops at the budget (to within one step).
        remaining_steps = max(0, math.ceil((cfg.train.total_images - self.state.images_seen) / self.images_per_step))
        self.final_images = self.state.images_seen + remaining_steps * self.images_per_step
        self.dead_window = min(cfg.train.dead_run_steps, remaining_steps) if cfg.train.dead_run_steps > 0 else 0
        self.stats = StatsCollector()
        # the stats since the last log row, so that the next row averages what it would have
        if self._partial_stats is not None:
            self.stats.load_state(self._partial_stats)
        self.extractor = self._eval_extractor()
        self.logger = self._make_logger()

    def _eval_extractor(self):
        """Built at start-up so that missing weights stop the run now, not hours in."""
        cfg = self.cfg
        if not cfg.eval.every_images:
            return None
        metrics = check_metrics(list(cfg.eval.metrics))
        sample_metrics = [m for m in metrics if METRICS[m].needs == "samples"]
        if sample_metrics and not self.method.can_sample():
            raise ConfigError(
                f"eval.metrics: {', '.join(sample_metrics)} need samples and a '{cfg.model.name}' run draws none; use rfid, psnr, ssim, sharpness"
            )
        needs = [m for m in metrics if m in FEATURE_METRICS]
        return (
            build_extractor(cfg.eval, needs, self.accelerator.device, read_manifest(self.image_dir).get("name"))
            if needs
            else None
        )

    def _fresh_state(self) -> TrainerState:
        cfg = self.cfg
        return TrainerState(
            world_size=self.accelerator.num_processes,
            num_workers=cfg.data.num_workers,
            batch_size=cfg.train.batch_size,
            shuffle_group=cfg.data.shuffle_group,
        )

    def _resume(self) -> Path | None:
        """Load the newest sound checkpoint, skipping damaged ones with one line each; refuse if there are some and none is sound."""
        acc = self.accelerator
        folders = checkpoint_folders(self.ckpt_root)
        rejected = []
        for folder in reversed(folders):
            problem = self._load_if_sound(folder)
            if problem is None:
                if rejected:
                    self._resume_notes.append(f"resumed from an older checkpoint: {'; '.join(rejected)}")
                return folder
            rejected.append(f"{folder.name} skipped ({problem})")
            if acc.is_main_process:
                print(f"facegen: warning: checkpoint {folder} skipped: {problem}", file=sys.stderr, flush=True)
        if folders:
            raise FacegenError(
                f"{self.ckpt_root}: none of its {len(folders)} checkpoints can be resumed ({'; '.join(rejected)}); "
                f"move the folder away to start from scratch"
            )
        return None

    def _agree(self, ok: bool) -> bool:
        """True when `ok` holds on every rank (one all-reduce)."""
        failures = torch.tensor([0.0 if ok else 1.0], device=self.accelerator.device)
        return float(self.accelerator.reduce(failures, reduction="sum").item()) == 0.0

    def _load_if_sound(self, folder: Path) -> str | None:
        """Why `folder` cannot be resumed from (every rank returns the same answer), or None once it is loaded."""
        acc = self.accelerator
        problem = checkpoint_problem(folder, hashes=acc.is_main_process)  # sha256 on one rank; sizes everywhere
        if not self._agree(problem is None):
            return problem or "its files do not match the manifest on another rank"
        saved = read_trainer_state(folder)
        if not self.deepspeed:
            changed = changed_shapes(self.modules, folder, acc.unwrap_model)
            if changed:  # a config change, not damage: older checkpoints have the same shapes
                raise ConfigError(
                    f"{folder}: the model's shape differs from the checkpoint's ({changed}); resume with the run's own model.* settings"
                )
        universal = None
        if self.deepspeed and saved.get("world_size", acc.num_processes) != acc.num_processes:
            universal = self.run_dir / ".universal" / folder.name  # on storage every node sees
            failure = universal_checkpoint.convert(folder, universal) if acc.is_main_process else None
            if not self._agree(failure is None):
                raise ConfigError(
                    f"{folder}: written by {saved['world_size']} DeepSpeed processes; converting it to a universal checkpoint "
                    f"for {acc.num_processes} failed ({failure or 'on rank 0'}); resume with {saved['world_size']} processes"
                )
        try:
            with universal_checkpoint.loading_from(acc, universal) if universal else contextlib.nullcontext():
                acc.load_state(str(folder))
            for index, (name, ema) in enumerate(self.ema.items()):
                ema.load_state_dict(load_ema_state(folder, name, index))
            problem = non_finite_parameter({**self.modules, **{f"ema:{n}": e.ema_model for n, e in self.ema.items()}})
        except Exception as error:  # noqa: BLE001 — safetensors, torch and DeepSpeed raise many types for damaged files
            problem = f"loading failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
        if universal is not None:
            acc.wait_for_everyone()
            if acc.is_main_process:
                shutil.rmtree(universal.parent, ignore_errors=True)
        if not self._agree(problem is None):
            return problem or "loading failed on another rank"
        if universal is not None:
            self._resume_notes.append(
                f"DeepSpeed state re-partitioned from {saved['world_size']} to {acc.num_processes} processes (universal checkpoint)"
            )
        self._continue_state(saved, folder)
        return None

    def _continue_state(self, saved: dict, folder: Path) -> None:
        """The trainer state to go on from; a new data layout when world size, workers, batch or shuffle group changed."""
        acc, cfg = self.accelerator, self.cfg
        known = {f.name for f in fields(TrainerState)}
        previous = TrainerState(**{k: v for k, v in saved.items() if k in known})
        previous.batch_size = previous.batch_size or cfg.train.batch_size
        previous.shuffle_group = previous.shuffle_group or cfg.data.shuffle_group
        state = self.state = TrainerState(
            **{
                **asdict(previous),
                "world_size": acc.num_processes,
                "num_workers": cfg.data.num_workers,
                "batch_size": cfg.train.batch_size,
                "shuffle_group": cfg.data.shuffle_group,
            }
        )
        old_layout = (previous.world_size, previous.num_workers, previous.batch_size, previous.shuffle_group)
        new_layout = (acc.num_processes, cfg.data.num_workers, cfg.train.batch_size, cfg.data.shuffle_group)
        if old_layout == new_layout:  # the stream continues exactly where it stopped
            stats_file = folder / rank_file("stats", acc.process_index)
            self._partial_stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
            return
        old_stream = StreamSpec(
            tuple(self.train_shards),
            cfg.data.resolution,
            previous.batch_size,
            seed=cfg.run.seed,
            world_size=previous.world_size,
            num_workers=previous.num_workers,
            start_batch=previous.batches_consumed,
            shuffle_group=previous.shuffle_group,
            sequence_offset=previous.data_offset,
        )
        state.data_offset, skipped = continue_after(old_stream)
        state.batches_consumed = 0
        names = "processes x data workers x batch x shuffle group"
        self._resume_notes.append(
            f"data layout changed ({names}: {' x '.join(map(str, old_layout))} -> {' x '.join(map(str, new_layout))}): the stream goes on "
            f"at shard position {state.data_offset}, after every shard already begun; no image read is read again in this pass, "
            f"{skipped} unread images of the shards in flight are skipped"
        )
        if acc.num_processes > previous.world_size:
            self._resume_notes.append(
                f"ranks {previous.world_size}..{acc.num_processes - 1} had no RNG state in {folder.name}: they start with fresh noise"
            )

    def _make_logger(self):
        acc, cfg = self.accelerator, self.cfg
        if not acc.is_main_process:
            return NullLogger()
        config_path = self.run_dir / "config.yaml"
        if self.resumed_from is not None and config_path.exists():
            before = _flatten(OmegaConf.to_container(OmegaConf.load(config_path)))
            now = _flatten(to_dict(cfg))
            changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            if changed:
                self._resume_notes.append(f"config changed since the last start: {', '.join(changed)}")
        config_path.write_text(to_yaml(cfg))
        truncate_metrics(self.run_dir / "metrics.jsonl", self.state.step)
        logger = RunLogger(
            self.run_dir,
            to_dict(cfg),
            total_images=self.final_images,
            images_seen=self.state.images_seen,
            wandb_mode=cfg.log.wandb,
            wandb_project=cfg.log.wandb_project,
            wandb_run_id=self.state.wandb_run_id,
            progress=cfg.log.progress,
        )
        self.state.wandb_run_id = logger.wandb_run_id
        logger.write(self._start_line())
        if self.resumed_from is not None:
            restarts = (
                f" (SLURM_RESTART_COUNT={os.environ['SLURM_RESTART_COUNT']})"
                if "SLURM_RESTART_COUNT" in os.environ
                else ""
            )
            logger.write(
                f"facegen: resumed from {self.resumed_from} at {self.state.images_seen} images (step {self.state.step}){restarts}"
            )
            for note in self._resume_notes:
                logger.write(f"facegen: note: {note}")
        return logger

    def _start_line(self) -> str:
        """Where the run writes, what it trains, on what, with which batch: the first thing a log should say."""
        acc, cfg = self.accelerator, self.cfg
        params = sum(getattr(p, "ds_numel", p.numel()) for m in self.modules.values() for p in m.parameters())
        batch = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
        per_process = f"{cfg.train.batch_size} x {cfg.train.grad_accum} accumulated" if cfg.train.grad_accum > 1 else ""
        return (
            f"facegen: {self.run_dir}: {cfg.model.name}, {params / 1e6:.2f} M parameters | {acc.num_processes} "
            f"{acc.device.type} process{'es' if acc.num_processes > 1 else ''} ({strategy.strategy_name(acc)}, "
            f"{strategy.mixed_precision(acc).replace('no', 'fp32')}) | global batch {batch}"
            f"{f' ({per_process} per process)' if per_process else ''} | to {self.final_images} images"
        )

    # ---- one step -------------------------------------------------------------------------

    def _set_lr(self) -> float:
        cfg = self.cfg
        factor = lr_factor(
            self.state.images_seen,
            cfg.train.total_images,
            cfg.optim.warmup_images,
            cfg.optim.schedule,
            cfg.optim.min_lr_ratio,
        )
        for name, optimizer in self.optimizers.items():
            for group in optimizer.param_groups:
                group["lr"] = self.base_lr[name] * factor
        return cfg.optim.lr * factor

    def _run_phase(self, phase, micro_batches: list[MicroBatch]) -> bool:
        """One optimizer step of `phase` over the micro-batches; False if it was skipped (on every rank alike)."""
        acc, cfg = self.accelerator, self.cfg
        poison = self.state.step in cfg.debug.inject_nan_at_steps and acc.is_main_process
        optimizer = self.optimizers[phase.name]
        result = run_phase(
            acc, self.method, phase, self.modules, optimizer, micro_batches, phase_clip(phase, cfg), poison=poison
        )
        if result.stepped:
            for stats in result.stats:
                self.stats.add_dict(stats, prefix=f"{phase.name}/" if len(self.phases) > 1 else "")
            self.stats.add(f"grad_norm/{phase.name}", result.grad_norm)
        return result.stepped

    def _inputs(self, batch: dict) -> MicroBatch:
        """A loader batch on the device: images in [0, 1], or (code datasets) {level: codes}."""
        device, seen = self.accelerator.device, self.state.images_seen
        if "codes" in batch:
            return MicroBatch(
                seen, codes={level: c.to(device, non_blocking=True) for level, c in batch["codes"].items()}
            )
        images = batch["image"].to(device, non_blocking=True).float().div_(255.0)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return MicroBatch(seen, images=images)

    def _train_step(self, data_iter) -> float:
        """One optimizer step of every phase; returns seconds spent waiting for data."""
        cfg = self.cfg
        wait_start = time.perf_counter()
        batches = [next(data_iter) for _ in range(cfg.train.grad_accum)]
        data_wait = time.perf_counter() - wait_start
        self._bad_samples_local += sum(int(b["bad_samples"]) for b in batches)
        self._set_lr()
        micro_batches = [self.method.prepare(self._inputs(b)) for b in batches]
        active = [phase for phase in self.phases if self.method.phase_active(phase.name, self.state.images_seen)]
        ok = all([self._run_phase(phase, micro_batches) for phase in active])
        if ok:
            self._skip_streak = 0
            for name, ema in self.ema.items():
                with strategy.full_parameters(self.accelerator, self.modules[name]):
                    ema.update()
        else:
            self.state.skipped_steps += 1
            self._skip_streak += 1
            self.logger.write(
                f"facegen: warning: non-finite loss or gradient at step {self.state.step}; step skipped ({self.state.skipped_steps} so far)"
            )
            if self.dead_window and self._skip_streak >= self.dead_window:  # the same on every rank: the decision is
                self._stop_dead_run()
        self.state.step += 1
        self.state.images_seen += self.images_per_step
        self.state.batches_consumed += cfg.train.grad_accum
        return data_wait

    # ---- periodic work ---------------------------------------------------------------------

    def _log(
        self, interval_images: int, interval_seconds: float, data_wait: float, evaluated: dict[str, float]
    ) -> dict:
        acc = self.accelerator
        stats = self.stats.reduce(acc)
        bad = acc.reduce(torch.tensor(float(self._bad_samples_local), device=acc.device), reduction="sum")
        self.state.bad_samples += int(bad.item())
        self._bad_samples_local = 0
        row = {
            "step": self.state.step,
            "images_seen": self.state.images_seen,
            "world_size": acc.num_processes,
            "img_per_s": interval_images / max(interval_seconds, 1e-9),
            "lr": self.optimizers[self.phases[0].name].param_groups[0]["lr"],
            **(
                {f"lr/{name}": optimizer.param_groups[0]["lr"] for name, optimizer in self.optimizers.items()}
                if len(self.optimizers) > 1
                else {}
            ),
            **stats,
            **evaluated,
            "skipped_steps": self.state.skipped_steps,
            "bad_samples": self.state.bad_samples,
            "data_wait_frac": data_wait / max(interval_seconds, 1e-9),
            "peak_mem_gb": _peak_memory_gb(acc.device),
        }
        self.logger.log(row)
        return row

    def eval_modules(self) -> dict[str, torch.nn.Module]:
        """EMA copies where the method has them, else the raw modules; in eval mode."""
        modules = {
            name: self.ema[name].ema_model if name in self.ema else self.accelerator.unwrap_model(m)
            for name, m in self.modules.items()
        }
        for module in modules.values():
            module.eval()
        return modules

    def _save_grids(self, val_images: torch.Tensor, tag: str) -> dict[str, str]:
        """Reconstruction and sample grids (main process only; no collectives inside)."""
        modules = self.eval_modules()
        images = val_images.to(self.accelerator.device).float().div(255.0)
        written = {}
        with torch.no_grad(), strategy.autocast(self.accelerator):
            reconstruction = self.method.reconstruct(modules, images)
            samples = self.method.sample(modules, images.shape[0], torch.Generator().manual_seed(self.cfg.run.seed))
        per_row = max(1, int(math.sqrt(images.shape[0])))
        if reconstruction is not None:
            path = self.run_dir / "samples" / f"reconstructions_{tag}.png"
            save_grid(interleave_rows(images, reconstruction.float(), per_row), path, nrow=per_row)
            written["reconstructions"] = str(path)
        if samples is not None:
            path = self.run_dir / "samples" / f"samples_{tag}.png"
            save_grid(samples.float(), path, nrow=per_row)
            written["samples"] = str(path)
        written.update(self.method.figures(modules, self.run_dir / "samples", tag))
        for module in self.modules.values():
            module.train()
        return written

    def _evaluate(self) -> dict[str, float]:
        """In-training evaluation on every rank (small N); values go into this step's log row."""
        cfg = self.cfg
        context = {
            "run": cfg.run.name,
            "checkpoint": "in-training",
            "images_seen": self.state.images_seen,
            "ema": bool(self.ema),
        }
        record = evaluate(
            self.accelerator,
            self.method,
            self.eval_modules(),
            self.image_dir,
            cfg.eval,
            cfg.data.resolution,
            self.extractor,
            list(cfg.eval.metrics),
            cfg.eval.during_training_num,
            context,
            self.run_dir / "eval",
        )
        for module in self.modules.values():
            module.train()
        return {f"eval/{name}": value for name, value in record["metrics"].items()}

    def _checkpoint(self) -> Path:
        self.state.train_seconds += time.perf_counter() - self._segment_start
        self._segment_start = time.perf_counter()
        return save_checkpoint(
            self.accelerator,
            self.ckpt_root,
            asdict(self.state),
            self.cfg.train.keep_checkpoints,
            self.modules,
            self.ema,
            per_rank={"stats": self.stats.state()},
        )

    def _stop_dead_run(self) -> None:
        """Every rank raises at the same step (skips are decided on all-reduced gradients); no checkpoint of this stretch is written."""
        newest = list_checkpoints(self.ckpt_root)
        kept = f"the newest checkpoint, {newest[-1]}, is untouched" if newest else "no checkpoint was written"
        raise FacegenError(
            f"dead run: the last {self._skip_streak} steps were all non-finite (NaN/inf loss or gradient), up to step {self.state.step} "
            f"at {self.state.images_seen} images; {kept}. Lower optim.lr, check the data, or try train.precision=no"
        )

    def _stop_for_preemption(self, checkpoint: Path | None) -> dict:
        """Every rank is here at the same step: checkpoint (unless this step already wrote one) and stop."""
        checkpoint = checkpoint or self._checkpoint()
        state, signal_name = self.state, self.preemption.signal_name or "a preemption signal"
        self.logger.write(
            f"facegen: {signal_name} received: stopped after step {state.step} at {state.images_seen} of {self.final_images} images; "
            f"checkpoint {checkpoint}; the same command resumes from it"
        )
        self.logger.close()
        return {"preempted": True, "images_seen": state.images_seen, "step": state.step, "checkpoint": str(checkpoint)}

    # ---- the loop --------------------------------------------------------------------------

    def fit(self) -> dict:
        acc, cfg, state = self.accelerator, self.cfg, self.state
        self._bad_samples_local, self._skip_streak = 0, 0
        self._segment_start = time.perf_counter()
        val_images = (
            read_images(self.val_shards, cfg.log.num_grid_images, cfg.data.resolution)[0]
            if acc.is_main_process
            else None
        )
        spec = StreamSpec(
            tuple(self.train_shards),
            cfg.data.resolution,
            cfg.train.batch_size,
            seed=cfg.run.seed,
            rank=acc.process_index,
            world_size=acc.num_processes,
            num_workers=cfg.data.num_workers,
            start_batch=state.batches_consumed,
            shuffle_group=cfg.data.shuffle_group,
            hflip=cfg.data.hflip,
            code_levels=self.code_levels,
            sequence_offset=state.data_offset,
        )
        data_iter = iter(make_train_loader(spec, pin_memory=acc.device.type == "cuda"))
        try:
            for module in self.modules.values():
                module.train()
            last_row: dict = {}
            interval_start, interval_images, interval_wait = time.perf_counter(), 0, 0.0
            while state.images_seen < cfg.train.total_images:
                interval_wait += self._train_step(data_iter)
                interval_images += self.images_per_step
                self.logger.advance(self.images_per_step)
                seen, per_step = state.images_seen, self.images_per_step
                final = state.images_seen >= cfg.train.total_images
                evaluated, eval_seconds = {}, 0.0
                if cfg.eval.every_images and (_crossed(seen, per_step, cfg.eval.every_images) or final):
                    eval_start = time.perf_counter()
                    evaluated = self._evaluate()
                    eval_seconds = time.perf_counter() - eval_start
                if _crossed(seen, per_step, cfg.train.log_every_images) or final or evaluated:
                    last_row = self._log(
                        interval_images, time.perf_counter() - interval_start - eval_seconds, interval_wait, evaluated
                    )
                    interval_start, interval_images, interval_wait = time.perf_counter(), 0, 0.0
                if acc.is_main_process and (_crossed(seen, per_step, cfg.train.sample_every_images) or final):
                    self.logger.log_images(self._save_grids(val_images, f"{seen:09d}"), state.step, seen)
                # Not while non-finite steps are running: a dead stretch must not rotate good checkpoints out.
                due = _crossed(seen, per_step, cfg.train.ckpt_every_images) and self._skip_streak == 0
                checkpoint = self._checkpoint() if due or final else None
                if not final and self.preemption.agreed(acc):
                    return self._stop_for_preemption(checkpoint)
        finally:
            # Stop the data workers now, while the loader can still tell them to: at interpreter exit
            # torch skips that and multiprocessing SIGTERMs them, which they ignore (pipeline.py).
            shutdown = getattr(data_iter, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        return self._finish(last_row, val_images)

    def _finish(self, last_row: dict, val_images) -> dict:
        acc = self.accelerator
        checksums = parameter_checksums(acc, self.modules)
        summary = {}
        if acc.is_main_process:
            if val_images is not None:
                written = self._save_grids(val_images, "final")
                self.logger.log_images(written, self.state.step, self.state.images_seen)
            summary = {
                "run": self.cfg.run.name,
                "images_seen": self.state.images_seen,
                "steps": self.state.step,
                "world_size": acc.num_processes,
                "strategy": strategy.strategy_name(acc),
                "mixed_precision": strategy.mixed_precision(acc),
                "train_seconds": self.state.train_seconds,
                "img_per_s_mean": self.state.images_seen / max(self.state.train_seconds, 1e-9),
                "skipped_steps": self.state.skipped_steps,
                "bad_samples": self.state.bad_samples,
                "parameter_checksums": checksums,
                "ranks_in_sync": len(set(checksums)) == 1,
                "final": last_row,
            }
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if not summary["ranks_in_sync"]:
                self.logger.write(f"facegen: warning: parameters differ across ranks: {checksums}")
            sync = self.logger.wandb_sync_dir
            self.logger.write(
                f"facegen: {self.run_dir} done: {self.state.images_seen} images in {self.state.train_seconds:.0f} s "
                f"of training ({summary['img_per_s_mean']:.1f} img/s); summary {self.run_dir / 'summary.json'}"
                + (f"; upload the offline W&B run with: wandb sync {sync}" if sync else "")
            )
        self.logger.close()
        return summary


def run(cfg, preemption: PreemptionWatcher | None = None) -> dict:
    """Train to cfg.train.total_images, or until a preemption signal: then the result has preempted=True."""
    preemption = preemption or PreemptionWatcher()  # first, so a signal during start-up is not lost
    try:
        trainer = Trainer(cfg, preemption)
    except BaseException:
        # A start-up error (bad data, config, weights) raised on every rank: leave the process group
        # cleanly, or each rank aborts at exit and buries the one-line error under gloo's noise.
        PartialState().destroy_process_group()
        raise
    try:
        if trainer.state.images_seen >= cfg.train.total_images:
            trainer.logger.write(
                f"facegen: {trainer.run_dir} is already complete ({trainer.state.images_seen} images); nothing to do"
            )
            trainer.logger.close()
            return {}
        result = trainer.fit()
        # Rank 0 writes the summary after the last collective; the others would otherwise reach their
        # exit at once, racing gloo's worker threads still releasing that collective's tensors (see
        # cli.exit_process). Waiting here gives those threads the time, whoever runs this function.
        trainer.accelerator.wait_for_everyone()
        return result
    finally:
        preemption.ignore_further()
        trainer.accelerator.end_training()
