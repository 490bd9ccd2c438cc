"""AWQ (lite, clip, full): salient channels are protected, clipping lowers the error, groups share scales, export, data parallel."""

import pytest
import torch
from torch import nn

import modelopt_lite.quantization as mtq
from modelopt_lite.quantization.algorithms.awq import alpha_grid, awq_full, awq_lite, awq_scales
from modelopt_lite.quantization.algorithms.awq_clip import DEFAULT_SHRINK_GRID, awq_clip
from modelopt_lite.quantization.algorithms.common import quantizers_off
from modelopt_lite.quantization.formats import block_amax

from dist_harness import run_ranks

C, O = 256, 64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _weight():
    w = randn(O, C, seed=0) * 0.05
    w[::4, 7] = 0.4  # an outlier in every fourth row's first block
    return w


_CHANNELS = torch.ones(C)
_CHANNELS[3], _CHANNELS[100] = 30.0, 10.0  # salient input channels (large mean |x|)
BATCHES = [randn(8, 16, C, seed=i + 1) * _CHANNELS for i in range(4)]
X = torch.cat(BATCHES)


class One(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(C, O)
        with torch.no_grad():
            self.proj.weight.copy_(_weight())
            self.proj.bias.zero_()

    def forward(self, x):
        return self.proj(x)


def loop(model):
    for b in BATCHES:
        model(b)


def counting(calls):
    def run(model):
        calls.append(1)
        loop(model)

    return run


def quantized(model, config):
    mtq.replace_quant_modules(model)
    mtq.set_quantizer_by_cfg(model, mtq.get_config(config))
    return model


REF = One()(X).detach()


def sq_err(model):
    with torch.no_grad():
        return ((model(X) - REF) ** 2).sum().item()


def run(config, algorithm, **options):
    """Calibrate One in `config` with a registered algorithm; (model, error, loop calls, the algorithm's result)."""
    model = quantized(One(), config)
    calls = []
    result = mtq.ALGORITHMS.get(algorithm)(model, counting(calls), **options)
    mtq.calibrate(model, None)  # weights of layers no algorithm calibrated: their own max
    return model, sq_err(model), len(calls), result


# Summed squared output error on the calibration data, per weight format and algorithm (seeded, CPU).
EXPECTED = {
    "int4_wo": {"max": 4005.1, "awq_lite": 922.9, "awq_clip": 851.0, "awq_full": 725.8},
    "w4a8_awq": {"max": 4056.9, "awq_lite": 979.9, "awq_clip": 910.1, "awq_full": 790.4},
    "nvfp4": {"max": 2195.4, "awq_lite": 616.7, "awq_clip": 1421.4, "awq_full": 556.3},
}


def test_alpha_grid_and_candidate_scales():
    assert alpha_grid(0.25) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert alpha_grid(0.3) == [0.0, 0.3, 0.6, 0.9, 1.0]
    s = awq_scales(torch.tensor([1.0, 4.0, 16.0]), [0.0, 0.5, 1.0])
    # m^alpha / sqrt(max * min): alpha 0 is no smoothing
    torch.testing.assert_close(s, torch.tensor([[1.0, 1.0, 1.0], [0.5, 1.0, 2.0], [0.25, 1.0, 4.0]]))
    with pytest.raises(ValueError, match="alpha_step"):
        alpha_grid(0)


@pytest.mark.parametrize("config", list(EXPECTED))
def test_errors_drop_below_max_calibration(config):
    errors = {}
    for algorithm in EXPECTED[config]:
        _, errors[algorithm], _, _ = run(config, algorithm)
    for algorithm, expected in EXPECTED[config].items():
        assert errors[algorithm] == pytest.approx(expected, rel=0.01), (algorithm, errors)
    assert errors["awq_lite"] < errors["max"] / 3 and errors["awq_clip"] < errors["max"]
    assert errors["awq_full"] <= errors["awq_lite"]


def test_awq_lite_protects_the_salient_channel():
    model, _, calls, chosen = run("int4_wo", "awq_lite", alpha_step=0.1)
    assert calls == 3  # statistics, scoring, max calibration (one layer: no trace for groups)
    s = 1 / model.proj.input_quantizer.pre_quant_scale
    assert chosen == {"proj": pytest.approx(0.5)}
    assert int(s.argmax()) == 3 and s[3] > 2.0 and s[100] > 1.3
    # s is mean|x|^alpha normalised by sqrt(max * min)
    mean = X.reshape(-1, C).abs().mean(0)
    torch.testing.assert_close(s, awq_scales(mean, [0.5])[0], rtol=1e-5, atol=0)
    # W' = W * s, and the float output is unchanged (pre_quant_scale applies with the quantizer off)
    torch.testing.assert_close(model.proj.weight.detach(), _weight() * s, rtol=1e-6, atol=0)
    assert not model.proj.input_quantizer.is_enabled
    with quantizers_off(model), torch.no_grad():
        torch.testing.assert_close(model(X), REF, rtol=1e-5, atol=1e-5)


def test_awq_clip_sets_static_block_amaxes():
    model, _, calls, ratios = run("int4_wo", "awq_clip")
    assert calls == 1  # one pass: block Gram matrices and activation statistics together
    q = model.proj.weight_quantizer
    full = block_amax(model.proj.weight.detach(), q.fmt)
    assert q.amax.shape == (O, C // 128) == full.shape
    ratio = q.amax / full
    # each block's amax is one of the grid's ratios of its max, some clipped (max calibration did not overwrite them)
    grid = torch.tensor(DEFAULT_SHRINK_GRID)
    assert all(bool((grid - r).abs().min() < 1e-6) for r in ratio.flatten())
    assert (ratio < 1).sum() > 10 and ratios["proj"] == pytest.approx(float(ratio.mean()))


def test_awq_full_calls_the_loop_three_times_and_keeps_clipped_amax():
    model, _, calls, result = run("int4_wo", "awq_full")
    assert calls == 3  # statistics, scoring, then clipping and activation calibration in one pass
    alpha, ratio = result["proj"]
    assert alpha == pytest.approx(0.5) and ratio < 1.0
    assert model.proj.input_quantizer.pre_quant_scale is not None


def test_nvfp4_clip_keeps_per_block_amax_under_the_weight_global():
    model, *_ = run("nvfp4", "awq_clip")
    q = model.proj.weight_quantizer
    assert q.amax.numel() == O * C // 16
    assert torch.equal(q.global_amax, model.proj.weight.detach().abs().amax())
    assert float(q.amax.max()) <= float(q.global_amax)


@pytest.mark.parametrize("config,algorithm", [
    ("nvfp4_awq_lite", None), ("nvfp4_awq_clip", None), ("nvfp4_awq_full", None), ("int4_awq", None),
    ("w4a8_awq", None), ("w4a8_nvfp4_fp8", "awq_lite"), ("w4a8_nvfp4_fp8", "awq_full"), ("w4a16_nvfp4", "awq_full"),
])
def test_presets_and_formats_beat_max(config, algorithm):
    plain = quantized(One(), config)
    mtq.calibrate(plain, "max", loop)
    model = quantized(One(), config)
    mtq.calibrate(model, algorithm or mtq.get_config(config).algorithm, loop)
    assert sq_err(model) < 0.7 * sq_err(plain)


@pytest.mark.parametrize("algorithm", ["awq_clip", "awq_full"])
@pytest.mark.parametrize("config,fmt", [("mxfp4", "mxfp4 block"), ("int8", "int8 per-channel")])
def test_formats_without_block_scales_are_refused(algorithm, config, fmt):
    calls = []
    with pytest.raises(ValueError, match=f"awq_clip: layer 'proj': weight format {fmt}"):
        mtq.calibrate(quantized(One(), config), algorithm, counting(calls))
    assert calls == []  # refused before any pass


def test_awq_lite_handles_mx_and_options_are_checked():
    _, err, _, chosen = run("mxfp4", "awq_lite")
    _, err_max, _, _ = run("mxfp4", "max")
    assert chosen == {"proj": 0.0} and err == err_max  # MXFP4 activations: no scale beats none here
    with pytest.raises(ValueError, match="shrink_grid"):
        awq_clip(quantized(One(), "int4_wo"), loop, shrink_grid=[1.2])
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        awq_lite(quantized(One(), "int4_wo"), loop, max_tokens_per_batch=0)
    with pytest.raises(ValueError, match="needs calibration data"):
        awq_full(quantized(One(), "int4_wo"), None)


def test_token_subsampling_still_protects():
    model = quantized(One(), "int4_wo")
    chosen = awq_lite(model, loop, max_tokens_per_batch=32)
    assert chosen["proj"] > 0
    assert sq_err(model) < 0.5 * EXPECTED["int4_wo"]["max"]


# --------------------------------------------------------------------------- groups, Hugging Face, export

class Pair(nn.Module):
    """A norm read by two layers (they must share a scale), then one more layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(C)
        self.a, self.b = nn.Linear(C, C), nn.Linear(C, C)
        self.out = nn.Linear(C, O)
        with torch.no_grad():
            self.norm.weight.copy_(_CHANNELS)

    def forward(self, x):
        h = self.norm(x)
        return self.out(self.a(h) * torch.sigmoid(self.b(h)))


def test_groups_share_one_scale():
    model = quantized(Pair(), "int4_awq")
    calls = []
    chosen = awq_lite(model, counting(calls))
    assert calls == [1, 1, 1, 1]  # trace (stopped at the first call), statistics, scoring, max calibration
    assert chosen["a"] == chosen["b"]
    assert torch.equal(model.a.input_quantizer.pre_quant_scale, model.b.input_quantizer.pre_quant_scale)
    assert not torch.equal(model.a.input_quantizer.pre_quant_scale, torch.ones(C))


def test_tiny_llama_int4_awq_exports_and_loads_back(tmp_path):
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from modelopt_lite.export import export_hf_checkpoint, load_hf_checkpoint

    def llama():
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                            max_position_embeddings=64)).eval()

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 128, (2, 12), generator=g) for _ in range(3)]
    x = torch.randint(0, 128, (2, 9), generator=g)
    ref_model, model = llama(), llama()
    with torch.no_grad():
        ref = ref_model(x, use_cache=False).logits
    mtq.quantize(model, "INT4_AWQ_CFG", lambda m: [m(b, use_cache=False) for b in batches], share_input_amax=False)
    for layer in model.model.layers:
        for members in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                        (layer.mlp.gate_proj, layer.mlp.up_proj)):
            scales = [m.input_quantizer.pre_quant_scale for m in members]
            assert scales[0] is not None and all(torch.equal(s, scales[0]) for s in scales)
    with quantizers_off(model), torch.no_grad():
        torch.testing.assert_close(model(x, use_cache=False).logits, ref, rtol=1e-4, atol=1e-4)
    out = export_hf_checkpoint(model, tmp_path / "awq")
    loaded = load_hf_checkpoint(out)
    with torch.no_grad():
        assert torch.equal(loaded(x, use_cache=False).logits, model(x, use_cache=False).logits)


# --------------------------------------------------------------------------- data parallel

def _calibrate_rank(rank, world):
    """awq_full (the lite search, then clipping) on INT4 blocks and on NVFP4, on this rank's share of the batches."""
    mine = BATCHES if world == 1 else BATCHES[rank::world]
    out = {}
    for config in ("int4_wo", "nvfp4"):
        model = quantized(Pair(), config)
        awq_full(model, lambda m: [m(b) for b in mine])
        out[config] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def test_data_parallel_equals_one_process():
    single = _calibrate_rank(0, 1)
    results = run_ranks(_calibrate_rank, world=2)
    for config, expected in single.items():
        assert sum(k.endswith("_pre_quant_scale") for k in expected) == 3
        for r in results:
            assert r[config].keys() == expected.keys()
            for k in expected:
                torch.testing.assert_close(r[config][k], expected[k], rtol=1e-6, atol=0, msg=f"{config} {k}")
