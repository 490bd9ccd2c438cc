"""SmoothQuant: the scale formula, where the division goes (norm, linear or pre_quant_scale), W8A8 error, export, data parallel."""

import pytest
import torch
from torch import nn

import modelopt_lite.quantization as mtq
from modelopt_lite.quantization.algorithms.common import quantizers_off
from modelopt_lite.quantization.algorithms.smoothquant import SCALE_MAX, SCALE_MIN, smoothing_scale, smoothquant

from dist_harness import run_ranks

C, O = 64, 32


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class LnLinear(nn.Module):
    """LayerNorm -> Linear; the norm's weight makes channel 5 of the activation ~50x the others."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(C)
        self.fc = nn.Linear(C, O)
        with torch.no_grad():
            self.ln.weight.copy_(1 + 0.1 * randn(C, seed=10))
            self.ln.weight[5] = 50.0
            self.ln.bias.copy_(0.1 * randn(C, seed=11))
            self.fc.weight.copy_(randn(O, C, seed=12) / 8)
            self.fc.bias.copy_(0.1 * randn(O, seed=13))

    def forward(self, x):
        return self.fc(self.ln(x))


class Fused(nn.Module):
    """A norm read by two layers (a fused pair), then a linear -> linear chain and a residual branch."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(C)
        self.a, self.b = nn.Linear(C, C), nn.Linear(C, C)
        self.up, self.down = nn.Linear(C, C), nn.Linear(C, C)
        self.res = nn.Linear(C, C)
        with torch.no_grad():
            self.norm.weight[3] = 30.0
            self.up.weight[7] *= 40.0

    def forward(self, x):
        h = self.norm(x)
        h = self.a(h) * self.b(h)
        h = self.down(self.up(h))  # up's output is read only by down: foldable
        r = self.res(h)
        return r + h  # h feeds res and the residual add: res keeps a pre_quant_scale


BATCHES = [randn(4, 8, C, seed=i) for i in range(4)]


def loop(model):
    for b in BATCHES:
        model(b)


def quantized(model, config="int8"):
    mtq.replace_quant_modules(model)
    mtq.set_quantizer_by_cfg(model, mtq.get_config(config))
    return model


def rel_err(model, ref, x):
    with torch.no_grad():
        return (((model(x) - ref) ** 2).mean() / (ref**2).mean()).item()


def test_scale_formula_guards_and_clamp():
    s = smoothing_scale(torch.tensor([4.0, 0.0, 9.0, 1e12, 1.0]), torch.tensor([1.0, 2.0, 0.0, 1.0, 1e12]), 0.5)
    assert torch.allclose(s, torch.tensor([2.0, 1.0, 1.0, SCALE_MAX, SCALE_MIN]))
    assert torch.allclose(smoothing_scale(torch.tensor([8.0]), torch.tensor([2.0]), 0.75), torch.tensor([8**0.75 / 2**0.25]))


