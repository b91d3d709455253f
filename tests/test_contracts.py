"""The Method contract, in process and fast, for every registered method: what the loop, sampling, eval and the
checkpoints rely on. The multi-process tests check the same methods for real; these name the broken promise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import COMMON, TINY, TINY_DCGAN, TINY_INTROVAE, TINY_VQGAN, TINY_VQVAE2, train_in_process
from safetensors.torch import load_model, save_model

from facegen_dist import methods
from facegen_dist.config import load_config
from facegen_dist.methods import METHODS, MicroBatch
from facegen_dist.runs import RestoredRun

TINY_MODELS = {
    "ae": [*TINY, "model.name=ae"],
    "vae": [*TINY, "model.name=vae"],
    "vqvae": [*TINY_VQVAE2, "model.name=vqvae"],
    "vqvae2": TINY_VQVAE2,
    "vqgan": TINY_VQGAN,
    "dcgan": TINY_DCGAN,
    "introvae": TINY_INTROVAE,
}
# A prior's tiny settings, and the VQ method whose (untrained, in-memory) run it is handed.
TINY_PRIORS = {
    "pixelcnn_prior": ("vqvae2", ["model.channels=16", "model.layers=2", "model.kernel_size=3"]),
    "gpt_prior": ("vqgan", ["model.layers=1", "model.heads=2", "model.width=32"]),
}
ALL_METHODS = sorted([*TINY_MODELS, *TINY_PRIORS])
RESOLUTION = 32


def test_every_registered_method_is_in_this_contract():
    assert set(METHODS) == set(ALL_METHODS)


def _upstream_run(vq_name: str) -> RestoredRun:
    """What facegen_dist.runs hands a prior: a restored VQ run, here freshly built in memory instead of read."""
    cfg = load_config([], TINY_MODELS[vq_name])
    method = methods.build_method(cfg.model, RESOLUTION)
    torch.manual_seed(1)
    modules = {name: module.eval().requires_grad_(False) for name, module in method.build_modules().items()}
    return RestoredRun(Path("in-memory"), cfg, method, modules, Path("ckpt-000000000000"), 0, False)


def _method(name: str):
    if name in TINY_PRIORS:
        vq_name, overrides = TINY_PRIORS[name]
        cfg = load_config([], [*COMMON, f"model.name={name}", "model.vq_run=in-memory", *overrides])
        method = methods.build_method(cfg.model, RESOLUTION)
        assert method.upstream_run() == ("in-memory", "")
        method.use_upstream(_upstream_run(vq_name))
    else:
        cfg = load_config([], TINY_MODELS[name])
        method = methods.build_method(cfg.model, RESOLUTION)
        assert method.upstream_run() is None
    method.prepare_training()
    torch.manual_seed(0)
    return cfg, method, method.build_modules()


def _images(num: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(num, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(seed))


def _every_phase_on(cfg) -> int:
    """An images-seen count past every phase's start (a discriminator's, IntroVAE's adversarial one)."""
    return max(int(getattr(cfg.model, key, 0) or 0) for key in ("disc_start_images", "vae_images")) + 1


@pytest.mark.parametrize("name", ALL_METHODS)
def test_phases_name_existing_modules_once(name, one_intra_op_thread):
    _, method, modules = _method(name)
    phases = method.phases()
    assert len({p.name for p in phases}) == len(phases)
    owned = [module for phase in phases for module in phase.modules]
    assert set(owned) <= set(modules) and len(owned) == len(set(owned))  # no module stepped by two optimizers
    assert set(method.ema_modules()) <= set(modules)


