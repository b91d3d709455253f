"""A finished run's folder: its layout, restoring its modules for inference, and methods built on such a run.

`runs/<name>/` holds config.yaml, checkpoints/ckpt-N/ (their format: facegen_dist.checkpoints), samples/,
eval/, summary.json and metrics.jsonl. A prior trains on a finished VQ run: `build_method` restores the run
its method names and hands it in, so methods themselves read no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model

from facegen_dist import methods
from facegen_dist.checkpoints import checkpoint_problem, latest_checkpoint, load_ema_state, read_trainer_state
from facegen_dist.config import load_run_config
from facegen_dist.errors import ConfigError, FacegenError
from facegen_dist.methods import Method

CONFIG_FILE = "config.yaml"  # the merged config the run trained with
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"  # facegen eval's records


@dataclass
class RestoredRun:
    run_dir: Path
    cfg: object
    method: Method
    modules: dict[str, torch.nn.Module]
    checkpoint: Path
    images_seen: int
    ema: bool


def build_method(model_cfg, resolution: int) -> Method:
    """The method `model_cfg` names, ready to use: the finished run it builds on (a prior's VQ run), if any, handed in."""
    method = methods.build_method(model_cfg, resolution)
    upstream = method.upstream_run()
    if upstream is not None:
        run_dir, checkpoint_name = upstream
        try:
            restored = restore_run(run_dir, checkpoint_name=checkpoint_name)
        except FacegenError as error:
            raise ConfigError(f"model.vq_run: {error}") from None
        method.use_upstream(restored)
    return method


def restore_run(
    run_dir: str | Path,
    overrides: list[str] | None = None,
    device: torch.device | str = "cpu",
    use_ema: bool = True,
    checkpoint_name: str = "",
) -> RestoredRun:
    """The newest checkpoint of `run_dir` (or the one named), EMA weights where the method keeps them (unless use_ema=False)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FacegenError(f"--run {run_dir}: not a run folder (no config.yaml)")
    cfg = load_run_config(run_dir / CONFIG_FILE, overrides or [])
    if checkpoint_name:
        checkpoint = run_dir / CHECKPOINTS_DIR / checkpoint_name
        problem = checkpoint_problem(checkpoint, hashes=False)
        if problem:
            raise FacegenError(f"--run {run_dir}: checkpoint '{checkpoint_name}' is not usable: {problem}")
    else:
        checkpoint = latest_checkpoint(run_dir / CHECKPOINTS_DIR)
    if checkpoint is None:
        raise FacegenError(f"--run {run_dir}: no checkpoint yet")
    method = build_method(cfg.model, cfg.data.resolution)
    modules = method.build_modules()
    # accelerate's save_state names: model.safetensors, model_1.safetensors, ... in prepare() order.
    for index, module in enumerate(modules.values()):
        load_model(module, str(checkpoint / f"model{'' if index == 0 else f'_{index}'}.safetensors"), device="cpu")
    ema_names = method.ema_modules() if use_ema else ()
    for index, name in enumerate(ema_names):
        state = load_ema_state(checkpoint, name, index)
        prefix = "ema_model."
        modules[name].load_state_dict(
            {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        )
    for module in modules.values():
        module.to(device).eval().requires_grad_(False)
    return RestoredRun(
        run_dir, cfg, method, modules, checkpoint, read_trainer_state(checkpoint)["images_seen"], bool(ema_names)
    )
