"""prune() on small hand-written models: concat slicing, tied weights, importance, rounding, errors."""

import copy

import pytest
import torch
from torch import nn

from modelopt_lite.opt import get_modes
from modelopt_lite.prune import apply_prune_state, parse_target, prune
from prune_models import TiedLM, TwoBranch


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp_params(hidden):
    return 8 * hidden + hidden + hidden * 4 + 4


def _batches(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def test_concat_reader_keeps_the_right_slices():
    torch.manual_seed(0)
    ref = TwoBranch()
    model = prune(copy.deepcopy(ref), {"params": 300}, _batches((4, 8)), "weight")
    state = get_modes(model)[-1].state
    ka, kb = (g["kept"] for g in state["groups"])
    assert state["concat_members"] == {"out.in_features": [[0, 16, 1], [1, 24, 1]]}
    assert model.out.in_features == len(ka) + len(kb) == model.a.out_features + model.b.out_features
    torch.testing.assert_close(model.out.weight, ref.out.weight[:, ka + [16 + i for i in kb]], rtol=0, atol=0)
    n = sum(p.numel() for p in model.parameters())
    assert n == 9 * (len(ka) + len(kb)) + 4 * (len(ka) + len(kb)) + 4 <= 300
    assert n + 13 > 300  # one more channel of either branch would not fit
    x = torch.randn(5, 8)
    fresh = TwoBranch()
    apply_prune_state(fresh, state)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_tied_output_layer_stays_tied():
    torch.manual_seed(0)
    model = TiedLM()
    ids = [torch.randint(0, 50, (2, 8)) for _ in range(2)]
    model, report = prune(model, {"params": "60%"}, ids, return_report=True)
    assert model.head.weight is model.emb.weight
    h, i = model.emb.embedding_dim, model.fc1.out_features
    assert model.norm.weight.shape == (h,) and model.norm.normalized_shape == (h,)
    assert model.fc2.weight.shape == (h, i) and model.head.in_features == h
    n = 50 * h + 2 * h + h * i + i + i * h + h
    assert sum(p.numel() for p in model.parameters()) == n == report.params_after <= int(5856 * 0.6)
    assert model(ids[0]).shape == (2, 8, 50)


def test_activation_and_weight_importance_differ():
    """Hidden units 0-3 have the largest weights but a ReLU input that is always negative."""
    torch.manual_seed(0)
    base = MLP()
    with torch.no_grad():
        base.fc1.weight[:4] *= 10.0
        base.fc1.bias[:4] = -1e3
    data = _batches((16, 8))
    kept = {}
    for imp in ("activation", "weight", "weight_l1"):
        model, report = prune(copy.deepcopy(base), {"params": 200}, data, imp, return_report=True)
        kept[imp] = get_modes(model)[-1].state["groups"][0]["kept"]
        assert sum(p.numel() for p in model.parameters()) == _mlp_params(len(kept[imp])) == _mlp_params(15)
    assert not set(range(4)) & set(kept["activation"])
    assert set(range(4)) <= set(kept["weight"]) and set(range(4)) <= set(kept["weight_l1"])


def test_ties_keep_lower_indices_and_round_to():
    model = MLP()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    prune(model, {"params": 240}, importance="weight", round_to=8, example_inputs=(torch.randn(2, 8),))
    assert model.fc1.out_features == 16 and _mlp_params(16) <= 240 < _mlp_params(24)
    assert get_modes(model)[-1].state["groups"][0]["kept"] == list(range(16))


def test_targets_and_errors():
    assert parse_target("70%", 1000) == 700 and parse_target(123, 1000) == 123
    for bad in ("0%", "abc%", 0, 1.5, "70"):
        with pytest.raises(ValueError, match="params constraint"):
            parse_target(bad, 1000)
    data = _batches((4, 8))
    with pytest.raises(ValueError, match="constraints must be"):
        prune(MLP(), {"flops": "50%"}, data)
    with pytest.raises(ValueError, match="needs a data_loader"):
        prune(MLP(), {"params": "50%"}, importance="activation", example_inputs=(torch.randn(2, 8),))
    with pytest.raises(ValueError, match="smallest model the searchable dimensions allow has 17"):
        prune(MLP(), {"params": 16}, data)  # one hidden unit: 8 + 1 + 4 weights and biases, and fc2's 4 biases
    fixed = r"no dimension is searchable.*0.in_features \(model input\); 0.out_features \(model output\)"
    with pytest.raises(ValueError, match=fixed):
        prune(nn.Sequential(nn.Linear(8, 4)).eval(), {"params": 10}, data, "weight")
    model = MLP()
    assert prune(model, {"params": "100%"}, data).fc1.out_features == 32
    assert get_modes(model)[-1].state["groups"] == []
