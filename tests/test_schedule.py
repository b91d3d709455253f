import math

import pytest

from facegen_dist.schedule import lr_factor
from facegen_dist.train.loop import _crossed


def test_warmup_then_cosine_to_floor():
    total, warmup = 10_000, 1_000
    assert lr_factor(0, total, warmup, "cosine", 0.1) == pytest.approx(1 / warmup)
    assert lr_factor(warmup // 2, total, warmup, "cosine", 0.1) == pytest.approx(0.501)
    assert lr_factor(warmup, total, warmup, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor((total + warmup) // 2, total, warmup, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(total, total, warmup, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(5 * total, total, warmup, "cosine", 0.1) == pytest.approx(0.1)  # past the end: floor
    factors = [lr_factor(i, total, warmup, "cosine", 0.1) for i in range(warmup, total, 100)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def test_constant_after_warmup():
    assert lr_factor(50, 1000, 100, "constant", 0.1) == pytest.approx(0.51)
    assert all(lr_factor(i, 1000, 100, "constant", 0.1) == 1.0 for i in range(100, 2000, 50))


@pytest.mark.parametrize("per_step, interval", [(16, 480), (48, 100), (7, 7)])
def test_interval_fires_once_per_interval_whatever_the_step_size(per_step, interval):
    seen = [per_step * k for k in range(1, 200)]
    fired = [s for s in seen if _crossed(s, per_step, interval)]
    assert len(fired) == seen[-1] // interval
    assert all(math.floor(s / interval) > math.floor((s - per_step) / interval) for s in fired)
