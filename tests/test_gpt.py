import math

import pytest
import torch

from facegen_dist.models.gpt import CodeGPT, flatten_codes
from facegen_dist.models.pixelcnn import top_p_filter

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _model(seed=0, dtype=torch.float32, **kwargs) -> CodeGPT:
    torch.manual_seed(seed)
    kwargs = {"num_codes": 11, "seq_len": 12, "n_layer": 2, "n_head": 2, "n_embd": 16, **kwargs}
    return CodeGPT(**kwargs).to(dtype)


def _sample(model, seed, **kwargs):
    return model.sample(3, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("num_classes", [0, 4])
def test_shapes_and_grid_loss(num_classes):
    model = _model(num_classes=num_classes)
    cond = torch.tensor([0, 3]) if num_classes else None
    grid = torch.randint(0, 11, (2, 3, 4))
    logits = model(flatten_codes(grid), cond)
    assert logits.shape == (2, 12, 11) and logits.dtype == torch.float32
    assert torch.equal(flatten_codes(grid)[:, 4:8], grid[:, 1])  # raster order: row by row
    assert torch.allclose(model.loss(grid, cond), model.loss(flatten_codes(grid), cond))
    assert model(flatten_codes(grid)[:, :5], cond).shape == (2, 5, 11)  # shorter sequences too


def test_num_params_and_init():
    model = _model(n_layer=4, n_embd=32, n_head=4)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    embeddings = (11 + 12) * 32 + 32  # token, position, start
    assert model.num_params(non_embedding=True) == model.num_params() - embeddings
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.003
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001


@pytest.mark.parametrize("num_classes", [0, 3])
def test_no_future_leakage(num_classes):
    """Changing code t changes logits after t (they predict later codes) and never logits at positions <= t."""
    model = _model(dtype=torch.float64, num_classes=num_classes)
    codes = torch.randint(0, 11, (2, 12))
    cond = torch.tensor([1, 2]) if num_classes else None
    with torch.no_grad():
        base = model(codes, cond)
        for t in range(12):
            other = codes.clone()
            other[:, t:] = (other[:, t:] + 1 + torch.randint(0, 10, other[:, t:].shape)) % 11  # all of t.. differ
            diff = (model(other, cond) - base).abs().amax(dim=(0, 2))
            assert diff[: t + 1].max() <= 1e-12, f"codes >= {t} leak into positions <= {t}"
            if t < 11:
                assert diff[t + 1 :].min() > 1e-8, f"codes >= {t} change no later position"


def test_class_changes_first_position():
    model = _model(dtype=torch.float64, num_classes=3)
    codes = torch.randint(0, 11, (2, 12))
    with torch.no_grad():
        diff = (model(codes, torch.tensor([0, 1])) - model(codes, torch.tensor([2, 1]))).abs().amax(dim=2)
    assert diff[0, 0] > 1e-6 and diff[0].min() > 1e-6  # class 0 -> 2 changes every position, the first included
    assert diff[1].max() == 0  # the other row kept its class


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes", [0, 4])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.8, 5, 0.9), (1.3, 0, 0.7)])
def test_cached_sampling_equals_uncached(dtype, num_classes, temperature, top_k, top_p):
    model = _model(dtype=dtype, num_classes=num_classes, dropout=0.1)  # dropout: sampling must switch it off
    cond = torch.tensor([0, 3, 3]) if num_classes else None
    kwargs = {"cond": cond, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    cached = _sample(model, 7, **kwargs)
    uncached = _sample(model, 7, use_cache=False, **kwargs)
    assert cached.shape == (3, 12) and cached.dtype == torch.long
    assert torch.equal(cached, uncached)
    assert model.training  # restored after sampling
    assert 0 <= cached.min() and cached.max() < 11 and cached.unique().numel() > 1
    assert not torch.equal(cached, _sample(model, 8, **kwargs))
    if top_k:  # every code drawn is among the top_k logits at its position
        with torch.no_grad():
            logits = model.eval()(cached, cond)
        kth = logits.topk(top_k, dim=2).values[..., -1]
        assert (logits.gather(2, cached[..., None])[..., 0] >= kth).all()


def test_cached_logits_equal_full_forward():
    """Teacher-forced through the cache, every step's logits match one full forward."""
    model = _model(num_classes=3).eval()
    codes = torch.randint(0, 11, (2, 12))
    cond = torch.tensor([2, 0])
    steps = []

    def teacher(logits):
        steps.append(logits)
        return codes[:, len(steps) - 1]

    with torch.no_grad():
        assert torch.equal(model._decode_cached(2, model.cond_embedding(cond, 2), cond, teacher), codes)
        assert torch.allclose(torch.stack(steps, dim=1), model(codes, cond), atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_cache", [True, False])
def test_top_k_one_is_greedy(use_cache):
    model = _model(num_classes=2)
    cond = torch.tensor([0, 1, 1])
    a = _sample(model, 0, cond=cond, top_k=1, use_cache=use_cache)
    assert torch.equal(a, _sample(model, 1, cond=cond, top_k=1, use_cache=use_cache))
    greedy = torch.zeros(3, 12, dtype=torch.long)
    with torch.no_grad():
        for t in range(12):
            greedy[:, t] = model(greedy[:, : t + 1], cond)[:, t].argmax(dim=1)
    assert torch.equal(a, greedy)


def test_top_p_filter_keeps_smallest_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.25, 0.125, 0.075]])  # sorted: 0.5, 0.25, 0.125, 0.075, 0.05
    scores = probs.log()

    def kept(top_p):
        return top_p_filter(scores, top_p)[0].isfinite().tolist()

    assert kept(0.5) == [False, True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [False, True, True, False, False]
    assert kept(0.75) == [False, True, True, False, False]  # 0.5 + 0.25 reaches 0.75 exactly
    assert kept(0.8) == [False, True, True, True, False]
    assert kept(0.01) == [False, True, False, False, False]  # the top code is always kept
    assert kept(1.0) == [True] * 5
    assert torch.equal(top_p_filter(scores, 0.8)[0, 1:4], scores[0, 1:4])  # kept scores are untouched
    # Rows are filtered independently, in any order of the codes.
    two = torch.stack([scores[0], scores[0].flip(0)])
    assert top_p_filter(two, 0.6).isfinite().tolist() == [kept(0.6), kept(0.6)[::-1]]


def test_loss_at_init_and_learning():
    torch.manual_seed(0)
    model = _model(num_codes=16, seq_len=16, n_embd=32, num_classes=2)
    codes = torch.randint(0, 16, (8, 16))
    cond = torch.arange(8) % 2
    first = model.loss(codes, cond).item()
    assert abs(first - math.log(16)) < 0.1  # uniform predictions at init: ln(num_codes) nats per code
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        loss = model.loss(codes, cond)
        loss.backward()
        optimizer.step()
    assert model.loss(codes, cond).item() < 0.25 * first


def test_bf16_autocast():
    model = _model(num_classes=3)
    codes = torch.randint(0, 11, (2, 12))
    cond = torch.tensor([0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(codes, cond)
        assert model(codes, cond).dtype == torch.bfloat16
        samples = _sample(model, 0, cond=torch.tensor([0, 1, 2]), top_p=0.9, top_k=4)
    assert loss.dtype == torch.float32 and abs(loss.item() - model.loss(codes, cond).item()) < 0.1
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
    assert samples.shape == (3, 12) and 0 <= samples.min() and samples.max() < 11


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"cond": torch.tensor([0, 1, 3])}, r"class ids must be in \[0, 3\)"),
        ({"cond": torch.tensor([0, -1, 2])}, r"class ids must be in \[0, 3\)"),
        ({"cond": None}, "class-conditional"),
        ({"cond": torch.tensor([0, 1])}, "cond must be int64 class ids of shape"),
    ],
)
def test_bad_sample_arguments(kwargs, match):
    model = _model(num_classes=3)
    kwargs = {"cond": torch.tensor([0, 1, 2]), **kwargs}
    with pytest.raises(ValueError, match=match):
        _sample(model, 0, **kwargs)


