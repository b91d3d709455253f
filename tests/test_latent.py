"""Latent-space study: its numbers by hand on toy latents, and `facegen latent` on a tiny trained AE, VAE and VQ-VAE2 (1 and 2 processes)."""

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY, TINY_VQVAE2, run_facegen, run_train
from PIL import Image

from facegen_dist.analysis import latent
from facegen_dist.analysis.latent import (
    StudyOptions,
    aggregate_moments,
    attribute_vector,
    choose_attribute_value,
    encode_split,
    interpolate,
    kl_to_standard_normal,
    knn_accuracy,
    latent_statistics,
    mahalanobis,
    pca,
    read_split_attributes,
    slerp,
    study_run,
    tsne,
)
from facegen_dist.cli import main
from facegen_dist.config import load_config
from facegen_dist.data.pipeline import read_images
from facegen_dist.data.shards import split_shards
from facegen_dist.errors import ConfigError
from facegen_dist.methods.autoencoder import AutoencoderMethod
from facegen_dist.methods.vqvae import NO_GAUSSIAN_PRIOR
from facegen_dist.runs import build_method, restore_run

VIEWS = ("reconstruction", "latent_map", "generation", "interpolation", "attribute_vector")
LATENT = ["--num", "38", "--batch-size", "8", "--attr", "accessory"]  # the tiny val split has 38 images
RUNS = {"vae": [*TINY, "model.name=vae"], "ae": [*TINY, "model.name=ae"], "vq": TINY_VQVAE2}


def test_attribute_vector_is_the_mean_with_minus_the_mean_without():
    latents = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [2.0, 2.0], [4.0, 0.0]])
    values = ["round", "round", "none", "none", "kurt"]
    vector, num_with, num_without = attribute_vector(latents, values, "round")
    # with: (1,0), (3,2) -> (2, 1); without: (0,4), (2,2), (4,0) -> (2, 2)
    assert vector.tolist() == [0.0, -1.0] and (num_with, num_without) == (2, 3)


def test_attribute_value_is_the_most_common_other_than_none_and_bad_values_fail():
    values = ["none"] * 5 + ["round"] * 2 + ["kurt"] * 2 + ["eyepatch"]
    assert choose_attribute_value(values, "accessory", None) == "kurt"  # tied with round: alphabetical
    assert choose_attribute_value(values, "accessory", "eyepatch") == "eyepatch"
    with pytest.raises(ConfigError, match="--attr-value crown: no image has accessory=crown"):
        choose_attribute_value(values, "accessory", "crown")
    with pytest.raises(ConfigError, match="--attr accessory"):
        choose_attribute_value(["none", "none"], "accessory", None)
    with pytest.raises(ConfigError, match="--attr accessory"):
        choose_attribute_value(["round", "round"], "accessory", "round")  # nobody without it: no difference


def test_kl_of_the_aggregate_posterior_gaussian_fit_by_hand():
    a, b = math.sqrt(1.5), math.sqrt(3.0)
    codes = torch.tensor([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b]], dtype=torch.float64)
    mean, covariance = aggregate_moments(codes, None)  # sample covariance: sums of squares / 3 -> diag(1, 2)
    assert torch.allclose(covariance, torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))
    assert kl_to_standard_normal(mean, covariance) == pytest.approx(0.5 * (1 + 2 - 2 - math.log(2)))
    # A VAE adds the mean posterior variance (0.5 here) and a shifted mean adds |mu|^2 / 2.
    mean, covariance = aggregate_moments(
        codes + torch.tensor([1.0, 0.0], dtype=torch.float64), torch.full((4, 2), math.log(0.5))
    )
    assert kl_to_standard_normal(mean, covariance) == pytest.approx(0.5 * (1.5 + 2.5 + 1 - 2 - math.log(1.5 * 2.5)))
    assert kl_to_standard_normal(*aggregate_moments(torch.randn(3, 5), None)) is None  # fewer codes than dimensions
    prior = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    assert kl_to_standard_normal(*aggregate_moments(prior, None)) < 0.01