@pytest.mark.parametrize("name", ALL_METHODS)
def test_each_phase_gives_a_finite_loss_and_gradients_for_its_own_modules(name, one_intra_op_thread):
    cfg, method, modules = _method(name)
    for module in modules.values():
        module.train()
    batch = method.prepare(MicroBatch(_every_phase_on(cfg), images=_images()))
    for phase in method.phases():
        assert method.phase_active(phase.name, batch.images_seen)
        for module in modules.values():
            module.zero_grad(set_to_none=True)
        loss, stats = method.loss(phase.name, modules, batch)
        assert loss.dim() == 0 and torch.isfinite(loss), (phase.name, loss)
        assert stats and all(torch.isfinite(torch.as_tensor(v, dtype=torch.float32)).all() for v in stats.values())
        loss.backward()
        grads = [p.grad for m in phase.modules for p in modules[m].parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{phase.name}: no gradient reached its modules"


@pytest.mark.parametrize("name", ALL_METHODS)
def test_reconstruct_and_sample_have_image_shapes_and_a_seed_repeats_samples(name, one_intra_op_thread):
    _, method, modules = _method(name)
    for module in modules.values():
        module.eval()
    images = _images()
    reconstruction = method.reconstruct(modules, images)
    assert reconstruction is None or reconstruction.shape == images.shape
    if method.can_sample():
        first = method.sample(modules, 3, torch.Generator().manual_seed(1))
        again = method.sample(modules, 3, torch.Generator().manual_seed(1))
        assert first.shape == (3, 3, RESOLUTION, RESOLUTION) and torch.equal(first, again)
        assert isinstance(method.sampling_protocol(), dict) and method.sampling_protocol()
    else:
        assert method.sample(modules, 3, torch.Generator().manual_seed(1)) is None


@pytest.mark.parametrize("name", ALL_METHODS)
def test_state_dicts_round_trip_through_safetensors(name, tmp_path, one_intra_op_thread):
    """What a checkpoint holds rebuilds the same modules: outputs equal after loading into fresh ones."""
    _, method, modules = _method(name)
    images = _images()
    for module in modules.values():
        module.train()
    method.loss(method.phases()[0].name, modules, method.prepare(MicroBatch(10**9, images=images)))  # codebooks init
    torch.manual_seed(123)
    rebuilt = method.build_modules()  # other random weights
    for index, (key, module) in enumerate(modules.items()):
        save_model(module, str(tmp_path / f"model_{index}.safetensors"))
        load_model(rebuilt[key], str(tmp_path / f"model_{index}.safetensors"))
    for group in (modules, rebuilt):
        for module in group.values():
            module.eval()
    first, second = method.reconstruct(modules, images), method.reconstruct(rebuilt, images)
    if first is not None:
        assert torch.equal(first, second)
    if method.can_sample():
        assert torch.equal(
            method.sample(modules, 2, torch.Generator().manual_seed(5)),
            method.sample(rebuilt, 2, torch.Generator().manual_seed(5)),
        )


@pytest.mark.parametrize("name", ["vqgan", "introvae"])
def test_a_later_phase_refuses_a_batch_the_earlier_phase_did_not_see(name, one_intra_op_thread):
    cfg, method, modules = _method(name)
    later = method.phases()[1].name
    with pytest.raises(RuntimeError, match="before the"):
        method.loss(later, modules, method.prepare(MicroBatch(_every_phase_on(cfg), images=_images())))


def test_the_trainer_in_process_trains_checkpoints_and_resumes_exactly(tiny_shards, tmp_path, in_process_accelerator):
    """The loop itself on one process: a run stopped at 64 images and continued to 96 ends where a straight run does."""
    straight = train_in_process(tiny_shards, tmp_path / "straight", 96)
    assert straight["world_size"] == 1 and straight["images_seen"] == 96 and straight["steps"] == 12
    assert (tmp_path / "straight" / "summary.json").is_file()
    first = train_in_process(tiny_shards, tmp_path / "resumed", 64)
    assert first["images_seen"] == 64
    resumed = train_in_process(tiny_shards, tmp_path / "resumed", 96)
    assert resumed["images_seen"] == 96 and resumed["steps"] == 12
    assert resumed["parameter_checksums"] == straight["parameter_checksums"]
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in rows] == [r["images_seen"] for r in straight_rows] == [16, 32, 48, 64, 80, 96]
    assert [r["loss"] for r in rows] == [r["loss"] for r in straight_rows]


def test_checkpoint_files_are_readable_by_the_group_as_the_umask_allows(tiny_shards, tmp_path, in_process_accelerator):
    import os
    import stat

    train_in_process(tiny_shards, tmp_path / "shared", 32)
    umask = os.umask(0)
    os.umask(umask)  # read, then put back: the process's umask is what the files should follow
    (checkpoint,) = (tmp_path / "shared" / "checkpoints").iterdir()
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in checkpoint.iterdir()}
    assert "model.safetensors" in modes and "ema_autoencoder.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_the_readme_python_snippet_runs_on_a_trained_run(tiny_shards, tmp_path, in_process_accelerator):
    """The README's "From Python" block, run as written on a run folder trained here (its path swapped in)."""
    import re

    train_in_process(tiny_shards, tmp_path / "vae_avatars64", 16)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## From Python.*?\n```python\n(.*?)```", readme, re.S).group(1)
    assert 'facegen_dist.load("runs/vae_avatars64")' in block
    scope: dict = {}
    exec(block.replace("runs/vae_avatars64", str(tmp_path / "vae_avatars64")), scope)  # noqa: S102
    assert scope["samples"].shape == (16, 3, 32, 32) and 0 <= scope["samples"].min() <= scope["samples"].max() <= 1
    assert scope["reconstructions"].shape == scope["samples"].shape and scope["model"].run.images_seen == 16
    assert scope["latents"].shape == (16, 16)
