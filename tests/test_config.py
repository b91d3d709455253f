import subprocess
import sys

import pytest
import yaml
from helpers import REPO, TRAIN_PY, run_facegen

from facegen_dist.config import load_config
from facegen_dist.errors import ConfigError


def test_yaml_then_overrides_win(tmp_path, tiny_shards):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"data:\n  path: {tiny_shards}\nmodel:\n  name: ae\n  latent_dim: 32\ntrain:\n  total_images: 100\n"
    )
    cfg = load_config([str(config)], ["train.total_images=200", "log.wandb=off"])
    assert cfg.model.name == "ae" and cfg.model.latent_dim == 32
    assert cfg.train.total_images == 200
    assert cfg.log.wandb == "off"  # YAML 1.1 would read a bare `off` as false
    assert list(cfg.model.channels) == [32, 64, 128, 256, 512]  # method schema defaults filled in


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.latnt_dim=3", "model.latnt_dim: unknown key"),
        ("trian.total_images=3", "trian: unknown key"),
        ("train.total_images=abc", "train.total_images:"),
        ("train.precision=fp8", "train.precision:"),
        ("model.name=stylegan9", "model.name: unknown method"),
        ("data.path=/no/such/shards", "data.path: no shards at '/no/such/shards'"),
        ("data.resolution=48", "data.resolution:"),
    ],
)
def test_bad_config_is_one_line(override, expected):
    with pytest.raises(ConfigError) as error:
        load_config([], [override])
    assert expected in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.latnt_dim=3", "model.latnt_dim"),
        ("train.batch_size=many", "train.batch_size"),
        ("data.path=/no/such/shards", "data.path"),
    ],
)
def test_cli_bad_config_exits_nonzero_with_one_line(tmp_path, override, key):
    result = subprocess.run(
        [sys.executable, TRAIN_PY, override], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("facegen: error: ") and key in lines[0]
    assert not (tmp_path / "runs").exists()


def test_missing_config_file_is_reported(tmp_path):
    result = subprocess.run(
        [sys.executable, TRAIN_PY, "--config", "nope.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_shipped_configs_load(tiny_shards):
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert configs, "no configs shipped"
    from facegen_dist.analysis.suite import load_suite
    from facegen_dist.methods import METHODS
    from facegen_dist.runs import build_method

    # suites of runs (facegen suite), not run configs
    suites = [path for path in configs if path.name.startswith("suite_")]
    assert suites
    for path in suites:
        suite = load_suite(str(path))  # its run configs exist; they are loaded below as configs/*.yaml
        assert suite["images"] > 0 and all(str(entry["config"]).startswith("configs/") for entry in suite["runs"])
    for path in [path for path in configs if path not in suites]:
        # VQ-GAN's LPIPS needs VGG16 weights this machine cannot download; loading them is tested in test_vqgan_models.py.
        perceptual = ["model.perceptual=tiny"] if "vqgan" in path.name and "prior" not in path.name else []
        cfg = load_config([str(path)], [f"data.path={tiny_shards}", *perceptual])
        assert cfg.model.name in METHODS
        # a prior needs its trained VQ run (tests/test_vq_train.py, test_vqgan_train.py)
        if cfg.model.name not in (
            "pixelcnn_prior",
            "gpt_prior",
        ):
            modules = build_method(cfg.model, cfg.data.resolution).build_modules()
            assert sum(p.numel() for m in modules.values() for p in m.parameters()) > 0, path.name


@pytest.mark.parametrize("value", [True, False])
def test_old_vqgan_runs_checkpoint_blocks_key_still_loads(tmp_path, tiny_shards, value):
    """Run folders from before train.activation_checkpointing hold model.checkpoint_blocks: sampling them must still work."""
    old = tmp_path / "config.yaml"
    old.write_text(f"data:\n  path: {tiny_shards}\nmodel:\n  name: vqgan\n  checkpoint_blocks: {str(value).lower()}\n")
    cfg = load_config([str(old)])
    assert cfg.train.activation_checkpointing is value and "checkpoint_blocks" not in cfg.model


def test_print_config_shows_the_resolved_config_without_needing_the_data(tmp_path):

    result = run_facegen(
        tmp_path, "train", "--config", str(REPO / "configs" / "vqgan_ffhq256.yaml"), "--print-config", "optim.lr=0.5"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["data"]["path"] == "data/ffhq256" and printed["optim"]["lr"] == 0.5
    assert printed["model"]["name"] == "vqgan" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("path", "command"),
    [
        ("data/ffhq256", "facegen data ffhq"),
        ("data/cartoonset256", "facegen data cartoonset"),
        ("mine", "facegen data folder"),
    ],
)
def test_missing_shards_name_the_command_that_makes_them(path, command):
    with pytest.raises(ConfigError, match=f"no shards at '{path}'.*`{command} --src .* --out {path}`"):
        load_config([], [f"data.path={path}"])
