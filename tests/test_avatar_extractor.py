"""The shipped avatar feature extractor: integrity, accuracy on fresh avatars, FD behaviour, P-invariance, bad files."""

import json
import math
import shutil

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from helpers import run_facegen

from facegen_dist.data.make_avatars import make_avatar_dataset
from facegen_dist.data.pipeline import attribute_labels, read_images
from facegen_dist.data.shards import file_sha256, split_shards
from facegen_dist.errors import FacegenError
from facegen_dist.eval.avatar_extractor import DEFAULT_WEIGHTS, NAME, load_attribute_net
from facegen_dist.eval.metrics import compute_feature_metric, feature_statistics
from facegen_dist.eval.train_extractor import attribute_accuracy


@pytest.fixture(scope="module")
def shipped():
    return load_attribute_net()


@pytest.fixture(scope="module")
def fresh_val(tmp_path_factory):
    """Avatars the extractor never saw (another seed), at the size it was trained on."""
    out = tmp_path_factory.mktemp("fresh") / "avatars"
    make_avatar_dataset(out, num=400, size=64, seed=4242, val_fraction=0.75, workers=2, progress=False)
    return read_images(split_shards(out, "val"), 300, 64)


def test_shipped_weights_match_their_manifest(shipped):
    net, manifest = shipped
    assert manifest["name"] == NAME and manifest["sha256"] == file_sha256(DEFAULT_WEIGHTS)
    assert DEFAULT_WEIGHTS.stat().st_size < 5 * 2**20
    assert manifest["feature_dim"] == net.feature_dim
    assert set(manifest["val_accuracy"]) == set(manifest["architecture"]["heads"])


def test_fresh_avatars_reach_the_manifest_accuracies(shipped, fresh_val):
    net, manifest = shipped
    images, attributes = fresh_val
    names = sorted(manifest["architecture"]["heads"])
    vocabulary = tuple((name, tuple(manifest["architecture"]["heads"][name])) for name in names)
    labels = torch.stack([torch.from_numpy(attribute_labels(a, vocabulary)) for a in attributes])
    accuracy = attribute_accuracy(net, images, labels, names)
    for index, name in enumerate(names):
        expected, count = manifest["val_accuracy"][name], int((labels[:, index] >= 0).sum())
        tolerance = 3 * math.sqrt(expected * (1 - expected) / count) + 0.02  # 3 sigma of a binomial on `count` images
        assert accuracy[name] >= expected - tolerance, (
            f"{name}: {accuracy[name]:.3f} on {count} fresh images, manifest {expected:.3f}"
        )


def test_fd_is_zero_on_itself_and_grows_with_blur(shipped, fresh_val):
    net, _ = shipped
    images = fresh_val[0]
    with torch.no_grad():
        reference = net.features(images)
    stats = feature_statistics(reference)

    def fd(batch):
        with torch.no_grad():
            return compute_feature_metric("fid", net.features(batch), None, stats, seed=0)["frechet_inception_distance"]

    assert abs(fd(images)) < 1e-3
    blurred = [
        fd(
            (TF.gaussian_blur(images.float() / 255, kernel_size=2 * int(3 * s) + 1, sigma=s) * 255)
            .round()
            .to(torch.uint8)
        )
        for s in (0.5, 1.0, 2.0)
    ]
    assert 0 < blurred[0] < blurred[1] < blurred[2], blurred


