"""Faults a cluster brings, with real processes: elastic resume, damaged checkpoints, crafted run folders, dead runs, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, _env, accelerate_command, kill9_tree, read_metrics, run_facegen, run_train
from safetensors.torch import load_file, save_file

from facegen_dist.train.checkpoint import write_manifest

pytestmark = pytest.mark.slow

RUN_ARGS = [*TINY, "train.log_every_images=16", "train.ckpt_every_images=64", "train.sample_every_images=100000"]
NEWEST, PREVIOUS = "ckpt-000000000256", "ckpt-000000000192"


def _ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


def _one_line_error(result, *fragments):
    """Exit 2 and exactly one error line (no traceback) holding every fragment."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("facegen: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_shards) -> Path:
    """runs/r: the tiny VAE, 1 process, 256 images, checkpoints at 128, 192, 256 (keep 3)."""
    root = tmp_path_factory.mktemp("reliability")
    _ok(run_train(root, *RUN_ARGS, f"data.path={tiny_shards}", "run.name=r", "train.total_images=256"))
    assert sorted(p.name for p in (root / "runs/r/checkpoints").iterdir()) == ["ckpt-000000000128", PREVIOUS, NEWEST]
    return root


def _copy(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained / "runs", tmp_path / "runs")
    return tmp_path / "runs" / "r" / "checkpoints"


def _rerun(tmp_path, tiny_shards, *extra, total=320):
    return run_train(
        tmp_path, *RUN_ARGS, f"data.path={tiny_shards}", "run.name=r", f"train.total_images={total}", *extra
    )


def _nan_weights(folder: Path) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    weights = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(weights, str(folder / "model.safetensors"))
    write_manifest(folder, 256)  # a manifest that matches: only the finite-weights check can catch it


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = os.urandom(64)
    path.write_bytes(bytes(data))


