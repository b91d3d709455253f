"""Run configuration: a dataclass schema, YAML files on top, dotted CLI overrides last.

OmegaConf (field standard, used by taming/DINOv2) gives typed merging and struct mode, so an unknown key or a
value of the wrong type is caught with its full dotted name; we turn its exceptions into one-line `ConfigError`s.
The `model` section is validated against the schema of the method it names, so each method owns its own keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf import errors as oc_errors

from facegen_dist.errors import ConfigError

EMBEDDED_PREFIX = "embedded:"
EMBEDDED_DATASETS = ("avatars",)


@dataclass
class RunConfig:
    name: str = "vae_avatars64"
    dir: str = "runs"
    seed: int = 0


@dataclass
class DataConfig:
    # A folder of shards with a manifest.json, or `embedded:avatars`: the procedural avatar set,
    # rendered on first use (make_num images at make_size px) and cached under cache_dir.
    path: str = "embedded:avatars"
    cache_dir: str = "data"
    make_num: int = 20000
    make_size: int = 64
    make_seed: int = 0
    resolution: int = 64
    num_workers: int = 1
    shuffle_group: int = 4  # shards read together and shuffled as one block (memory: group x shard bytes x workers)
    hflip: bool = True


@dataclass
class TrainConfig:
    total_images: int = 64_000
    batch_size: int = 64  # per process, per micro-step
    grad_accum: int = 1
    # auto = what `accelerate launch --mixed_precision` / `accelerate config` says (else no); or no | fp16 | bf16
    precision: str = "auto"
    grad_clip: float = 1.0  # 0 disables clipping (the grad norm is still computed and checked)
    ema_beta: float = 0.999
    # Recompute the method's residual/attention/transformer blocks in backward instead of keeping
    # their activations (train/activation_checkpointing.py): less memory, ~1 more forward per step.
    activation_checkpointing: bool = False
    # NHWC weights and images: faster convolutions on GPUs with tensor cores (benchmarks/throughput.py).
    channels_last: bool = False
    log_every_images: int = 3200
    sample_every_images: int = 16_000
    ckpt_every_images: int = 16_000
    keep_checkpoints: int = 3
    # Gradients summed in rank order (a DDP comm hook) so that a resumed run with 3+ processes matches the uninterrupted
    # one bit for bit: auto = on for 3+ processes on CPU/gloo; on GPUs it moves N/2x the bytes of an all-reduce (opt-in).
    exact_allreduce: str = "auto"  # auto | on | off
    # Stop (exit non-zero, no checkpoint of that stretch) when this many steps in a row were non-finite; 0 = never.
    dead_run_steps: int = 50
    # CPU training only: torch threads per process; 0 = this machine's cores / local processes.
    # (`accelerate launch` without --cpu sets OMP_NUM_THREADS=1, which idles all but one core.)
    cpu_threads: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_images: int = 6400
    schedule: str = "cosine"  # constant | cosine
    min_lr_ratio: float = 0.1


@dataclass
class LogConfig:
    wandb: str = "offline"  # online | offline | off
    wandb_project: str = "facegen_dist"
    num_grid_images: int = 64
    progress: bool = True


@dataclass
class EvalConfig:
    # A torch-fidelity feature extractor: `inception-v3-compat` (the standard FID network),
    # `avatar` (the shipped avatar attribute network), any name registered by a module in
    # `plugins`, or `auto`: Inception when its weights are on this machine (inception_weights or
    # torch's cache), else `avatar` on avatar data, else Inception downloaded.
    extractor: str = "auto"
    extractor_weights: str = ""  # weights of a non-Inception extractor (default: the shipped file)
    inception_weights: str = ""  # local .pth for offline machines; else torch's hub cache, else a download
    allow_download: bool = True
    plugins: list[str] = field(default_factory=list)  # modules imported first (they may register extractors)
    metrics: list[str] = field(default_factory=lambda: ["fid", "kid", "prc"])
    num_samples: int = 10_000  # generated samples (and reference images) per evaluation
    batch_size: int = (
        100  # samples generated and featurised together; fixed so results do not depend on the process count
    )
    split: str = "val"  # reference split
    seed: int = 1234
    use_ema: bool = True
    cache_dir: str = "data/fidelity_cache"
    every_images: int = 0  # in-training evaluation interval (0 = off)
    during_training_num: int = 1000


@dataclass
class DebugConfig:
    # Fault injection for tests and for checking a cluster's failure handling: the loss of
    # these steps (0-based, rank 0 only) is replaced by NaN.
    inject_nan_at_steps: list[int] = field(default_factory=list)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: Any = field(default_factory=lambda: {"name": "vae"})
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _wrap_omegaconf(error: Exception, prefix: str = "") -> ConfigError:
    key = getattr(error, "full_key", None) or ""
    if prefix and key:
        key = f"{prefix}.{key}"
    if isinstance(error, (oc_errors.ConfigKeyError, oc_errors.ConfigAttributeError)):
        return ConfigError(f"{key or '?'}: unknown key (check the spelling against configs/*.yaml)")
    if isinstance(error, oc_errors.ValidationError):
        return ConfigError(f"{key or '?'}: {_one_line(error)}")
    return ConfigError(f"{key + ': ' if key else ''}{_one_line(error)}")


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"{item}: overrides are written key=value, e.g. train.total_images=20000")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as error:  # noqa: BLE001 — omegaconf's grammar errors have many types
        raise ConfigError(f"overrides: {_one_line(error)}") from None


def _read_yaml(path: str) -> DictConfig:
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no such file '{path}'")
    try:
        layer = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 — YAML syntax errors
        raise ConfigError(f"{path}: not valid YAML ({_one_line(error)})") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (run:, data:, model:, ...), not a list")
    return layer


def _refuse_interpolations(tree: Any, path: str, prefix: str = "") -> None:
    """A run folder's config.yaml was written resolved: an interpolation there (e.g. ${oc.env:SECRET}) was put in by hand."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        if isinstance(value, str) and "${" in value:
            raise ConfigError(
                f"{path}: {prefix}{key} holds an interpolation ('{value}'); a run folder's config is never resolved"
            )
        _refuse_interpolations(value, path, f"{prefix}{key}.")


