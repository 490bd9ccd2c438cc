"""compress(): quantized weight storage, exact dequantization, the GEMM registry, bytes in the summary, generation."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

import modelopt_lite.quantization as mtq  # noqa: E402
from modelopt_lite.kernels import registry  # noqa: E402
from modelopt_lite.models.tiny import build_tiny_model  # noqa: E402
from modelopt_lite.quantization import CompressedLinear, compress  # noqa: E402
from modelopt_lite.quantization.compress import activation_kind, weight_storage_kind  # noqa: E402
from modelopt_lite.quantization.formats import QuantFormat  # noqa: E402

# preset -> (storage of the decoder's linear layers, activation kind the registry sees, bytes ratio vs fp32 weights)
CASES = {
    "fp8": ("fp8", "fp8_tensor", 4.0),
    "fp8_pc_pt": ("fp8", "fp8_token", 3.76),
    "nvfp4": ("nvfp4", "fake", None),
    "int4_awq": ("int4", "none", None),
    "w4a8_awq": ("int4", "fp8_tensor", None),  # no W4A8 kernel: fake-quant FP8 activations, then W4A16
    "int8_sq": ("codes", "fake", 3.9),
    "mxfp8": ("codes", "fake", 3.88),
}


def ids(batch=2, seq=8, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def quantized():
    cache = {}

    def get(qformat):
        if qformat not in cache:
            model = build_tiny_model("llama", seed=0).eval()
            batches = [ids(seed=s) for s in range(2)]

            def loop(m):
                for b in batches:
                    m(b)

            cache[qformat] = mtq.quantize(model, mtq.get_config(qformat), forward_loop=loop)
        return copy.deepcopy(cache[qformat])

    return get


@pytest.mark.parametrize("qformat", sorted(CASES))
def test_compressed_model_matches_fake_quant_exactly_on_cpu(quantized, qformat):
    model = quantized(qformat)
    x = ids(seed=5)
    with torch.no_grad():
        ref = model(x).logits
        fq_weights = {n: m.quantized_weight().detach().clone() for n, m in model.named_modules()
                      if isinstance(m, mtq.QuantWeightModule) and m.weight_quantizer.is_enabled}
    compress(model)
    kind, act, ratio = CASES[qformat]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert set(layers) == set(fq_weights) and len(layers) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name, m in layers.items():
        assert m.kind == kind, name
        assert activation_kind(m.input_quantizer) == act, name
        assert torch.equal(m.dequantized_weight(), fq_weights[name]), name
        assert m.kernel_for(x.float()) is registry.FALLBACK  # CPU: dequantize-then-matmul
        assert not hasattr(m, "weight")
    with torch.no_grad():
        out = model(x).logits
    assert torch.equal(out, ref)
    b = mtq.weight_bytes(model)
    assert b["compressed_layers"] == 14 and b["uncompressed_layers"] == 0
    assert b["before"] == sum(t.numel() * 4 for t in fq_weights.values())
    if ratio is not None:  # the 4-bit layouts pad these tiny layers to the kernels' tiles: see the test below
        assert b["before"] / b["after"] == pytest.approx(ratio, rel=0.03)


@pytest.mark.parametrize("cfg,ratio", [
    ({"num_bits": (4, 3), "axis": None}, 4 * 512 * 1024 / (512 * 1024 + 4)),
    ({"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}},
     4 * 512 * 1024 / (512 * 1024 / 2 + 512 * 1024 / 16 + 4)),
    ({"num_bits": 4, "block_sizes": {-1: 128}}, 4 * 512 * 1024 / (512 * 1024 / 2 + 4 * 1024 * 4)),
])
def test_storage_bytes_of_a_real_sized_layer(cfg, ratio):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024))
    qcfg = {"quant_cfg": {"default": {"enable": False}, "*weight_quantizer": cfg}, "algorithm": "max"}
    mtq.quantize(model, qcfg, forward_loop=lambda m: m(torch.randn(4, 512)))
    ref = model[0].quantized_weight().detach().clone()
    compress(model)
    b = mtq.weight_bytes(model)
    assert b["before"] == 512 * 1024 * 4
    assert b["before"] / b["after"] == pytest.approx(ratio, rel=1e-9)
    assert torch.equal(model[0].dequantized_weight(), ref)


def test_summary_reports_bytes_before_and_after(quantized, capsys):
    model = quantized("nvfp4")
    mtq.print_quant_summary(model)
    before = capsys.readouterr().out
    assert "stored in float" in before
    compress(model)
    mtq.print_quant_summary(model)
    text = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj.weight" in text and "stored nvfp4" in text
    line = [ln for ln in text.splitlines() if ln.startswith("weights of quantized layers")][0]
    b = mtq.weight_bytes(model)
    assert f"{b['before'] / 2**20:.2f} MiB before compression" in line
    assert f"{b['after'] / 2**20:.2f} MiB after" in line and "14 layers compressed" in line


@pytest.mark.parametrize("qformat", ["fp8", "nvfp4", "int4_awq"])
def test_generation_after_compress_equals_fake_quant(quantized, qformat):
    model = quantized(qformat)
    prompt = ids(batch=1, seq=5, seed=9)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        compress(model)
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    assert torch.equal(out, ref)


def test_compress_requires_a_quantized_model():
    with pytest.raises(ValueError, match="quantize"):
        compress(build_tiny_model("llama"))


def test_layers_with_weight_quantizer_off_are_left_alone(quantized):
    model = quantized("fp8")
    mtq.disable_quantizer(model, "*mlp*weight_quantizer")
    compress(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, CompressedLinear)
    assert not isinstance(model.model.layers[0].mlp.up_proj, CompressedLinear)
    b = mtq.weight_bytes(model)
    assert b["compressed_layers"] == 8


@pytest.mark.parametrize("cfg,kind", [
    (dict(num_bits=(4, 3)), "fp8"),
    (dict(num_bits=(4, 3), axis=0), "fp8"),
    (dict(num_bits=(4, 3), block_sizes={-1: 128, -2: 128}), "codes"),
    (dict(num_bits=(2, 1), block_sizes={-1: 16}, scale_bits=(4, 3)), "nvfp4"),
    (dict(num_bits=(2, 1), block_sizes={-1: 32}, scale_bits=(8, 0)), "codes"),
    (dict(num_bits=4, block_sizes={-1: 128}), "int4"),
    (dict(num_bits=4, block_sizes={-1: 64}), "int4"),
    (dict(num_bits=4, axis=0), "codes"),
    (dict(num_bits=8, axis=0), "codes"),
])
def test_storage_kind_of_formats(cfg, kind):
    assert weight_storage_kind(QuantFormat.create(**cfg)) == kind


def _call(weight="fp8", act="fp8_tensor", device="cpu", k=64):
    return registry.GemmCall(weight, act, torch.device(device), 32, k, torch.bfloat16)


def test_registry_picks_by_priority_and_checks():
    seen = []
    low = registry.GemmKernel(name="t_low", weights=("codes",), activations=("fake",), run=lambda m, x: seen.append(1),
                              needs_cuda=False, needs_triton=False, priority=1)
    high = registry.GemmKernel(name="t_high", weights=("codes",), activations=("fake",), run=lambda m, x: None,
                               needs_cuda=False, needs_triton=False, priority=5, supports=lambda c: c.k % 128 == 0)
    try:
        registry.register_gemm(low)
        registry.register_gemm(high)
        assert registry.select_gemm(_call("codes", "fake", k=256)) is high
        assert registry.select_gemm(_call("codes", "fake", k=64)) is low  # shape check refuses the faster one
        assert registry.select_gemm(_call("codes", "none")) is registry.FALLBACK
        with pytest.raises(ValueError, match="already registered"):
            registry.register_gemm(low)
        with pytest.raises(ValueError, match="unknown weight storage"):
            registry.register_gemm(registry.GemmKernel(name="bad", weights=("fp4",), activations=("none",),
                                                       run=lambda m, x: None))
    finally:
        for k in (low, high):
            registry._REGISTRY.remove(k)


def test_registry_kernels_need_cuda_and_capability():
    names = [k.name for k in registry.registered_gemms()]
    assert "fp8_w8a8_triton" in names and "w4_triton" in names
    assert registry.select_gemm(_call("fp8", "fp8_tensor")) is registry.FALLBACK  # CPU
    fp8 = next(k for k in registry.registered_gemms() if k.name == "fp8_w8a8_triton")
    assert fp8.min_capability == (8, 9) and fp8.quantizes_activation
    assert not fp8.accepts(_call("fp8", "fp8_tensor", device="cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qformat,kernel", [("fp8", "fp8_w8a8_triton"), ("fp8_pc_pt", "fp8_w8a8_triton"),
                                            ("nvfp4", "w4_triton"), ("w4a16_nvfp4", "w4_triton"),
                                            ("int4_awq", "w4_triton"), ("w4a8_awq", "w4_triton")])
def test_compressed_generation_on_gpu_uses_the_kernels(qformat, kernel):
    model = build_tiny_model("llama", seed=0).to("cuda", torch.bfloat16).eval()
    batches = [ids(seed=s).cuda() for s in range(2)]

    def loop(m):
        for b in batches:
            m(b)

    mtq.quantize(model, mtq.get_config(qformat), forward_loop=loop)
    x = ids(seed=5).cuda()
    prompt = ids(batch=2, seq=5, seed=9).cuda()
    with torch.no_grad():
        ref = model(x).logits.float()
        compress(model)
        out = model(x).logits.float()
        tokens = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.kernel_for(x.to(torch.bfloat16)).name == kernel
    cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
    # The kernels round differently from bf16 F.linear in the last bit; NVFP4 activations (W4A4) re-quantize
    # each layer's input, so a last-bit difference can move a value across a 4-bit rounding boundary.
    four_bit_acts = qformat == "nvfp4"
    assert cos > (0.99 if four_bit_acts else 0.999), cos
    assert (out - ref).abs().max().item() < (0.15 if four_bit_acts else 0.05) * ref.abs().max().item()
    assert tokens.shape == (2, 13) and torch.equal(tokens[:, :5], prompt)
