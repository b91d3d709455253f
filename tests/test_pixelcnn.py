import math

import pytest
import torch

from facegen_dist.models.pixelcnn import GatedPixelCNN

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _model(seed=0, dtype=torch.float64, **kwargs) -> GatedPixelCNN:
    torch.manual_seed(seed)
    kwargs = {"num_codes": 10, "channels": 16, "num_layers": 4, "kernel_size": 3, **kwargs}
    return GatedPixelCNN(**kwargs).to(dtype)


def _changed(model, codes, i, j, cond=None):
    """|logits(codes with (i, j) replaced) - logits(codes)|, reduced over batch and classes: [H, W]."""
    other = codes.clone()
    other[:, i, j] = (other[:, i, j] + 1) % model.num_codes
    with torch.no_grad():
        return (model(other, cond) - model(codes, cond)).abs().amax(dim=(0, 1))


@pytest.mark.parametrize("grid", [8, 16])
@pytest.mark.parametrize("conditional", [False, True])
def test_shapes(grid, conditional):
    model = _model(dtype=torch.float32, num_codes=12, cond_codes=5 if conditional else 0)
    codes = torch.randint(0, 12, (3, grid, grid))
    cond = torch.randint(0, 5, (3, grid // 2, grid // 2)) if conditional else None
    logits = model(codes, cond)
    assert logits.shape == (3, 12, grid, grid) and logits.dtype == torch.float32
    loss = model.loss(codes, cond)
    assert loss.shape == () and math.isfinite(loss.item())
    if conditional:  # cond is used, everywhere (it is fully observed, so position (0, 0) sees it too)
        other = cond.clone()
        other[:, 0, 0] = (other[:, 0, 0] + 1) % 5
        assert (model(codes, other) - logits)[:, :, 0, 0].abs().max() > 1e-6
        with pytest.raises(ValueError, match="conditional"):
            model(codes)
        with pytest.raises(ValueError, match="cond must be"):
            model(codes, torch.randint(0, 5, (3, grid, grid)))
    else:
        with pytest.raises(ValueError, match="unconditional"):
            model(codes, torch.zeros(3, grid // 2, grid // 2, dtype=torch.long))


def test_bad_kernel_size():
    with pytest.raises(ValueError, match="odd"):
        GatedPixelCNN(8, channels=4, num_layers=2, kernel_size=4)


def test_loss_is_fp32_under_autocast():
    model = _model(dtype=torch.float32)
    codes = torch.randint(0, 10, (2, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(codes)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - model.loss(codes).item()) < 0.1


@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("conditional", [False, True])
def test_no_future_leakage(kernel_size, conditional):
    model = _model(kernel_size=kernel_size, cond_codes=4 if conditional else 0)
    codes = torch.randint(0, 10, (2, 8, 8))
    cond = torch.randint(0, 4, (2, 4, 4)) if conditional else None
    for i, j in [(0, 0), (2, 7), (3, 6), (5, 1), (7, 3)]:
        diff = _changed(model, codes, i, j, cond)
        raster = torch.arange(64).view(8, 8)
        not_after = raster <= i * 8 + j
        assert diff[not_after].max() <= 1e-10, f"({i}, {j}) leaks into an earlier position"
        assert diff[~not_after].max() > 1e-6, f"({i}, {j}) changes no later position"


def test_no_blind_spot():
    model = _model(num_layers=4, kernel_size=3)
    codes = torch.randint(0, 10, (2, 8, 8))
    i, j = 4, 4
    for di, dj in [(-1, 2), (0, -1), (-2, -2)]:  # up-right (the classic blind spot), left, up-left
        assert _changed(model, codes, i + di, j + dj)[i, j] > 1e-8, f"(i{di:+d}, j{dj:+d}) does not reach (i, j)"
    # With 4 layers of kernel 3, (4, 4) sees every earlier position of the 8x8 grid, and no later one.
    seen = torch.zeros(8, 8, dtype=torch.bool)
    for a in range(8):
        for b in range(8):
            seen[a, b] = bool(_changed(model, codes, a, b)[i, j] > 1e-8)
    earlier = torch.arange(64).view(8, 8) < i * 8 + j
    assert torch.equal(seen, earlier)


@pytest.mark.parametrize("kernel_size, num_layers", [(3, 3), (5, 2)])
@pytest.mark.parametrize("conditional", [False, True])
def test_fast_logits_equal_full_forward(kernel_size, num_layers, conditional):
    """Teacher-forced through the fast decoder, every position's logits match one full forward."""
    model = _model(
        dtype=torch.float32,
        channels=8,
        num_layers=num_layers,
        kernel_size=kernel_size,
        cond_codes=3 if conditional else 0,
    )
    codes = torch.randint(0, 10, (3, 6, 6))
    cond = torch.randint(0, 3, (3, 3, 3)) if conditional else None
    logits = torch.zeros(3, 10, 6, 6)

    def teacher(i, j, step_logits):
        logits[:, :, i, j] = step_logits
        return codes[:, i, j]

    assert torch.equal(model._decode(3, 6, 6, cond, teacher, fast=True), codes)
    with torch.no_grad():
        assert torch.allclose(logits, model(codes, cond), atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 3), (1.5, 0)])
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("kernel_size, num_layers", [(3, 3), (5, 2)])
def test_fast_sampling_equals_naive(temperature, top_k, conditional, kernel_size, num_layers):
    model = _model(
        dtype=torch.float32,
        channels=8,
        num_layers=num_layers,
        kernel_size=kernel_size,
        cond_codes=3 if conditional else 0,
    )
    cond = torch.randint(0, 3, (3, 3, 3)) if conditional else None
    samples = {
        fast: model.sample(
            3, 6, 6, cond, generator=torch.Generator().manual_seed(7), temperature=temperature, top_k=top_k, fast=fast
        )
        for fast in (True, False)
    }
    assert samples[True].shape == (3, 6, 6) and samples[True].dtype == torch.long
    assert torch.equal(samples[True], samples[False])
    assert 0 <= samples[True].min() and samples[True].max() < model.num_codes
    assert samples[True].unique().numel() > 1
    if top_k:  # every code drawn is among the top_k logits at its position
        logits = model(samples[True], cond)
        kth = logits.topk(top_k, dim=1).values[:, -1]
        assert (logits.gather(1, samples[True][:, None])[:, 0] >= kth).all()


def test_top_k_one_is_greedy_whatever_the_seed():
    model = _model(dtype=torch.float32, channels=8, num_layers=2)
    a = model.sample(2, 5, 5, generator=torch.Generator().manual_seed(0), top_k=1)
    b = model.sample(2, 5, 5, generator=torch.Generator().manual_seed(1), top_k=1)
    assert torch.equal(a, b)
    c = model.sample(2, 5, 5, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)


def test_learns_a_checkerboard():
    torch.manual_seed(0)
    num_codes, side = 4, 8
    board = (torch.arange(side)[:, None] + torch.arange(side)[None, :]) % 2
    phases = torch.stack([1 + board, 2 - board])  # codes 1 and 2, either phase
    data = phases.repeat(8, 1, 1)  # [16, 8, 8]
    model = GatedPixelCNN(num_codes, channels=16, num_layers=4, kernel_size=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(data).item()
    for _ in range(60):
        optimizer.zero_grad()
        loss = model.loss(data)
        loss.backward()
        optimizer.step()
    final = model.loss(data).item()
    assert first > 0.8 * math.log(num_codes)
    assert final < 0.1  # the floor is log(2) / 64 ~ 0.011: only the first code is a coin flip
    samples = model.sample(8, side, side, generator=torch.Generator().manual_seed(0), temperature=0.1)
    agreement = torch.maximum((samples == phases[0]).float().mean((1, 2)), (samples == phases[1]).float().mean((1, 2)))
    assert agreement.mean() > 0.95