def test_bad_forward_arguments():
    model = _model(num_classes=3)
    cond = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"sequence length must be in \[1, seq_len=12\], got 13"):
        model(torch.zeros(2, 13, dtype=torch.long), cond)
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 3\)"):
        model.loss(torch.zeros(2, 12, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"codes must be \[B, T\]"):
        model(torch.zeros(2, 3, 4, dtype=torch.long), cond)
    with pytest.raises(ValueError, match="unconditional"):
        _model()(torch.zeros(2, 12, dtype=torch.long), cond)
    with pytest.raises(ValueError, match="multiple of n_head"):
        CodeGPT(11, 12, n_layer=1, n_head=3, n_embd=16)


@pytest.mark.parametrize(
    "override, match",
    [
        ("model.top_p=1.5", r"model.top_p \(--top-p\) is 1.5: must be in \(0, 1\]"),
        ("model.temperature=0", r"model.temperature \(--temperature\) is 0(.0)?: must be > 0"),
        ("model.top_k=-2", r"model.top_k \(--top-k\) is -2: must be >= 0"),
    ],
)
def test_bad_sampling_config_names_the_flag(override, match):
    # Checked before the VQ run is read, so a missing vq_run folder does not mask it.
    from helpers import REPO

    from facegen_dist.config import load_config
    from facegen_dist.errors import ConfigError
    from facegen_dist.runs import build_method

    config = REPO / "configs" / "prior_vqgan_avatars64.yaml"
    cfg = load_config([str(config)], ["model.vq_run=runs/does-not-exist", override])
    with pytest.raises(ConfigError, match=match):
        build_method(cfg.model, cfg.data.resolution)
