"""optimize() with the default pipeline on whole compressed tiny Llamas (Hugging Face, captured with
torch.export): exact outputs on CPU, the match counts of every transform, fewer operator launches."""

import pytest
import torch

import modelopt_lite.quantization as mtq
from modelopt_lite.models import CausalLMLogits
from modelopt_lite.transforms import count_launches, optimize

pytest.importorskip("transformers")




def _llama(fmt, compress=True):
    from modelopt_lite.models.tiny import build_tiny_model

    model = build_tiny_model("llama").to(torch.bfloat16)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mtq.quantize(model, fmt, lambda m: m(ids))
    if compress:
        mtq.compress(model)
    return CausalLMLogits(model).eval(), ids


# per transform: 2 layers; q/k/v and gate/up fused (4); each layer's 4 GEMMs and the float lm_head lowered (9);
# the 5 RMSNorms (4 feeding quantizers for fp8 / nvfp4, none for weight-only int4_awq) and 2 SwiGLU products fused
EXPECTED = {fmt: {"horizontal_linear": 4, "quantized_linear": 9, "norm_quant": 5, "swiglu_quant": 2}
            for fmt in ("fp8", "nvfp4", "int4_awq")}
QUANTIZED_ACTIVATIONS = {"fp8": True, "nvfp4": True, "int4_awq": False}


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_compressed_tiny_llama_default_pipeline(fmt):
    wrapped, ids = _llama(fmt)
    with torch.no_grad():
        ref = wrapped(ids)
        gm = optimize(wrapped, (ids,), log=False)
        out = gm(ids)
    assert gm.meta["transform_capture"] == "export"
    rep = {r.key: r for r in gm.meta["transform_report"]}
    for key, n in EXPECTED[fmt].items():
        assert (rep[key].matches if rep[key].status == "applied" else None) == n, (key, rep[key])
    assert torch.equal(out, ref)  # the CPU lowering is the module's own dequantize-then-matmul, bit for bit
    # every layer lowered to ops on its storage; the export's shape guard is the one module call left
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["_guards_fn"]
    before, after = count_launches(wrapped, ids), count_launches(gm, ids)
    assert (before.how, after.how) == ("dispatch", "dispatch")
    # 2 x 7 linear layers + lm_head -> 2 x 4 + lm_head GEMMs
    assert (before.by_op["aten::mm"], after.by_op["aten::mm"]) == (15, 9)
    # 5 RMSNorms of 8 ops each (rsqrt one of them) and 2 silu-mul pairs become 5 + 2 fused ops
    assert (before.by_op["aten::rsqrt"], after.by_op["aten::rsqrt"]) == (5, 0)
    assert after.by_op["modelopt_lite::rms_norm_quant"] == 5 and after.by_op["modelopt_lite::silu_mul_quant"] == 2
    if QUANTIZED_ACTIVATIONS[fmt]:
        # the 14 input quantizers: q/k/v + gate/up into the 4 norm ops, down's into the SwiGLU ops; o_proj's 2 stay
        assert (before.by_op["modelopt_lite::fake_quant"], after.by_op["modelopt_lite::fake_quant"]) == (14, 2)
    assert after.kernels < before.kernels


def test_quantlinear_tiny_llama_and_dynamic_sequence():
    """Fake-quant (not compressed) layers through the default pipeline, captured with a dynamic sequence."""
    wrapped, ids = _llama("fp8", compress=False)
    seq = torch.export.Dim.DYNAMIC  # (a named range trips a guard of some transformers versions' mask code)
    with torch.no_grad():
        gm = optimize(wrapped, (ids,), log=False, dynamic_shapes={"input_ids": {1: seq}})
        for n in (9, 5, 17):
            x = torch.randint(0, 100, (2, n), generator=torch.Generator().manual_seed(n))
            assert torch.equal(gm(x), wrapped(x))
    rep = {r.key: r.matches for r in gm.meta["transform_report"]}
    assert rep["quantized_linear"] == 15 and rep["norm_quant"] == 5 and rep["swiglu_quant"] == 2
    assert rep["horizontal_linear"] == 0  # fake-quant weights are not concatenated (only compressed storage is)


def test_count_launches_counts_compute_not_views():
    x = torch.randn(4, 8)
    c = count_launches(lambda t: (t.view(8, 4).t() + 1).relu().sum(), x)
    assert c.kernels == 3 and dict(c.by_op) == {"aten::add": 1, "aten::relu": 1, "aten::sum": 1}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4", "w4a16_nvfp4", "int4_awq"])
def test_cuda_kernels_fewer_launches(fmt):
    """On the GPU the lowered ops are the Triton GEMMs and fused norms: close to the module path, fewer kernels."""
    wrapped, ids = _llama(fmt)
    wrapped, ids = wrapped.cuda(), ids.cuda()
    with torch.no_grad():
        ref = wrapped(ids)
        gm = optimize(wrapped, (ids,), log=False)
        out = gm(ids)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    gemm = "modelopt_lite.fp8_linear.default" if fmt == "fp8" else "modelopt_lite.w4_linear.default"
    assert gemm in ops and "modelopt_lite.rms_norm_quant.default" in ops
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0)
    assert cos > (0.99 if fmt == "nvfp4" else 0.999)  # W4A4: a last-bit change moves activation codes
    before, after = count_launches(wrapped, ids), count_launches(gm, ids)
    assert before.how == "cuda-profiler" and after.kernels < before.kernels