def load_run_config(config_path: str | Path, overrides: list[str] | None = None, check_data: bool = True) -> DictConfig:
    """A run folder's config.yaml: no interpolation resolved, no plugin imported unless `overrides` names it."""
    return load_config([str(config_path)], overrides, from_run_folder=True, check_data=check_data)


def load_config(
    config_files: list[str] | None = None,
    overrides: list[str] | None = None,
    from_run_folder: bool = False,
    check_data: bool = True,
) -> DictConfig:
    """Schema defaults <- each YAML file in order <- dotted overrides; validated (the shards' presence too,
    unless check_data=False: printing a config needs no data)."""
    merged = OmegaConf.structured(Config)
    OmegaConf.set_struct(merged, True)
    OmegaConf.set_struct(merged.model, False)  # checked against the method's own schema below
    layers = [_read_yaml(path) for path in config_files or []]
    if from_run_folder:
        for layer in layers:
            _refuse_interpolations(OmegaConf.to_container(layer, resolve=False), config_files[0])
            if isinstance(layer.get("eval"), DictConfig) and "plugins" in layer.eval:
                layer.eval.plugins = []  # modules are imported only when the current command line names them
    layers.append(_parse_overrides(overrides or []))
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except oc_errors.OmegaConfBaseException as error:
            raise _wrap_omegaconf(error) from None
    # Run folders written before train.activation_checkpointing existed hold the VQ-GAN's own
    # model.checkpoint_blocks: read it as the train flag, so their configs still load.
    if merged.model.get("checkpoint_blocks") is not None and merged.model.pop("checkpoint_blocks"):
        merged.train.activation_checkpointing = True
    merged.model = _validated_model_section(merged.model)
    # YAML 1.1 reads a bare `off` as false (and `on` as true); `log.wandb=off` must mean "off".
    merged.log.wandb = {"False": "off", "false": "off", "True": "online", "true": "online"}.get(
        merged.log.wandb, merged.log.wandb
    )
    # `train.precision=no`
    merged.train.precision = {"False": "no", "false": "no"}.get(merged.train.precision, merged.train.precision)
    _validate(merged, check_data)
    OmegaConf.set_readonly(merged, True)
    return merged