def test_diagonal_fit_by_hand_and_no_full_fit_for_a_huge_latent(monkeypatch):
    a, b = math.sqrt(1.5), math.sqrt(3.0)
    codes = torch.tensor([[a, 0.0], [-a, 0.0], [0.0, b], [0.0, -b]], dtype=torch.float64) + torch.tensor(
        [1.0, 0.0], dtype=torch.float64
    )
    stats = latent_statistics(codes, None)  # diag(1, 2) around (1, 0): the full fit is diagonal too, so both agree
    assert stats["kl_diagonal_gaussian_fit"] == pytest.approx(0.5 * (1 + 2 + 1 - 2 - math.log(2)))
    assert (
        stats["kl_gaussian_fit"] == pytest.approx(stats["kl_diagonal_gaussian_fit"])
        and "kl_gaussian_fit_note" not in stats
    )
    assert latent_statistics(torch.randn(3, 5), None)["kl_gaussian_fit_note"].startswith(
        "singular covariance: 3 latents in 5 dims"
    )
    monkeypatch.setattr(latent, "MAX_FULL_FIT_DIMS", 1)
    stats = latent_statistics(codes, None)
    assert stats["kl_gaussian_fit"] is None and stats["kl_gaussian_fit_note"].startswith(
        "not computed: a full covariance of 2 dims"
    )
    assert stats["kl_diagonal_gaussian_fit"] == pytest.approx(0.5 * (1 + 2 + 1 - 2 - math.log(2)))


def test_mahalanobis_distance_by_hand():
    mean, covariance = torch.tensor([1.0, 0.0]), torch.diag(torch.tensor([4.0, 1.0]))
    distances = mahalanobis(torch.tensor([[3.0, 1.0], [1.0, 0.0]]), mean, covariance)
    assert torch.allclose(distances, torch.tensor([math.sqrt(2.0), 0.0], dtype=torch.float64))  # (2/2)^2 + (1/1)^2
    assert mahalanobis(torch.zeros(1, 2), mean, torch.zeros(2, 2)) is None


def test_knn_accuracy_with_its_majority_baseline():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    clustered = centres[labels] + 0.1 * torch.randn(60, 2, generator=generator)
    result = knn_accuracy(clustered, labels, k=5, test_fraction=0.5, seed=0)
    test = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:30]
    assert result["accuracy"] == 1.0 and (result["num_train"], result["num_test"], result["k"]) == (30, 30, 5)
    # class 0 is the largest
    assert result["majority_baseline"] == pytest.approx(float((labels[test] == 0).double().mean()))
    unrelated = knn_accuracy(torch.randn(60, 2, generator=generator), labels, k=5, seed=0)
    assert unrelated["accuracy"] < 0.8 and unrelated["majority_baseline"] == result["majority_baseline"]


def test_projection_is_deterministic_for_a_seed_and_its_signs_are_fixed():
    latents = torch.randn(300, 6, generator=torch.Generator().manual_seed(1)) * torch.tensor(
        [5.0, 2.0, 1.0, 1.0, 0.5, 0.1]
    )
    projected, ratio = pca(latents)
    assert torch.equal(projected, pca(latents.clone())[0])
    assert torch.allclose(pca(-latents)[0], -projected, atol=1e-5)  # same axes, not flipped ones
    assert ratio[0] > 0.75 and ratio[0] > ratio[1]
    embedded, record = tsne(latents, seed=0)
    try:
        from sklearn.manifold import TSNE  # noqa: F401
    except ImportError:
        assert embedded is None and "scikit-learn" in record["skipped"]
        return
    assert torch.equal(embedded, tsne(latents, seed=0)[0])


def test_projection_of_a_latent_wider_than_tall_matches_the_svd():
    latents = torch.randn(40, 300, generator=torch.Generator().manual_seed(2)) * torch.linspace(3.0, 0.1, 300)
    projected, ratio = pca(latents)
    centered = latents.double() - latents.double().mean(0)
    _, singular, vh = torch.linalg.svd(centered, full_matrices=False)
    axes = vh[:2] * torch.sign(vh[:2].gather(1, vh[:2].abs().argmax(1, keepdim=True)))
    assert torch.allclose(projected, (centered @ axes.T).float(), atol=1e-4)
    assert torch.allclose(ratio, (singular[:2].pow(2) / singular.pow(2).sum()).float())


def test_slerp_keeps_the_norm_and_hits_both_ends():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])
    path = interpolate(a, b, 5, spherical=True)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    assert torch.allclose(path.norm(dim=1), torch.full((5,), 3.0))
    assert torch.allclose(path[2], torch.tensor([3 / math.sqrt(2), 3 / math.sqrt(2), 0.0]))
    assert torch.allclose(interpolate(a, b, 5, spherical=False)[2], torch.tensor([1.5, 1.5, 0.0]))
    # parallel: straight line
    assert torch.allclose(slerp(a, 2 * a, torch.tensor([0.5])), torch.tensor([[4.5, 0.0, 0.0]]))


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, tiny_shards):
    """runs/vae, runs/ae and runs/vq (a VQ-VAE2), each trained for 320 images."""
    root = tmp_path_factory.mktemp("latentruns")
    for name, overrides in RUNS.items():
        result = run_train(root, *overrides, f"data.path={tiny_shards}", f"run.name={name}", "train.total_images=320")
        assert result.returncode == 0, result.stderr[-3000:]
    return root