DAMAGE = {
    "model truncated": lambda c: os.truncate(c / "model.safetensors", (c / "model.safetensors").stat().st_size // 2),
    "model header overwritten": lambda c: c.joinpath("model.safetensors").write_bytes(
        b"\xff" * 16 + c.joinpath("model.safetensors").read_bytes()[16:]
    ),
    "random bytes inside the model": lambda c: _flip_middle(c / "model.safetensors"),
    "optimizer deleted": lambda c: (c / "optimizer.bin").unlink(),
    "garbage optimizer": lambda c: c.joinpath("optimizer.bin").write_bytes(
        os.urandom((c / "optimizer.bin").stat().st_size)
    ),
    "EMA deleted": lambda c: (c / "ema_autoencoder.safetensors").unlink(),
    "RNG states deleted": lambda c: (c / "random_states_0.pkl").unlink(),
    "trainer state garbage": lambda c: (c / "trainer_state.json").write_text("{not json"),
    "trainer state empty object": lambda c: (c / "trainer_state.json").write_text("{}"),
    "manifest deleted": lambda c: (c / "manifest.json").unlink(),
    "NaN weights behind a valid manifest": _nan_weights,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_with_one_line_and_the_previous_one_resumes(
    trained, tiny_shards, tmp_path, damage
):
    checkpoints = _copy(trained, tmp_path)
    DAMAGE[damage](checkpoints / NEWEST)
    result = _rerun(tmp_path, tiny_shards)
    _ok(result)
    skipped = [line for line in result.stderr.splitlines() if "skipped:" in line and NEWEST in line]
    assert len(skipped) == 1, result.stderr[-3000:]
    assert f"resumed from runs/r/checkpoints/{PREVIOUS} at 192 images" in result.stderr
    summary = json.loads((checkpoints.parent / "summary.json").read_text())
    assert summary["images_seen"] == 320 and summary["skipped_steps"] == 0


def test_no_sound_checkpoint_stops_with_one_line_instead_of_starting_over(trained, tiny_shards, tmp_path):
    checkpoints = _copy(trained, tmp_path)
    for folder in checkpoints.iterdir():
        for file in folder.iterdir():
            file.unlink()  # every folder emptied
    result = _rerun(tmp_path, tiny_shards)
    _one_line_error(result, "none of its 3 checkpoints can be resumed", "move the folder away")
    assert (
        not (checkpoints.parent / "summary.json").exists()
        or json.loads((checkpoints.parent / "summary.json").read_text())["images_seen"] == 256
    )


def test_an_interrupted_deletion_or_write_never_counts(trained, tiny_shards, tmp_path):
    checkpoints = _copy(trained, tmp_path)
    os.replace(checkpoints / NEWEST, checkpoints / f".del-{NEWEST}")  # remove_checkpoint's first move, then killed
    shutil.copytree(checkpoints / PREVIOUS, checkpoints / ".tmp-ckpt-000000000999")
    result = _rerun(tmp_path, tiny_shards)
    _ok(result)
    assert f"resumed from runs/r/checkpoints/{PREVIOUS}" in result.stderr and "skipped:" not in result.stderr


def _marker_payload(marker: Path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return Payload()


def test_a_crafted_pickle_in_a_run_folder_does_not_run(trained, tiny_shards, tmp_path):
    checkpoints = _copy(trained, tmp_path)
    marker = tmp_path / "payload-ran"
    # A first-format checkpoint (EMA as accelerate's pickle) whose EMA file carries a payload.
    newest = checkpoints / NEWEST
    state = json.loads((newest / "trainer_state.json").read_text())
    state.pop("checkpoint_format")
    (newest / "trainer_state.json").write_text(json.dumps(state))
    (newest / "manifest.json").unlink()
    (newest / "ema_autoencoder.safetensors").unlink()
    torch.save({"ema_model.x": _marker_payload(marker)}, newest / "custom_checkpoint_0.pkl")
    # And a current-format checkpoint whose RNG file carries one, behind a manifest that matches it.
    previous = checkpoints / PREVIOUS
    torch.save({"random_state": _marker_payload(marker)}, previous / "random_states_0.pkl")
    write_manifest(previous, 192)
    result = _rerun(tmp_path, tiny_shards)
    _ok(result)
    assert not marker.exists(), "a pickle from the run folder ran code"
    assert f"checkpoint runs/r/checkpoints/{NEWEST} skipped: loading failed" in result.stderr


def test_a_run_folders_config_imports_no_plugin_and_resolves_no_environment(trained, tmp_path):
    shutil.copytree(trained / "runs", tmp_path / "runs")
    run = tmp_path / "runs" / "r"
    marker = tmp_path / "plugin-ran"
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "evil_plugin.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("plugins: []", "plugins:\n  - evil_plugin"))
    env_path = {"PYTHONPATH": f"{plugins}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for command in (
        ["sample", "--run", str(run), "--num", "4", "--batch-size", "4", "--out", str(tmp_path / "s.png")],
        ["eval", "--run", str(run), "--metrics", "psnr", "--num", "8"],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "facegen_dist.cli", *command],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env={**_env(), **env_path},
            timeout=300,
        )
        _ok(result)
        assert not marker.exists(), f"facegen {command[0]} imported a plugin named only in the run folder"

    (run / "config.yaml").write_text(config.replace("name: r\n", "name: ${oc.env:HOME}\n", 1))
    result = run_facegen(
        tmp_path, "sample", "--run", str(run), "--num", "4", "--batch-size", "4", "--out", str(tmp_path / "s.png")
    )
    _one_line_error(result, "interpolation", "run.name")


def test_a_dead_run_stops_non_zero_and_leaves_the_good_checkpoints(trained, tiny_shards, tmp_path):
    checkpoints = _copy(trained, tmp_path)
    before = sorted(p.name for p in checkpoints.iterdir())
    result = _rerun(
        tmp_path,
        tiny_shards,
        "train.dead_run_steps=10",
        f"debug.inject_nan_at_steps=[{','.join(map(str, range(32, 64)))}]",
        total=512,
    )
    _one_line_error(result, "dead run: the last 10 steps were all non-finite", NEWEST, "untouched")
    assert sorted(p.name for p in checkpoints.iterdir()) == before


def test_loaded_weights_that_are_all_non_finite_stop_with_one_line(trained, tiny_shards, tmp_path):
    checkpoints = _copy(trained, tmp_path)
    for folder in checkpoints.iterdir():
        _nan_weights(folder)
        state = json.loads((folder / "trainer_state.json").read_text())
        write_manifest(folder, state["images_seen"])
    result = _rerun(tmp_path, tiny_shards)
    _one_line_error(result, "none of its 3 checkpoints can be resumed", "NaN/inf")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("run.name=..", "run.name"),
        ("run.name=.", "run.name"),
        ("optim.lr=1e39", "optim.lr"),
        ("model.channels=[8,16,16,32,64]", "autoencoder."),  # another width on resume: the changed keys are named
    ],
)
def test_bad_input_gives_one_line_naming_the_key(trained, tiny_shards, tmp_path, override, fragment):
    _copy(trained, tmp_path)
    result = _rerun(tmp_path, tiny_shards, override)
    _one_line_error(result, fragment)
    assert not (tmp_path / "runs" / "config.yaml").exists() and not (tmp_path / "config.yaml").exists()