def _validated_model_section(model_section: Any) -> DictConfig:
    # here: the registry imports torch and every model; only validating a model section needs it
    from facegen_dist.methods import METHODS

    if not isinstance(model_section, (dict, DictConfig)) or "name" not in model_section:
        raise ConfigError(f"model.name: missing; one of {sorted(METHODS)}")
    name = model_section["name"]
    if name not in METHODS:
        raise ConfigError(f"model.name: unknown method '{name}'; one of {sorted(METHODS)}")
    schema = OmegaConf.structured(METHODS[name].config_class)
    OmegaConf.set_struct(schema, True)
    try:
        return OmegaConf.merge(schema, model_section)
    except oc_errors.OmegaConfBaseException as error:
        raise _wrap_omegaconf(error, prefix="model") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate(cfg: DictConfig, check_data: bool = True) -> None:
    train, data, optim = cfg.train, cfg.data, cfg.optim
    _require(
        train.precision in ("auto", "no", "fp16", "bf16"),
        f"train.precision: '{train.precision}' is not one of auto, no, fp16, bf16",
    )
    _require(train.total_images > 0, "train.total_images: must be > 0")
    _require(train.batch_size > 0, "train.batch_size: must be > 0")
    _require(train.grad_accum > 0, "train.grad_accum: must be > 0")
    _require(train.keep_checkpoints > 0, "train.keep_checkpoints: must be > 0")
    _require(
        train.exact_allreduce in ("auto", "on", "off"),
        f"train.exact_allreduce: '{train.exact_allreduce}' is not one of auto, on, off",
    )
    _require(
        train.dead_run_steps >= 0, "train.dead_run_steps: must be >= 0 (0 = never stop a run for non-finite steps)"
    )
    _require(train.cpu_threads >= 0, "train.cpu_threads: must be >= 0 (0 = cores / local processes)")
    for key in ("log_every_images", "sample_every_images", "ckpt_every_images"):
        _require(train[key] > 0, f"train.{key}: must be > 0")
    _require(0.0 <= train.ema_beta < 1.0, "train.ema_beta: must be in [0, 1)")
    _require(train.grad_clip >= 0, "train.grad_clip: must be >= 0 (0 disables clipping)")
    _require(
        optim.schedule in ("constant", "cosine"), f"optim.schedule: '{optim.schedule}' is not one of constant, cosine"
    )
    _require(len(optim.betas) == 2, "optim.betas: needs two values, e.g. [0.9, 0.999]")
    _require(0 < optim.lr <= 10, f"optim.lr: {optim.lr:g} is not an AdamW learning rate (expected 0 < lr <= 10)")
    _require(
        data.resolution >= 8 and data.resolution & (data.resolution - 1) == 0,
        f"data.resolution: {data.resolution} is not a power of two >= 8",
    )
    _require(data.num_workers >= 0, "data.num_workers: must be >= 0")
    _require(data.shuffle_group >= 1, "data.shuffle_group: must be >= 1")
    _require(
        cfg.eval.num_samples >= 2 and cfg.eval.batch_size >= 1, "eval.num_samples must be >= 2 and eval.batch_size >= 1"
    )
    _require(cfg.eval.every_images >= 0, "eval.every_images: must be >= 0 (0 = off)")
    _require(
        cfg.log.wandb in ("online", "offline", "off"),
        f"log.wandb: '{cfg.log.wandb}' is not one of online, offline, off",
    )
    _require(
        bool(cfg.run.name) and "/" not in cfg.run.name and cfg.run.name not in (".", ".."),
        f"run.name: '{cfg.run.name}' must be a plain folder name inside run.dir",
    )
    if data.path.startswith(EMBEDDED_PREFIX):
        name = data.path[len(EMBEDDED_PREFIX) :]
        _require(
            name in EMBEDDED_DATASETS,
            f"data.path: unknown embedded dataset '{name}'; one of {sorted(EMBEDDED_DATASETS)}",
        )
        _require(
            data.make_num >= 2 and data.make_size >= 8, "data.make_num/make_size: too small for an embedded dataset"
        )
    elif check_data:
        manifest = Path(data.path) / "manifest.json"
        _require(
            manifest.is_file(),
            f"data.path: no shards at '{data.path}' (no manifest.json there); make them with "
            f"{_shard_command(data.path, data.resolution)} or use data.path=embedded:avatars",
        )


def _shard_command(path: str, resolution: int) -> str:
    """The `facegen data` line that makes the shards a config's data.path names (by the name of its folder)."""
    name = Path(path).name.lower()
    if "ffhq" in name:
        return f"`facegen data ffhq --src <FFHQ images1024x1024/ or its zip> --size {resolution} --out {path}`"
    if "cartoon" in name:
        return f"`facegen data cartoonset --src <cartoonset10k/ or .tgz> --size {resolution} --out {path}`"
    return f"`facegen data folder --src <your images> --size {resolution} --out {path}` (or `facegen data avatars`)"


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