def test_outlier_channel_is_flattened_folded_into_the_norm_and_w8a8_error_drops():
    x = torch.cat(BATCHES)
    ref_model = LnLinear()
    with torch.no_grad():
        ref = ref_model(x)
        act = ref_model.ln(x).reshape(-1, C).abs().amax(0)
    w0 = ref_model.fc.weight.detach().clone()
    expect = act.sqrt() / w0.abs().amax(0).sqrt()

    plain = quantized(LnLinear())
    mtq.calibrate(plain, "max", loop)
    sq = quantized(LnLinear())
    calls = []
    placed = smoothquant(sq, lambda m: (calls.append(1), loop(m)), alpha=0.5)
    # trace (stops at the first call) + statistics + max calibration
    assert len(calls) == 3
    assert placed == {"fc": "ln"} and sq.fc.input_quantizer.pre_quant_scale is None
    s = sq.fc.weight.detach() / w0  # W' = W * s, column by column
    assert torch.allclose(s, expect.expand_as(s), rtol=1e-5)
    assert torch.allclose(sq.ln.weight.detach(), ref_model.ln.weight.detach() / expect, rtol=1e-6)
    assert torch.allclose(sq.ln.bias.detach(), ref_model.ln.bias.detach() / expect, rtol=1e-6)
    # the activation's channel ranges are flattened: max |x_j| / s_j = sqrt(max|x_j| * max|W_j|)
    with torch.no_grad():
        smoothed = sq.ln(x).reshape(-1, C).abs().amax(0)
    torch.testing.assert_close(smoothed, (act * w0.abs().amax(0)).sqrt(), rtol=1e-5, atol=0)
    assert (act.max() / act.median()).item() == pytest.approx(57.7, rel=0.01)
    assert (smoothed.max() / smoothed.median()).item() == pytest.approx(6.74, rel=0.01)
    # float model unchanged by the smoothing alone
    with quantizers_off(sq), torch.no_grad():
        torch.testing.assert_close(sq(x), ref, rtol=1e-5, atol=1e-5)
    # INT8 W8A8 relative MSE: 3.75e-3 with max, 1.01e-4 after smoothing
    e_max, e_sq = rel_err(plain, ref, x), rel_err(sq, ref, x)
    assert e_max == pytest.approx(3.75e-3, rel=0.05)
    assert e_sq == pytest.approx(1.01e-4, rel=0.05)
    assert e_sq < e_max / 30


def test_without_fold_the_scale_is_a_pre_quant_scale():
    x = torch.cat(BATCHES)
    ref_model = LnLinear()
    with torch.no_grad():
        ref = ref_model(x)
    sq = quantized(LnLinear())
    placed = smoothquant(sq, loop, alpha=0.5, fold=False)
    assert placed == {"fc": "pre_quant_scale"}
    assert torch.equal(sq.ln.weight, ref_model.ln.weight)
    s = sq.fc.weight.detach() / ref_model.fc.weight.detach()
    torch.testing.assert_close(sq.fc.input_quantizer.pre_quant_scale, 1 / s[0], rtol=1e-5, atol=0)
    with quantizers_off(sq), torch.no_grad():
        torch.testing.assert_close(sq(x), ref, rtol=1e-5, atol=1e-5)


def test_groups_share_a_scale_and_folds_follow_the_graph():
    x = torch.cat(BATCHES)
    ref_model = Fused()
    with torch.no_grad():
        ref = ref_model(x)
    model = quantized(Fused())
    placed = smoothquant(model, loop, alpha=0.5)
    assert placed == {"a": "norm", "b": "norm", "up": "pre_quant_scale", "down": "up",
                      "res": "pre_quant_scale"}
    # a and b read one activation: one scale, computed from the larger |W| of the two
    sa = model.a.weight.detach() / ref_model.a.weight.detach()
    sb = model.b.weight.detach() / ref_model.b.weight.detach()
    torch.testing.assert_close(sa, sb, rtol=1e-5, atol=0)
    with torch.no_grad():
        act = ref_model.norm(x).reshape(-1, C).abs().amax(0)
    w_amax = torch.maximum(ref_model.a.weight.abs().amax(0), ref_model.b.weight.abs().amax(0)).detach()
    torch.testing.assert_close(sa[0], smoothing_scale(act, w_amax, 0.5), rtol=1e-5, atol=0)
    # down's division went into up's output rows (and bias)
    s_down = (model.down.weight.detach() / ref_model.down.weight.detach())[0]
    up_rows = model.up.weight.detach() / (ref_model.up.weight.detach() * (1 / model.up.input_quantizer.pre_quant_scale))
    torch.testing.assert_close(up_rows, (1 / s_down).reshape(-1, 1).expand_as(up_rows), rtol=1e-4, atol=0)
    torch.testing.assert_close(model.up.bias.detach(), ref_model.up.bias.detach() / s_down, rtol=1e-5, atol=1e-7)
    assert model.down.input_quantizer.pre_quant_scale is None
    assert model.res.input_quantizer.pre_quant_scale is not None
    with quantizers_off(model), torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_options_are_checked():
    with pytest.raises(ValueError, match="alpha must be a number in"):
        smoothquant(quantized(LnLinear()), loop, alpha=1.5)
    with pytest.raises(ValueError, match="needs calibration data"):
        smoothquant(quantized(LnLinear()), None)
    with pytest.raises(ValueError, match="not registered|unknown|registered"):
        mtq.get_config({"quant_cfg": {}, "algorithm": {"method": "smoothquant_typo"}})


