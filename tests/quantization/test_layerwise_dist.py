"""Layer-wise calibration equals the full pass; data-parallel calibration equals one process on all data."""

import pytest
import torch

from modelopt_lite.models.tiny import build_tiny_model
from modelopt_lite.quantization import quantize
from modelopt_lite.quantization.conversion import named_quantizers
from modelopt_lite.quantization.layerwise import find_decoder_layers

from dist_harness import run_ranks


def _batches(n=4, seed=0, vocab=100, seq=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, seq), generator=g) for _ in range(n)]


def _loop(batches):
    def loop(model):
        for ids in batches:
            model(input_ids=ids)

    return loop


def _model(name="llama"):
    torch.manual_seed(0)
    return build_tiny_model(name).eval()


def _amaxes(model):
    return {n: q.amax.clone() for n, q in named_quantizers(model) if q.amax is not None}


@pytest.mark.parametrize("qformat", ["int8", "fp8"])
def test_layerwise_float_feed_equals_full_max(qformat):
    batches = _batches()
    full = quantize(_model(), qformat, _loop(batches), share_input_amax=False)
    lw = quantize(_model(), qformat, _loop(batches), share_input_amax=False,
                  layerwise={"layers": True, "feed": "float"})
    a, b = _amaxes(full), _amaxes(lw)
    assert set(a) == set(b) and len(a) == 28  # 2 layers x 7 linears x (input, weight)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-6, atol=0, msg=n)
    ids = batches[0]
    torch.testing.assert_close(lw(input_ids=ids).logits, full(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_layerwise_quantized_feed_sees_quantized_inputs():
    """Layer 0 sees the same inputs either way; layer 1 sees layer 0's quantized outputs."""
    batches = _batches()
    full = quantize(_model(), "int8", _loop(batches), share_input_amax=False)
    lw = quantize(_model(), "int8", _loop(batches), share_input_amax=False, layerwise=True)
    a, b = _amaxes(full), _amaxes(lw)
    for n in a:
        if n.startswith("model.layers.0.") or "weight_quantizer" in n:
            torch.testing.assert_close(b[n], a[n], rtol=0, atol=0, msg=n)
    first = "model.layers.1.self_attn.q_proj.input_quantizer"
    assert not torch.equal(a[first], b[first])
    torch.testing.assert_close(b[first], a[first], rtol=0.1, atol=0)  # close, not equal


def test_layerwise_finds_stack_and_refuses_bad_input():
    m = _model()
    name, stack = find_decoder_layers(quantize(m, "int8", None, share_input_amax=False))
    assert name == "model.layers" and len(stack) == 2
    with pytest.raises(ValueError, match="no module 'model.nope'"):
        quantize(_model(), "int8", _loop(_batches(1)), layerwise="model.nope")
    with pytest.raises(ValueError, match="needs a forward_loop"):
        quantize(_model(), "int8", None, layerwise=True)
    with pytest.raises(ValueError, match="feed must be one of"):
        quantize(_model(), "int8", _loop(_batches(1)), layerwise={"feed": "fp16"})


def test_layerwise_calibrates_quantizers_outside_the_layers():
    cfg = {"quant_cfg": {"default": {"enable": False}, "*weight_quantizer": {"num_bits": 8, "axis": 0},
                         "*input_quantizer": {"num_bits": 8}}, "algorithm": "max"}
    batches = _batches()
    full = quantize(_model(), cfg, _loop(batches), share_input_amax=False)
    lw = quantize(_model(), cfg, _loop(batches), share_input_amax=False, layerwise={"feed": "float"})
    torch.testing.assert_close(_amaxes(lw)["lm_head.input_quantizer"], _amaxes(full)["lm_head.input_quantizer"],
                               rtol=1e-6, atol=0)


DP_CASES = [("int8", False), ("nvfp4", False), ("fp8", True)]  # (qformat, layerwise)


def _dp_rank(rank, world):
    mine = _batches(4)[rank::world]
    return [_amaxes(quantize(_model(), q, _loop(mine), share_input_amax=(q == "int8"), layerwise=lw))
            for q, lw in DP_CASES]


def test_two_gloo_ranks_equal_one_process():
    """Each rank sees half the batches; every amax equals one process calibrating on all of them."""
    ranks = run_ranks(_dp_rank)  # one process group for all cases: spawning is the slow part
    for case, (q, lw) in enumerate(DP_CASES):
        ref = _amaxes(quantize(_model(), q, _loop(_batches(4)), share_input_amax=(q == "int8"), layerwise=lw))
        assert len(ref) >= 28
        for r in ranks:
            got = r[case]
            assert set(got) == set(ref)
            for n in ref:
                torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=f"{q}: {n}")