def test_a_yaml_whose_top_level_is_a_list_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- run\n- data\n")
    result = run_train(tmp_path, "--config", str(bad))
    _one_line_error(result, str(bad), "top level must be a mapping")


def test_launcher_precision_that_disagrees_with_the_config_is_refused(tiny_shards, tmp_path):
    result = run_train(
        tmp_path,
        *RUN_ARGS,
        f"data.path={tiny_shards}",
        "train.precision=fp16",
        "train.total_images=64",
        launcher=True,
        mixed_precision="bf16",
    )
    # Our one line comes first; `accelerate launch` with one process then adds its own CalledProcessError traceback.
    errors = [line for line in result.stderr.splitlines() if line.startswith("facegen: error:")]
    assert (
        result.returncode != 0
        and len(errors) == 1
        and "train.precision=fp16" in errors[0]
        and "--mixed_precision bf16" in errors[0]
    )


def test_zero_sample_counts_in_a_manifest_are_refused_not_hung(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["num_samples"] = 0
    (shards / "manifest.json").write_text(json.dumps(manifest))
    result = run_train(tmp_path, *RUN_ARGS, f"data.path={shards}", "train.total_images=64", timeout=120)
    _one_line_error(result, "sample count of 0")


# ---- elastic resume ---------------------------------------------------------------------------


def _kill9_when(launch: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists() and launch.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert launch.poll() is None, "training ended before the test could kill it:\n" + launch.stdout.read()[-3000:]
    kill9_tree(launch)


def _start(cwd: Path, num_processes: int, *args: str) -> subprocess.Popen:
    command = (
        accelerate_command(num_processes, *args)
        if num_processes > 1
        else [sys.executable, str(REPO / "train.py"), *args]
    )
    return subprocess.Popen(
        command,
        cwd=cwd,
        env=_env(),
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_elastic_resume_1_to_2_to_1_processes_with_a_batch_change_trains_exactly_the_budget(tiny_shards, tmp_path):
    args = [
        *TINY,
        f"data.path={tiny_shards}",
        "run.name=e",
        "train.total_images=500",
        "train.log_every_images=16",
        "train.ckpt_every_images=128",
        "train.sample_every_images=100000",
    ]
    checkpoints = tmp_path / "runs" / "e" / "checkpoints"
    _kill9_when(_start(tmp_path, 1, *args), checkpoints / "ckpt-000000000128")  # 1 process x batch 8
    second = _start(tmp_path, 2, *args)  # 2 processes x batch 8: 16 images a step
    _kill9_when(second, checkpoints / "ckpt-000000000256")
    log = second.stdout.read()
    assert "resumed from" in log and "ckpt-000000000128 at 128 images" in log and "data layout changed" in log, log[
        -3000:
    ]
    # 1 process x batch 16: 16 images a step, another layout again
    third = run_train(tmp_path, *args, "train.batch_size=16")
    _ok(third)
    assert "ckpt-000000000256 at 256 images" in third.stderr and "1 x 1 x 16 x 4" in third.stderr

    summary = json.loads((checkpoints.parent / "summary.json").read_text())
    assert 500 <= summary["images_seen"] < 500 + 16, summary["images_seen"]  # the budget, to within one step
    rows = read_metrics(checkpoints.parent)
    seen = [row["images_seen"] for row in rows]
    assert seen == sorted(set(seen)) and seen[-1] == summary["images_seen"]  # no row twice, none out of order
    worlds = [row["world_size"] for row in rows]
    assert worlds[0] == 1 and 2 in worlds and worlds[-1] == 1
    # the loss goes on where it was at each change of layout (no restart from scratch)
    for index in range(1, len(rows)):
        if worlds[index] != worlds[index - 1]:
            assert rows[index]["loss"] < 1.5 * rows[index - 1]["loss"], (rows[index - 1], rows[index])
    assert all(math.isfinite(row["loss"]) for row in rows)
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]


def test_a_full_disk_says_so_in_one_line_and_the_same_command_resumes_after_space_is_freed(tiny_shards, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    # ~1.1 MB per tiny checkpoint: the first fits, the second does not.
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1200k", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip()}): needs root")
    try:
        args = [
            *RUN_ARGS,
            f"data.path={tiny_shards}",
            f"run.dir={disk}",
            "run.name=d",
            "train.total_images=256",
            "log.num_grid_images=4",
        ]
        result = run_train(tmp_path, *args)
        _one_line_error(result, f"no space left on {disk}/d/checkpoints", "ckpt-000000000064 is intact")
        assert sorted(p.name for p in (disk / "d" / "checkpoints").iterdir()) == ["ckpt-000000000064"]
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        again = run_train(tmp_path, *args)
        _ok(again)
        assert "resumed from" in again.stderr and "ckpt-000000000064 at 64 images" in again.stderr
        assert json.loads((disk / "d" / "summary.json").read_text())["images_seen"] == 256
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_deepspeed_config_dropped_by_accelerate_use_cpu_is_refused(tiny_shards, tmp_path):
    command = accelerate_command(2, *RUN_ARGS, f"data.path={tiny_shards}", "train.total_images=64", strategy="ds_zero2")
    result = subprocess.run(command, cwd=tmp_path, env=_env(use_cpu=True), capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("facegen: error:")]
    assert result.returncode != 0 and errors and "unset ACCELERATE_USE_CPU" in errors[0], result.stderr[-3000:]
    assert not (tmp_path / "runs" / "vae_avatars64" / "summary.json").exists()


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.latent_dim=-3", "model.latent_dim: -3 must be > 0"),
        ("model.latent_dim=0", "model.latent_dim: 0 must be > 0"),
        ("data.resolution=16", "data.resolution must be a multiple of 32"),
        ("model.channels=[8,8,8,8,8,8,8]", "model.channels: 7 entries"),
    ],
)
def test_bad_model_settings_give_one_line(tiny_shards, tmp_path, override, fragment):
    result = run_train(
        tmp_path, *RUN_ARGS, f"data.path={tiny_shards}", "run.name=bad", "train.total_images=64", override
    )
    _one_line_error(result, fragment)


