"""Pruning a tiny BERT: whole heads and MLP widths; the hidden width is a model output and stays."""

import copy

import pytest
import torch

from modelopt_lite.models.tiny import build_tiny_model
from modelopt_lite.opt import get_modes
from modelopt_lite.prune import apply_prune_state, prune

H, HEAD_DIM, HEADS, INTER = 64, 16, 4, 128


def _calib(seed, n=3, seq=16):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (2, seq), generator=g)} for _ in range(n)]


def _layer_sizes(model):
    """[(heads, mlp width)] per layer, checking q/k/v/o and the MLP agree."""
    out = []
    for layer in model.encoder.layer:
        s = layer.attention.self
        heads = s.num_attention_heads
        width = heads * HEAD_DIM
        assert s.all_head_size == width and s.attention_head_size == HEAD_DIM
        for proj in (s.query, s.key, s.value):
            assert proj.weight.shape == (width, H) and proj.bias.shape == (width,)
        assert layer.attention.output.dense.weight.shape == (H, width)
        i = layer.intermediate.dense.out_features
        assert layer.output.dense.weight.shape == (H, i)
        out.append((heads, i))
    return out


def _layer_params(heads, inter):
    w = heads * HEAD_DIM
    return 3 * (H * w + w) + w * H + H + 2 * H + H * inter + inter + inter * H + H + 2 * H


@pytest.fixture(scope="module")
def pruned():
    ref = build_tiny_model("bert")
    model, report = prune(copy.deepcopy(ref), {"params": "65%"}, _calib(1), "activation", return_report=True)
    return ref, model, report


def test_counts_and_fixed_hidden(pruned):
    ref, model, report = pruned
    before = sum(p.numel() for p in ref.parameters())
    assert before == 83648 and report.params_before == before
    fixed = before - 2 * _layer_params(HEADS, INTER)
    sizes = _layer_sizes(model)
    n = fixed + sum(_layer_params(h, i) for h, i in sizes)
    assert sum(p.numel() for p in model.parameters()) == n == report.params_after
    target = int(before * 0.65)
    assert n <= target
    for li, (h, i) in enumerate(sizes):  # nothing single fits any more
        if h < HEADS:
            assert n + _layer_params(h + 1, i) - _layer_params(h, i) > target
        if i < INTER:
            assert n + _layer_params(h, i + 1) - _layer_params(h, i) > target
    # The hidden width reaches the model output: it is fixed, and reported so.
    assert model.embeddings.word_embeddings.embedding_dim == H
    assert all(layer.output.LayerNorm.weight.shape == (H,) for layer in model.encoder.layer)
    assert not any(g.leader.startswith("embeddings") for g in report.groups)
    assert {g.kind for g in report.groups} == {"head", "channel"}


def test_runs_and_replays(pruned):
    ref, model, _ = pruned
    x = _calib(5, n=1, seq=9)[0]["input_ids"]
    out = model(input_ids=x).last_hidden_state
    assert out.shape == (2, 9, H) and torch.isfinite(out).all()
    fresh = build_tiny_model("bert", seed=2)
    apply_prune_state(fresh, get_modes(model)[-1].state)
    assert _layer_sizes(fresh) == _layer_sizes(model)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(input_ids=x).last_hidden_state, out, rtol=0, atol=0)


def test_weight_importance_prunes_lowest_norm_head():
    model = build_tiny_model("bert")
    with torch.no_grad():  # head 2 of layer 0 gets tiny weights everywhere it is produced and consumed
        s = model.encoder.layer[0].attention.self
        for proj in (s.query, s.key, s.value):
            proj.weight[2 * HEAD_DIM:3 * HEAD_DIM] *= 0.01
        model.encoder.layer[0].attention.output.dense.weight[:, 2 * HEAD_DIM:3 * HEAD_DIM] *= 0.01
    prune(model, {"params": 80_000}, importance="weight")
    groups = {g["leader"]: g for g in get_modes(model)[-1].state["groups"]}
    g = groups["encoder.layer.0.attention.self.query.out_features"]
    assert g["kind"] == "head" and g["units"] == HEADS
    assert 2 not in g["kept"] and len(g["kept"]) == model.encoder.layer[0].attention.self.num_attention_heads