def test_corrupt_weights_give_one_line(tmp_path):
    broken = tmp_path / "avatar-v1.safetensors"
    shutil.copy(DEFAULT_WEIGHTS, broken)
    shutil.copy(DEFAULT_WEIGHTS.with_suffix(".json"), broken.with_suffix(".json"))
    data = bytearray(broken.read_bytes())
    data[len(data) // 2] ^= 0xFF
    broken.write_bytes(bytes(data))
    with pytest.raises(FacegenError, match="sha256") as error:
        load_attribute_net(broken)
    assert "\n" not in str(error.value)
    broken.write_bytes(b"not a safetensors file")  # a garbage file whose manifest hash was updated to match
    manifest = json.loads(broken.with_suffix(".json").read_text())
    manifest["sha256"] = file_sha256(broken)
    broken.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(FacegenError, match="cannot load"):
        load_attribute_net(broken)


def test_eval_cli_with_corrupt_weights_is_one_line(trained_run, tmp_path):
    broken = tmp_path / "w.safetensors"
    broken.write_bytes(DEFAULT_WEIGHTS.read_bytes()[:1000])
    shutil.copy(DEFAULT_WEIGHTS.with_suffix(".json"), broken.with_suffix(".json"))
    result = run_facegen(
        trained_run,
        "eval",
        "--run",
        "runs/tiny",
        "--extractor",
        "avatar",
        f"eval.extractor_weights={broken}",
        f"eval.cache_dir={tmp_path}",
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1 and "sha256" in lines[0], result.stderr


@pytest.mark.slow
def test_eval_with_avatar_extractor_same_for_one_and_two_processes(trained_run, tmp_path):
    args = [
        "eval",
        "--run",
        "runs/tiny",
        "--extractor",
        "avatar",
        "--num",
        "48",
        "eval.batch_size=16",
        f"eval.cache_dir={tmp_path}",
    ]
    one = run_facegen(trained_run, *args)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "fd_avatar" in one.stdout and "precision_avatar" in one.stdout
    first = json.loads(sorted((trained_run / "runs" / "tiny" / "eval").glob("0*-avatar-v1-48.json"))[-1].read_text())
    two = run_facegen(trained_run, *args, num_processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    second = json.loads(sorted((trained_run / "runs" / "tiny" / "eval").glob("0*-avatar-v1-48.json"))[-1].read_text())
    assert second["protocol"]["world_size"] == 2
    assert first["metrics"] == pytest.approx(second["metrics"], rel=1e-6)
    assert set(first["metrics"]) == {
        "fd_avatar",
        "kid_avatar",
        "kid_avatar_std",
        "precision_avatar",
        "recall_avatar",
        "f_score_avatar",
    }
    assert first["protocol"]["extractor"] == {
        "name": NAME,
        "weights_sha256": file_sha256(DEFAULT_WEIGHTS),
        "layers": {"fid": "features", "kid": "features", "prc": "features"},
    }


def test_auto_picks_avatar_on_avatar_data_without_inception(monkeypatch, tmp_path):
    from facegen_dist.config import load_config
    from facegen_dist.eval.extractors import INCEPTION, resolve_extractor_name

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached Inception here
    cfg = load_config([], [])
    assert cfg.eval.extractor == "auto"
    assert resolve_extractor_name(cfg.eval, "avatars") == NAME
    assert resolve_extractor_name(cfg.eval, "ffhq") == INCEPTION
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"x")
    assert resolve_extractor_name(load_config([], [f"eval.inception_weights={weights}"]).eval, "avatars") == INCEPTION


def test_extractor_train_writes_weights_and_a_manifest_that_load_back(tiny_shards, tmp_path):
    """`facegen extractor train` end to end on the tiny shards (a few steps): files, record, and a loadable net."""
    import json
    import stat

    from facegen_dist.eval.avatar_extractor import load_attribute_net

    out = tmp_path / "ext" / "avatar-test"
    args = ["extractor", "train", "--data", str(tiny_shards), "--out", str(out), "--size", "32"]
    result = run_facegen(tmp_path, *args, "--images", "64", "--batch-size", "16")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["training"]["images"] == 64 and record["dataset"]["val_samples"] == 38
    assert set(record["val_accuracy"]) == set(record["architecture"]["heads"]) and record["parameters"] > 0
    assert stat.S_IMODE(out.with_suffix(".safetensors").stat().st_mode) == 0o644
    net, manifest = load_attribute_net(out.with_suffix(".safetensors"))
    assert manifest["sha256"] == record["sha256"] and net(torch.rand(2, 3, 32, 32))[0].shape == (2, 192)
