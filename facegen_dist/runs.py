"""A finished run's folder: its layout, restoring its modules for inference, and methods built on such a run.

`runs/<name>/` holds config.yaml, checkpoints/ckpt-N/ (their format: facegen_dist.checkpoints), samples/,
eval/, summary.json and metrics.jsonl. A prior trains on a finished VQ run: `build_method` restores the run
its method names and hands it in, so methods themselves read no files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, load_model, save_file

from facegen_dist.checkpoints import checkpoint_problem, latest_checkpoint, load_ema_state, read_trainer_state
from facegen_dist.config import load_run_config
from facegen_dist.errors import ConfigError, FacegenError
from facegen_dist.methods import Method
from facegen_dist.methods import build_method as registered_method  # the registry lookup, no upstream run

CONFIG_FILE = "config.yaml"  # the merged config the run trained with
CHECKPOINTS_DIR = "checkpoints"
EVAL_DIR = "eval"  # facegen eval's records
# An export (facegen export): config.yaml, one weights file, export.json, a model card, upstream/ for a prior.
EXPORT_FILE = "export.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_UPSTREAM = "upstream"


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
    method = registered_method(model_cfg, resolution)
    upstream = method.upstream_run()
    if upstream is not None:
        run_dir, checkpoint_name = upstream
        try:
            restored = restore_run(run_dir, checkpoint_name=checkpoint_name)
        except FacegenError as error:
            raise ConfigError(f"model.vq_run: {error}") from None
        method.use_upstream(restored)
        method.upstream = restored  # what an export of this run carries along
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
    if (run_dir / EXPORT_FILE).is_file():
        return _restore_export(run_dir, overrides or [], device)
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


def _restore_export(folder: Path, overrides: list[str], device) -> RestoredRun:
    """An export folder as a restored run: its weights are the EMA (or raw) weights it was made from."""
    info = json.loads((folder / EXPORT_FILE).read_text())
    if info.get("format") != EXPORT_FORMAT:
        raise FacegenError(f"--run {folder}: export format {info.get('format')}, this version reads {EXPORT_FORMAT}")
    if (folder / EXPORT_UPSTREAM).is_dir():  # a prior's VQ model travels inside its export
        overrides = [f"model.vq_run={folder / EXPORT_UPSTREAM}", *overrides]
    cfg = load_run_config(folder / CONFIG_FILE, overrides, check_data=False)
    method = build_method(cfg.model, cfg.data.resolution)
    modules = method.build_modules()
    state = load_file(str(folder / EXPORT_WEIGHTS))
    for name, module in modules.items():
        module.load_state_dict(
            {key[len(name) + 1 :]: value for key, value in state.items() if key.startswith(f"{name}.")}
        )
    for module in modules.values():
        module.to(device).eval().requires_grad_(False)
    return RestoredRun(folder, cfg, method, modules, Path(info["checkpoint"]), info["images_seen"], info["ema"])


EXPORT_FORMAT = 1


def export_run(run_dir: str | Path, out: str | Path, checkpoint_name: str = "") -> Path:
    """Write run `run_dir`'s newest (or named) checkpoint as an export: EMA weights in one safetensors file, the
    resolved config, export.json and a model card; a prior's VQ run exported into out/upstream. Returns `out`."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FacegenError(f"--out {out}: exists and is not empty")
    _write_export(restore_run(run_dir, checkpoint_name=checkpoint_name), out)
    for path in out.rglob("*"):
        if path.is_file():
            path.chmod(0o644)  # shared: readable by a group, a Hub upload, another user
    return out


def _write_export(restored: RestoredRun, out: Path) -> None:
    """One export folder; a prior's VQ run (restored with it) written the same way into out/upstream."""
    out.mkdir(parents=True, exist_ok=True)
    upstream = restored.method.upstream
    if upstream is not None:
        _write_export(upstream, out / EXPORT_UPSTREAM)
    weights = {
        f"{name}.{key}": value.contiguous()
        for name, module in restored.modules.items()
        for key, value in module.state_dict().items()
    }
    save_file(weights, str(out / EXPORT_WEIGHTS), metadata={"format": str(EXPORT_FORMAT)})
    config = OmegaConf.to_container(restored.cfg, resolve=True)
    if upstream is not None:  # the VQ model is upstream/ (read relative to the export), no checkpoint of it
        config["model"].update(vq_run=EXPORT_UPSTREAM, vq_checkpoint="")
    (out / CONFIG_FILE).write_text(OmegaConf.to_yaml(config))
    info = {
        "format": EXPORT_FORMAT,
        "method": restored.cfg.model.name,
        "source_run": str(restored.run_dir.resolve()),
        "checkpoint": restored.checkpoint.name,
        "images_seen": restored.images_seen,
        "ema": restored.ema,
        "upstream": EXPORT_UPSTREAM if upstream is not None else None,
    }
    (out / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    (out / "README.md").write_text(model_card(restored, info, _latest_eval(restored.run_dir)))


def _latest_eval(run_dir: Path) -> dict | None:
    records = sorted((run_dir / EVAL_DIR).glob("0*.json")) if (run_dir / EVAL_DIR).is_dir() else []
    return json.loads(records[-1].read_text()) if records else None


def model_card(restored: RestoredRun, info: dict, evaluation: dict | None) -> str:
    """README.md of an export: what it is, what it was trained on and for how long, its metrics with their protocol."""
    cfg = restored.cfg
    params = sum(p.numel() for m in restored.modules.values() for p in m.parameters())
    lines = [
        f"# {cfg.run.name}: {cfg.model.name}",
        "",
        f"- method: `{cfg.model.name}`, {params / 1e6:.2f} M parameters ({', '.join(restored.modules)})",
        f"- data: `{cfg.data.path}` at {cfg.data.resolution} px",
        f"- trained: {info['images_seen']} images (checkpoint `{info['checkpoint']}`), "
        f"{'EMA' if info['ema'] else 'raw'} weights",
        f"- from: `{info['source_run']}`" + (f"; its VQ model is in `{EXPORT_UPSTREAM}/`" if info["upstream"] else ""),
        "",
        "```python",
        "import facegen_dist",
        "model = facegen_dist.load('THIS_FOLDER')",
        "images = model.sample(16, seed=0)" if restored.method.can_sample() else "codes = model.encode(images)",
        "```",
        "",
        "## Metrics",
        "",
    ]
    if evaluation is None:
        lines.append("No `facegen eval` record in the source run.")
    else:
        protocol = evaluation["protocol"]
        lines += ["| metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.6g} |" for name, value in sorted(evaluation["metrics"].items())]
        lines += [
            "",
            f"Protocol: {protocol['num_generated']} samples vs {protocol['num_reference']} reference images, "
            f"extractor `{protocol.get('extractor', {}).get('name', 'pixels')}`, seed {protocol['seed']}, "
            f"at {protocol['model'].get('images_seen')} images; sampling {json.dumps(protocol.get('sampling', {}))}.",
        ]
    lines += ["", "The resolved training config is `config.yaml`."]
    return "\n".join(lines) + "\n"
