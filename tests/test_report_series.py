"""Which logged keys the report draws as training curves (fast: no training)."""

from pathlib import Path

from facegen_dist.analysis.report import RunFacts, loss_series, y_scale


def _run(rows):
    return RunFacts(
        name="r",
        path=Path("."),
        method="gpt_prior",
        resolution=64,
        parameters={},
        summary={},
        rows=rows,
        evals=[],
        history=[],
    )


def test_prior_nll_is_a_training_curve():
    rows = [
        {"images_seen": 3200, "nll": 4.58, "bits_per_code": 6.61, "lr": 1e-3},
        {"images_seen": 6400, "nll": 3.10, "bits_per_code": 4.47, "lr": 9e-4},
    ]
    assert loss_series(_run(rows)) == {"nll": [(3200, 4.58), (6400, 3.10)]}


def test_losses_of_each_phase_and_not_eval_or_telemetry():
    rows = [
        {"images_seen": 16, "generator/loss": 0.5, "generator/vq_loss": 0.01, "generator/mse": 0.02, "eval/loss": 9.0},
        {"images_seen": 32, "generator/loss": 0.4, "discriminator/d_loss": 1.9, "generator/adaptive_weight": 0.1},
    ]
    series = loss_series(_run(rows))
    assert series == {
        "discriminator/d_loss": [(32, 1.9)],
        "generator/loss": [(16, 0.5), (32, 0.4)],
        "generator/vq_loss": [(16, 0.01)],
    }


def test_a_negative_loss_keeps_its_line():
    # The VQ-GAN's hinge g_loss (-D(x_rec)) is negative once D is fooled; on a log axis it vanished.
    assert y_scale({"generator/loss": [(16, 0.5)], "generator/g_loss": [(16, -0.3)]}, log_y=True) == "symlog"
    assert y_scale({"generator/loss": [(16, 0.5)], "generator/vq_loss": [(16, 0.01)]}, log_y=True) == "log"
    assert y_scale({"psnr": [(16, 20.0)]}, log_y=False) == "linear"
