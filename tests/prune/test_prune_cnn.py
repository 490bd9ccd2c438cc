"""Pruning a residual CNN: the residual stream, block widths and the head input, with BatchNorm."""

import copy

import pytest
import torch

from modelopt_lite.opt import get_modes
from modelopt_lite.prune import apply_prune_state, prune
from prune_models import build_cnn

CLASSES = 10


def _calib(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(n)]


def _sizes(model):
    """(residual width, [block widths], wide width), checking every linked layer agrees."""
    c = model.stem[0].out_channels
    assert model.stem[1].num_features == c and model.stem[1].running_mean.shape == (c,)
    widths = []
    for b in (model.block1, model.block2):
        m = b.conv1.out_channels
        assert b.conv1.weight.shape == (m, c, 3, 3) and b.bn1.weight.shape == (m,) and b.bn1.running_var.shape == (m,)
        assert b.conv2.weight.shape == (c, m, 3, 3) and b.bn2.num_features == c and b.bn2.bias.shape == (c,)
        widths.append(m)
    w = model.wide.out_channels
    assert model.wide.weight.shape == (w, c, 1, 1) and model.bn.weight.shape == (w,)
    assert model.head.weight.shape == (CLASSES, w)
    return c, widths, w


def _count(c, widths, w):
    n = 27 * c + 2 * c
    for m in widths:
        n += 9 * c * m + 2 * m + 9 * m * c + 2 * c
    return n + c * w + w + 2 * w + w * CLASSES + CLASSES


@pytest.fixture(scope="module", params=["activation", "weight"])
def pruned(request):
    ref = build_cnn()
    model, report = prune(copy.deepcopy(ref), {"params": "55%"}, _calib(1), request.param, round_to=2,
                          return_report=True)
    return ref, model, report


def test_counts_rounding_and_links(pruned):
    ref, model, report = pruned
    before = _count(16, [32, 32], 32)
    assert sum(p.numel() for p in ref.parameters()) == before == 20026
    c, widths, w = _sizes(model)
    n = _count(c, widths, w)
    target = int(before * 0.55)
    assert sum(p.numel() for p in model.parameters()) == n == report.params_after <= target
    assert all(s % 2 == 0 and s >= 2 for s in (c, *widths, w))
    # No group can grow by one chunk (2 channels) within the target.
    if c < 16:
        assert _count(c + 2, widths, w) > target
    for i in range(2):
        if widths[i] < 32:
            assert _count(c, [m + 2 * (j == i) for j, m in enumerate(widths)], w) > target
    if w < 32:
        assert _count(c, widths, w + 2) > target
    assert (c, widths, w) != (16, [32, 32], 32)


def test_runs_trains_and_replays(pruned):
    ref, model, report = pruned
    x = _calib(5, n=1)[0]
    out = model(x)
    assert out.shape == (2, CLASSES)
    fresh = build_cnn(seed=3)
    apply_prune_state(fresh, get_modes(model)[-1].state)
    assert _sizes(fresh) == _sizes(model)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.eval()(x), out, rtol=0, atol=0)
    if report.importance != "activation":
        return  # one fine-tuning run is enough
    tuned = copy.deepcopy(model).train()
    y = torch.arange(2)
    opt = torch.optim.SGD(tuned.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(tuned(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_activation_and_weight_keep_different_channels():
    """Block channels 0-3 have the largest weights but a dead activation (ReLU of a very negative BatchNorm)."""
    base = build_cnn()
    with torch.no_grad():
        base.block1.conv1.weight[:4] *= 20.0
        base.block1.bn1.bias[:4] = -1e4
    kept = {}
    for imp in ("activation", "weight"):
        model = prune(copy.deepcopy(base), {"params": "70%"}, _calib(2), imp)
        groups = {g["leader"]: g["kept"] for g in get_modes(model)[-1].state["groups"]}
        kept[imp] = groups["block1.conv1.out_channels"]
        assert len(kept[imp]) < 32
    assert not set(range(4)) & set(kept["activation"])
    assert set(range(4)) <= set(kept["weight"])