# --------------------------------------------------------------------------- Hugging Face models

def _ids(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 12), generator=g) for _ in range(n)]


def test_tiny_llama_folds_into_rms_norms_and_exports(tmp_path):
    pytest.importorskip("transformers")
    from modelopt_lite.export import export_hf_checkpoint, load_hf_checkpoint
    from modelopt_lite.models.tiny import build_tiny_model

    ref_model = build_tiny_model("llama")
    model = build_tiny_model("llama")
    batches = _ids(1)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = ref_model(x, use_cache=False).logits
    mtq.quantize(model, "INT8_SMOOTHQUANT_CFG", lambda m: [m(b, use_cache=False) for b in batches],
                 share_input_amax=False)
    for i, layer in enumerate(model.model.layers):
        ref_layer = ref_model.model.layers[i]
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert not torch.allclose(getattr(layer, norm).weight, getattr(ref_layer, norm).weight)
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj,
                    layer.mlp.up_proj):
            assert lin.input_quantizer.pre_quant_scale is None
        for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
            assert lin.input_quantizer.pre_quant_scale is not None
        # q/k/v read the same (smoothed) activation: one input amax without any sharing step
        amaxes = [getattr(layer.self_attn, p).input_quantizer.amax for p in ("q_proj", "k_proj", "v_proj")]
        assert all(torch.equal(a, amaxes[0]) for a in amaxes)
    with quantizers_off(model), torch.no_grad():
        torch.testing.assert_close(model(x, use_cache=False).logits, ref, rtol=1e-4, atol=1e-4)
    out = export_hf_checkpoint(model, tmp_path / "sq")
    loaded = load_hf_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(loaded(x, use_cache=False).logits, model(x, use_cache=False).logits)


def test_bert_post_norm_keeps_pre_quant_scale():
    pytest.importorskip("transformers")
    from modelopt_lite.models.tiny import build_tiny_model

    ref_model = build_tiny_model("bert")
    model = quantized(build_tiny_model("bert"), "int8_sq")
    batches = _ids(2)
    placed = smoothquant(model, lambda m: [m(b) for b in batches], alpha=0.5)
    assert set(placed.values()) == {"pre_quant_scale"} and len(placed) == 13
    for i, layer in enumerate(model.encoder.layer):
        ref_layer = ref_model.encoder.layer[i]
        assert torch.equal(layer.attention.output.LayerNorm.weight, ref_layer.attention.output.LayerNorm.weight)
        qkv = [layer.attention.self.query, layer.attention.self.key, layer.attention.self.value]
        assert all(torch.equal(m.input_quantizer.pre_quant_scale, qkv[0].input_quantizer.pre_quant_scale) for m in qkv)
    assert torch.equal(model.embeddings.LayerNorm.weight, ref_model.embeddings.LayerNorm.weight)
    x = batches[0]
    with quantizers_off(model), torch.no_grad():
        torch.testing.assert_close(model(x).last_hidden_state, ref_model(x).last_hidden_state, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- data parallel

def _calibrate_rank(rank, world):
    model = quantized(Fused())
    mine = BATCHES if world == 1 else BATCHES[rank::world]
    smoothquant(model, lambda m: [m(b) for b in mine], alpha=0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_data_parallel_equals_one_process():
    single = _calibrate_rank(0, 1)
    results = run_ranks(_calibrate_rank, world=2)
    for r in results:
        assert r.keys() == single.keys()
        for k in single:
            torch.testing.assert_close(r[k], single[k], rtol=1e-6, atol=0, msg=k)
    assert any(k.endswith("_pre_quant_scale") for k in single)