def _latent(root, out, *args, runs=("vae", "ae"), num_processes=1):
    run_args = [arg for name in runs for arg in ("--run", f"runs/{name}")]
    return run_facegen(root, "latent", *run_args, "--out", str(out), *LATENT, *args, num_processes=num_processes)


def test_latent_writes_every_view_for_an_ae_and_a_vae(trained_runs, tmp_path):
    result = _latent(trained_runs, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for view in VIEWS:
        with Image.open(tmp_path / f"{view}.png") as image:
            assert image.width > 300 and image.height > 200, view
    record = json.loads((tmp_path / "latent.json").read_text())
    vae, ae = record["runs"]
    assert (vae["model"], ae["model"]) == ("vae", "ae") and vae["images_seen"] == 320 and vae["ema"] is True
    assert (vae["interpolation"]["kind"], ae["interpolation"]["kind"]) == ("slerp", "linear")
    for run in (vae, ae):
        assert set(VIEWS) <= set(run)
        assert len(run["reconstruction"]["per_image"]["psnr"]) == 38 and 5 < run["reconstruction"]["psnr_mean"] < 60
        latent_map = run["latent_map"]
        assert latent_map["dim"] == 16 and len(latent_map["per_dim_mean"]) == len(latent_map["per_dim_std"]) == 16
        assert 0 <= latent_map["knn"]["accuracy"] <= 1 and 0 < latent_map["knn"]["majority_baseline"] <= 1
        assert latent_map["kl_gaussian_fit"] > 0 and run["attribute_vector"]["value"] != "none"
        assert run["interpolation"]["endpoint_max_abs_diff"] < 1e-5
        assert run["generation"]["mahalanobis_code_median"] > 0 and run["generation"]["mahalanobis_prior_median"] > 0
    assert "posterior_kl_mean" in vae["latent_map"] and "posterior_kl_mean" not in ae["latent_map"]
    if "skipped" in vae["latent_map"]["tsne"]:
        assert "t-SNE skipped" in result.stdout
    assert record["protocol"]["attr"] == "accessory" and "wrote" in result.stdout


def test_a_vq_run_alone_and_beside_a_vae_studies_its_pre_quantisation_latent(trained_runs, tmp_path):
    for runs in (("vq",), ("vae", "vq")):
        out = tmp_path / "+".join(runs)
        result = _latent(trained_runs, out, runs=runs)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        for view in VIEWS:
            with Image.open(out / f"{view}.png") as image:
                assert image.width > 300 and image.height > 200, view
        record = json.loads((out / "latent.json").read_text())
        vq = record["runs"][-1]
        assert vq["model"] == "vqvae2" and set(VIEWS) <= set(vq)
        # A VQ model's prior is its PixelCNN: prior samples are not drawn, and the record says so.
        assert vq["generation"] == {"skipped": NO_GAUSSIAN_PRIOR} and "no N(0, I) prior" in NO_GAUSSIAN_PRIOR
        assert "prior samples: none (no N(0, I) prior)" in result.stdout
        latent_map = vq["latent_map"]
        # top 4x4 + bottom 8x8 grids of 8-d latents (embed_dim=8, downsample=4 at 32 px)
        assert (
            latent_map["dim"] == 640
            and len(latent_map["per_dim_std"]) == 640
            and latent_map["latent"].endswith("= 640 dims")
        )
        assert latent_map["kl_gaussian_fit"] is None and latent_map["kl_gaussian_fit_note"].startswith(
            "singular covariance: 38 latents in 640 dims"
        )
        assert latent_map["kl_diagonal_gaussian_fit"] > 0 and 0 <= latent_map["knn"]["accuracy"] <= 1
        assert 5 < vq["reconstruction"]["psnr_mean"] < 60 and vq["attribute_vector"]["value"] != "none"
        assert vq["interpolation"]["kind"] == "linear" and vq["interpolation"]["endpoint_max_abs_diff"] < 1e-5
        if "vae" in runs:
            vae = record["runs"][0]
            assert vae["generation"]["latent"] == "z ~ N(0, I)" and vae["generation"]["mahalanobis_prior_median"] > 0
            assert vae["latent_map"]["kl_gaussian_fit"] > 0 and vae["interpolation"]["kind"] == "slerp"


def test_interpolation_and_attribute_rows_start_from_the_reconstructions(trained_runs, tiny_shards):
    shards = split_shards(tiny_shards, "val")
    images, _ = read_images(shards, 16, 32)
    values = [attributes["accessory"] for attributes in read_split_attributes(shards, 38)]
    one_process = SimpleNamespace(num_processes=1, process_index=0, is_main_process=True, device=torch.device("cpu"))
    for name in RUNS:
        restored = restore_run(trained_runs / "runs" / name)
        model = restored.method.latent_model(restored.modules)
        encoded = encode_split(one_process, model, tiny_shards, "val", 38, 8, 32, "encoding")
        numbers, pictures = study_run(model, encoded, images, values, StudyOptions(attr="accessory"))
        reconstructions = restored.method.reconstruct(restored.modules, images.float() / 255)
        rows, pairs = pictures["interpolation"], numbers["interpolation"]["pairs"]
        assert torch.allclose(rows[:, 0], reconstructions[[a for a, _ in pairs]], atol=1e-5)
        assert torch.allclose(rows[:, -1], reconstructions[[b for _, b in pairs]], atol=1e-5)
        unchanged = pictures["attribute_vector"][:, numbers["attribute_vector"]["strengths"].index(0.0)]
        assert torch.allclose(unchanged, reconstructions[numbers["attribute_vector"]["faces"]], atol=1e-5)


@pytest.mark.parametrize("name", ["vqvae", "vqvae2"])
def test_vq_latent_is_the_pre_quantisation_latent_and_decodes_to_the_reconstruction(name):
    cfg = load_config(overrides=[*TINY_VQVAE2, f"model.name={name}"])
    method = build_method(cfg.model, cfg.data.resolution)
    modules = method.build_modules()
    model = modules["vqvae"].eval()
    latent_model = method.latent_model(modules)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    buffers = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        latents, logvar = latent_model.encode(images)
        levels = model.encode_latents(images)
        decoded = latent_model.decode(latents)
        nudged = latent_model.decode(
            latents + 1e-6 * torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
        )
    assert logvar is None and latents.shape == (4, sum(level.flatten(1).shape[1] for level in levels.values()))
    # every level, in order
    assert torch.equal(latents, torch.cat([levels[level].flatten(1) for level in model.levels], 1))
    assert torch.allclose(decoded, method.reconstruct(modules, images), atol=1e-6)
    assert torch.equal(nudged, decoded)  # decode snaps to the nearest codes: a small move lands on the same ones
    # no codebook update, no EMA
    assert all(torch.equal(value, buffers[key]) for key, value in model.state_dict().items())


def test_bad_input_is_one_line(trained_runs, tmp_path):
    no_checkpoint = tmp_path / "fresh"
    no_checkpoint.mkdir()
    shutil.copy(trained_runs / "runs" / "ae" / "config.yaml", no_checkpoint)
    for args, expected in [
        (["--run", str(no_checkpoint)], f"--run {no_checkpoint}: no checkpoint"),
        (["--run", "runs/vae", "--attr", "wings"], "--attr wings: the data of runs/vae"),
        (["--run", "runs/vae", "--attr", "accessory", "--attr-value", "crown"], "--attr-value crown"),
    ]:
        result = run_facegen(
            trained_runs, "latent", *args, "--out", str(tmp_path / "out"), "--num", "38", "--batch-size", "8"
        )
        errors = [line for line in result.stderr.splitlines() if line.startswith("facegen: error:")]
        assert (
            result.returncode == 2 and len(errors) == 1 and expected in errors[0] and "Traceback" not in result.stderr
        ), result.stderr


def test_a_method_without_a_continuous_latent_is_named(trained_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(AutoencoderMethod, "latent_model", lambda self, modules: None)
    monkeypatch.chdir(trained_runs)
    assert main(["latent", "--run", "runs/ae", "--out", str(tmp_path), *LATENT]) == 2
    assert "facegen: error: --run runs/ae: model 'ae' has no continuous latent" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("runs", [("vae", "ae"), ("vq",)], ids="+".join)
def test_one_and_two_processes_write_the_same_latent_json(trained_runs, tmp_path, runs):
    one = _latent(trained_runs, tmp_path / "one", runs=runs)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _latent(trained_runs, tmp_path / "two", runs=runs, num_processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 1  # the main process alone writes and reports
    assert json.loads((tmp_path / "one" / "latent.json").read_text()) == json.loads(
        (tmp_path / "two" / "latent.json").read_text()
    )
    assert all((tmp_path / "two" / f"{view}.png").is_file() for view in VIEWS)