def test_overrides_may_stand_on_both_sides_of_config(tiny_shards, tmp_path):
    config = REPO / "configs" / "vae_avatars64.yaml"
    result = run_train(
        tmp_path,
        "train.total_images=64",
        "--config",
        str(config),
        *RUN_ARGS,
        f"data.path={tiny_shards}",
        "run.name=mixed",
    )
    _ok(result)
    assert json.loads((tmp_path / "runs" / "mixed" / "summary.json").read_text())["images_seen"] == 64


def test_the_exact_gradient_hook_raises_when_its_gather_fails_instead_of_averaging_an_unfilled_buffer(monkeypatch):
    """A peer lost mid-step: the gather's future carries the error; the hook must pass it on (it once averaged torch.empty)."""
    from facegen_dist.train import strategy

    class FailedGather:
        def get_future(self):
            future = torch.futures.Future()
            future.set_exception(RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:33467"))
            return future

    class Bucket:
        def buffer(self):
            return torch.ones(4)

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.distributed, "group", type("G", (), {"WORLD": object()}))
    for name in ("all_gather_single", "all_gather_into_tensor"):
        monkeypatch.setattr(torch.distributed, name, lambda *args, **kwargs: FailedGather(), raising=False)
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        strategy._rank_order_mean(None, Bucket()).wait()


def test_a_lost_peer_is_one_line_and_other_runtime_errors_are_not_hidden():
    from facegen_dist.cli import _lost_peer

    gloo = RuntimeError(
        "[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:33467. "
        "This is typically caused by a remote worker crashing. Check the logs of the remote worker before reporting an error."
    )
    line = _lost_peer(gloo)
    assert line.startswith("rank 0: another training process is gone (Connection closed by peer [127.0.0.1]:33467)")
    assert "run the same command to resume" in line and "\n" not in line
    assert _lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (8x16 and 32x4)")) is None


def test_a_deepspeed_checkpoint_that_cannot_be_converted_gives_a_reason_and_leaves_nothing(tmp_path):
    from facegen_dist.train import universal_checkpoint

    folder = tmp_path / "ckpt-000000000128"
    (folder / "pytorch_model").mkdir(parents=True)  # no engine files in it
    out = tmp_path / ".universal" / folder.name
    reason = universal_checkpoint.convert(folder, out)
    assert reason and "\n" not in reason
    assert not out.exists() and sorted(p.name for p in folder.iterdir()) == ["pytorch_model"]
