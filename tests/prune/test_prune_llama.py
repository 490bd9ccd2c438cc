"""Pruning a tiny Llama: GQA key/value groups, MLP widths and the hidden width, consistently."""

import copy

import pytest
import torch

from modelopt_lite.models.tiny import build_tiny_model
from modelopt_lite.opt import get_modes, replay_mode
from modelopt_lite.prune import REPORT_ATTR, apply_prune_state, prune

V, HEAD_DIM, Q_PER_KV = 128, 16, 2


def _calib(seed, n=3, seq=16):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, V, (2, seq), generator=g)} for _ in range(n)]


def _sizes(model):
    """(hidden, [kv groups per layer], [mlp width per layer]), checking every linked layer agrees."""
    h = model.model.embed_tokens.embedding_dim
    assert model.model.embed_tokens.weight.shape == (V, h)
    assert model.lm_head.weight.shape == (V, h) and model.model.norm.weight.shape == (h,)
    kvs, mlps = [], []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        assert layer.input_layernorm.weight.shape == (h,) and layer.post_attention_layernorm.weight.shape == (h,)
        kv = a.k_proj.out_features // HEAD_DIM
        assert a.k_proj.weight.shape == (kv * HEAD_DIM, h) and a.v_proj.weight.shape == (kv * HEAD_DIM, h)
        assert a.q_proj.weight.shape == (kv * Q_PER_KV * HEAD_DIM, h)
        assert a.o_proj.weight.shape == (h, kv * Q_PER_KV * HEAD_DIM)
        assert a.num_key_value_groups == Q_PER_KV and a.head_dim == HEAD_DIM
        i = m.gate_proj.out_features
        assert m.up_proj.weight.shape == (i, h) and m.gate_proj.weight.shape == (i, h)
        assert m.down_proj.weight.shape == (h, i)
        kvs.append(kv)
        mlps.append(i)
    return h, kvs, mlps


def _count(h, kvs, mlps):
    """Parameters of a Llama with these sizes (no biases)."""
    n = 2 * V * h + h
    for kv, i in zip(kvs, mlps):
        q = kv * Q_PER_KV * HEAD_DIM
        n += 2 * h + h * q + 2 * h * kv * HEAD_DIM + q * h + 3 * h * i
    return n


@pytest.fixture(scope="module")
def pruned():
    ref = build_tiny_model("llama")
    model, report = prune(copy.deepcopy(ref), {"params": "60%"}, _calib(1), "activation", return_report=True)
    return ref, model, report


def test_parameter_count_exact_and_maximal(pruned):
    ref, model, report = pruned
    assert report.params_before == _count(64, [2, 2], [128, 128]) == 90432
    target = int(90432 * 0.6)
    assert report.target == target
    h, kvs, mlps = _sizes(model)
    n = _count(h, kvs, mlps)
    assert sum(p.numel() for p in model.parameters()) == n == report.params_after
    assert n <= target
    # No single unit (one hidden channel, one KV group, one MLP channel) can be added back within the target.
    if h < 64:
        assert _count(h + 1, kvs, mlps) > target
    for li in range(2):
        if kvs[li] < 2:
            assert _count(h, [k + (j == li) for j, k in enumerate(kvs)], mlps) > target
        if mlps[li] < 128:
            assert _count(h, kvs, [m + (j == li) for j, m in enumerate(mlps)]) > target
    assert (h, kvs, mlps) != (64, [2, 2], [128, 128]) and min(kvs) >= 1 and min(mlps) >= 1
    assert getattr(model, REPORT_ATTR) is report


def test_runs_on_new_inputs(pruned):
    ref, model, _ = pruned
    x = _calib(7, n=1, seq=11)[0]["input_ids"]
    out = model(input_ids=x).logits
    assert out.shape == (2, 11, V) and torch.isfinite(out).all()


def test_replay_on_fresh_model(pruned):
    _, model, _ = pruned
    (entry,) = get_modes(model)
    assert entry.mode == "prune" and entry.config["constraints"] == {"params": "60%"}
    fresh = build_tiny_model("llama", seed=3)
    apply_prune_state(fresh, entry.state)
    assert _sizes(fresh) == _sizes(model)
    fresh.load_state_dict(model.state_dict())
    x = _calib(8, n=1)[0]["input_ids"]
    torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    other = build_tiny_model("llama", seed=4)
    replay_mode(other, entry)  # the registered replay
    assert _sizes(other) == _sizes(model)
    with pytest.raises(ValueError, match="does not fit"):
        apply_prune_state(fresh, entry.state)  # already pruned


def test_finetune_after_pruning(pruned):
    _, model, _ = pruned
    model = copy.deepcopy(model).train()
    batch = _calib(9, n=1, seq=8)[0]["input_ids"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_quantize_after_pruning(pruned):
    from modelopt_lite.quantization import quantize

    _, model, _ = pruned
    model = copy.deepcopy(model)
    calib = _calib(10, n=1, seq=8)
    x = _calib(11, n=1, seq=8)[0]["input_ids"]
    want = model(input_ids=x).logits

    def loop(m):
        for b in calib:
            m(**b)

    quantize(model, "fp8", loop)
    got = model(input_ids=x).logits
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99


def test_prune_again(pruned):
    """A pruned model analyzes with its real head counts and prunes further."""
    _, model, report = pruned
    model = copy.deepcopy(model)
    prune(model, {"params": "80%"}, importance="weight")
    h, kvs, mlps = _sizes(model)
    assert sum(p.numel() for p in model.parameters()) == _count(h, kvs, mlps) <= int(report.params_after * 0.8)
    assert [m.mode for m in get_modes(model)] == ["prune", "prune"]
    fresh = build_tiny_model("llama", seed=5)
    for entry in get_modes(model):
        apply_prune_state(fresh, entry.state)
    assert _sizes(fresh) == (h, kvs, mlps)
    assert model(input_ids=_calib(3, n=1, seq=8)[0]["input_ids"]).logits.shape == (2, 8, V)
