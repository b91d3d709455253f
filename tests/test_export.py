"""facegen export and facegen_dist.load: a run's weights travel as one folder and load back to the same model."""

from __future__ import annotations

import stat

import pytest
import torch
from helpers import COMMON, TINY_VQVAE2, run_facegen, train_in_process

import facegen_dist
from facegen_dist.errors import FacegenError
from facegen_dist.runs import export_run

VQ = [*TINY_VQVAE2, "model.name=vqvae"]


@pytest.fixture
def vq_and_prior(tiny_shards, tmp_path, in_process_accelerator):
    """A tiny one-grid VQ-VAE and a GPT prior on its codes, both trained here in process (16 images each)."""
    vq = tmp_path / "runs" / "vq"
    train_in_process(tiny_shards, vq, 16, model=VQ)
    prior = tmp_path / "runs" / "prior"
    gpt = [*COMMON, "model.name=gpt_prior", f"model.vq_run={vq}", "model.layers=1", "model.heads=2", "model.width=32"]
    train_in_process(tiny_shards, prior, 16, model=gpt)
    return vq, prior


def test_an_exported_vae_loads_to_the_same_model_as_its_run(tiny_shards, tmp_path, in_process_accelerator):
    run = tmp_path / "runs" / "vae"
    train_in_process(tiny_shards, run, 32)
    out = export_run(run, tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.yaml", "export.json", "README.md"}
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    card = (out / "README.md").read_text()
    assert card.startswith("# vae: vae") and "32 images" in card and "No `facegen eval` record" in card
    from_run, from_export = facegen_dist.load(run), facegen_dist.load(out)
    assert from_export.run.images_seen == 32 and from_export.run.ema
    assert torch.equal(from_run.sample(4, seed=3), from_export.sample(4, seed=3))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(from_run.reconstruct(images), from_export.reconstruct(images))
    latents = from_export.encode(images)
    assert latents.shape == (2, 16) and from_export.decode(latents).shape == images.shape
    sampled = run_facegen(tmp_path, "sample", "--run", str(out), "--num", "4", "--out", str(tmp_path / "grid.png"))
    assert sampled.returncode == 0 and (tmp_path / "grid.png").is_file(), sampled.stderr[-2000:]


def test_an_exported_prior_carries_its_vq_model_and_samples_the_same(vq_and_prior, tmp_path):
    vq, prior = vq_and_prior
    out = export_run(prior, tmp_path / "prior-export")
    assert (out / "upstream" / "model.safetensors").is_file() and (out / "upstream" / "export.json").is_file()
    from_run, from_export = facegen_dist.load(prior), facegen_dist.load(out)
    assert torch.equal(from_run.sample(3, seed=1), from_export.sample(3, seed=1))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    codes = from_export.encode(images)
    assert set(codes) == {"bottom"} and codes["bottom"].dtype == torch.long
    vq_model = facegen_dist.load(vq)
    assert torch.equal(vq_model.encode(images)["bottom"], codes["bottom"])
    assert torch.allclose(vq_model.decode(codes), vq_model.reconstruct(images).clamp(0, 1), atol=1e-6)
    with pytest.raises(FacegenError, match="draws no samples"):
        vq_model.sample(2)


def test_export_refuses_a_folder_that_holds_files(tiny_shards, tmp_path, in_process_accelerator):
    run = tmp_path / "runs" / "vae"
    train_in_process(tiny_shards, run, 16)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    result = run_facegen(tmp_path, "export", "--run", str(run), "--out", str(tmp_path / "taken"))
    assert (
        result.returncode == 2
        and result.stderr.strip() == f"facegen: error: --out {tmp_path / 'taken'}: exists and is not empty"
    )
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
