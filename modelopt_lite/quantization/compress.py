"""compress(): replace fake-quantized weights by real low-precision storage.

After `quantize`, every quantized linear layer still holds its float weight
and fake-quantizes it on each call. `compress(model)` quantizes each such
weight once and replaces the layer by a `CompressedLinear` that keeps only
the codes and scales:

* FP8 (E4M3, per tensor or per output channel): one byte per weight, fp32 scales;
* NVFP4: two E2M1 codes per byte, E4M3 scales per 16 weights, one fp32 global scale;
* INT4 blocks (AWQ, GPTQ, weight-only): two codes per byte, fp32 scales per block;
* any other format: one code per weight (int8/uint8/float8) with its scales.

`dequantized_weight()` gives back the fake-quant weight bit for bit. Calls
go through the GEMM registry (`modelopt_lite.kernels.registry`): a Triton
kernel where one fits the formats, the device and the shapes, otherwise
dequantize-then-matmul, which gives exactly the fake-quant model's output.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from ..kernels import registry
from .formats import E2M1, E4M3, IntFormat, QuantFormat, QuantizedTensor, dequant_scale, dequantize, quantize
from .formats.blocks import normalize_axes
from .nn import QuantWeightModule
from .tensor_quantizer import TensorQuantizer

__all__ = ["compress", "CompressedLinear", "weight_storage_kind", "activation_kind", "is_compressed"]


def weight_storage_kind(fmt: QuantFormat) -> str:
    """The storage a weight format gets: fp8, nvfp4, int4 or codes (one code per element)."""
    blocks = fmt.blocks
    last_dim_blocks = set(normalize_axes(tuple(blocks), 2)) == {1} if blocks else False
    e = fmt.element
    if e is E4M3 and fmt.scale is None and not blocks and fmt.axis in (None, (0,), (-2,)):
        return "fp8"
    if e is E2M1 and fmt.scale is E4M3 and last_dim_blocks and blocks.get(-1, blocks.get(1)) == 16:
        return "nvfp4"
    if (isinstance(e, IntFormat) and e.bits == 4 and not e.unsigned and not e.frac_bits and fmt.scale is None
            and last_dim_blocks and blocks.get(-1, blocks.get(1)) is not None):
        return "int4"
    return "codes"


def activation_kind(q: TensorQuantizer) -> str:
    """How the GEMM registry sees an input quantizer: none, fp8_tensor, fp8_token or fake."""
    if not q.is_enabled:
        return "none"
    fmt = q.fmt
    if fmt.element is E4M3 and fmt.scale is None:
        if not fmt.blocks and fmt.axis is None and q.uses_static_amax and q.amax is not None:
            return "fp8_tensor"
        if fmt.blocks == {-1: None}:
            return "fp8_token"
    return "fake"


class CompressedLinear(nn.Module):
    """A linear layer whose weight is stored quantized (see the module docstring).

    Keeps the original layer's input and output quantizers; `pre_quant_scale`
    (SmoothQuant, AWQ) is applied to the input as before.
    """

    def __init__(self, in_features: int, out_features: int, kind: str, fmt: QuantFormat, dtype: torch.dtype,
                 buffers: Dict[str, Optional[torch.Tensor]], bias: Optional[nn.Parameter],
                 input_quantizer: TensorQuantizer, output_quantizer: TensorQuantizer, block: int = 0,
                 original_nbytes: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.kind, self.fmt, self.weight_dtype, self.block = kind, fmt, dtype, block
        self.original_nbytes = original_nbytes
        self._buffer_names = tuple(buffers)
        for name, t in buffers.items():
            self.register_buffer(name, t)
        self.bias = bias
        self.input_quantizer = input_quantizer
        self.output_quantizer = output_quantizer
        self._kernel_cache: Dict[tuple, registry.GemmKernel] = {}

    # ----------------------------------------------------------- storage
    @property
    def compressed_nbytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size()
                   for n in self._buffer_names if getattr(self, n) is not None)

    def packed(self):
        """The 4-bit storage as the kernels take it (nvfp4 and int4 layers)."""
        from ..kernels.w4_gemm import PackedW4

        bufs = {n: getattr(self, n) for n in self._buffer_names}
        return PackedW4.from_buffers(self.kind, self.out_features, self.in_features, self.block, bufs)

    def quantized_tensor(self) -> QuantizedTensor:
        """The stored weight as a QuantizedTensor (layers stored one code per element)."""
        if self.kind != "codes":
            raise TypeError(f"a {self.kind} layer stores packed codes; use packed() or dequantized_weight()")
        return QuantizedTensor(codes=self.codes, fmt=self.fmt, dtype=self.weight_dtype,
                               amax=getattr(self, "amax", None), block_scale=getattr(self, "block_scale", None),
                               global_scale=getattr(self, "global_scale", None))

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight as the fake-quant layer computed with it (bit for bit), in `dtype` (default: the original)."""
        if self.kind in ("nvfp4", "int4"):
            from ..kernels.w4_gemm import dequantize_w4

            w = dequantize_w4(self.packed(), self.weight_dtype)
        elif self.kind == "fp8":
            scale = self.scale.reshape(-1, 1) if self.scale.dim() else self.scale
            w = (self.codes.float() * scale).to(self.weight_dtype)
        else:
            w = dequantize(self.quantized_tensor())
        return w if dtype is None or dtype == w.dtype else w.to(dtype)

    # ----------------------------------------------------------- compute
    def kernel_for(self, x: torch.Tensor) -> registry.GemmKernel:
        """The GEMM-registry kernel this layer uses for activations like `x` (cached per device and dtype)."""
        act = activation_kind(self.input_quantizer)
        key = (x.device, x.dtype, act)
        kernel = self._kernel_cache.get(key)
        if kernel is None:
            call = registry.GemmCall(self.kind, act, x.device, self.out_features, self.in_features, x.dtype)
            kernel = self._kernel_cache[key] = registry.select_gemm(call)
        return kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel_for(x)
        if kernel.quantizes_activation:
            pqs = self.input_quantizer.pre_quant_scale
            if pqs is not None:
                x = x * pqs.to(x.dtype)
        else:
            x = self.input_quantizer(x)
        return self.output_quantizer(kernel.run(self, x))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight={self.fmt.name} "
                f"{self.fmt.granularity} ({self.kind}), bias={self.bias is not None}")


def is_compressed(model: nn.Module) -> bool:
    return any(isinstance(m, CompressedLinear) for m in model.modules())


def _weight_for_storage(module: QuantWeightModule) -> torch.Tensor:
    w = module.weight.detach()
    return w.t() if module.weight_axis_last else w


def _compress_layer(module: QuantWeightModule) -> Optional[CompressedLinear]:
    wq = module.weight_quantizer
    if not wq.is_enabled:
        return None
    w = _weight_for_storage(module)
    if w.dim() != 2:
        return None
    if wq.pre_quant_scale is not None:
        w = w * wq.pre_quant_scale.to(w.dtype)
    fmt = wq.fmt
    amax = wq._amax_for(w)
    glob = wq.global_amax if amax is not None and amax.numel() > 1 else None
    with torch.no_grad():
        qt = quantize(w, fmt, amax, glob)
    kind = weight_storage_kind(fmt)
    n, k = w.shape
    block = 0
    if kind == "nvfp4":
        from ..kernels.w4_gemm import pack_nvfp4

        packed = pack_nvfp4(qt.codes, qt.block_scale, qt.global_scale.reshape(()))
        buffers, block = packed.buffers(), packed.block
    elif kind == "int4":
        from ..kernels.w4_gemm import pack_int4

        block = fmt.blocks.get(-1, fmt.blocks.get(1))
        scale = dequant_scale(qt.amax.reshape(n, -1), fmt.element)
        buffers = pack_int4(qt.codes, scale, block).buffers()
    elif kind == "fp8":
        # Only the dequantization multiplier amax / 448 is kept: the reference dequantizes as codes * that.
        s = dequant_scale(qt.amax, fmt.element)
        buffers = {"codes": qt.codes, "scale": s.reshape(-1) if s.numel() > 1 else s.reshape(())}
    else:
        buffers = {"codes": qt.codes}
        for name in ("amax", "block_scale", "global_scale"):
            if getattr(qt, name) is not None:
                buffers[name] = getattr(qt, name)
    bias = module.bias if isinstance(getattr(module, "bias", None), nn.Parameter) else None
    return CompressedLinear(k, n, kind, fmt, w.dtype, buffers, bias, module.input_quantizer, module.output_quantizer,
                            block=block, original_nbytes=module.weight.numel() * module.weight.element_size())


def compress(model: nn.Module) -> nn.Module:
    """Replace every quantized linear layer's float weight by quantized storage, in place; returns `model`.

    Layers whose weight quantizer is off, and weights that are not 2-D, are
    left as they are. Static weight quantizers use their calibrated amax
    (uncalibrated ones use the weight's own, as fake quantization does).
    """
    replacements = []
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightModule) and not isinstance(module, CompressedLinear):
            replacements.append((name, module))
    if not replacements:
        raise ValueError("compress() found no quantized layers: call quantize(model, config, forward_loop) first")
    for name, module in replacements:
        new = _compress_layer(module)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


# ---------------------------------------------------------------- kernels in the registry
def _fp8_w8a8(module: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
    from ..kernels.fp8_gemm import fp8_linear

    q = module.input_quantizer
    x_amax = q.amax.reshape(()) if activation_kind(q) == "fp8_tensor" else None
    return fp8_linear(x, module.codes, module.scale, x_amax, module.bias, x.dtype)


def _w4_weight_only(module: CompressedLinear, x: torch.Tensor) -> torch.Tensor:
    # The op itself validates its tensors once; the storage was checked when the layer was compressed.
    import modelopt_lite.kernels.w4_gemm  # noqa: F401  (registers the op)

    return torch.ops.modelopt_lite.w4_linear(x, module.w4_data, module.w4_scales, module.w4_global_scale,
                                             module.bias, module.kind, module.out_features, module.in_features,
                                             module.block)


def _fp8_dims_ok(call: registry.GemmCall) -> bool:
    return call.k % 16 == 0 and call.dtype in (torch.bfloat16, torch.float16)


def _w4_dims_ok(call: registry.GemmCall) -> bool:
    return call.dtype in (torch.bfloat16, torch.float16)


registry.register_gemm(registry.GemmKernel(
    name="fp8_w8a8_triton", weights=("fp8",), activations=("fp8_tensor", "fp8_token"), run=_fp8_w8a8,
    min_capability=(8, 9), supports=_fp8_dims_ok, priority=10, quantizes_activation=True,
    description="Triton FP8 GEMM with fused activation quantization (per-tensor or per-token scales)",
), overwrite=True)
registry.register_gemm(registry.GemmKernel(
    name="w4_triton", weights=("nvfp4", "int4"), activations=("none", "fake"), run=_w4_weight_only,
    min_capability=(8, 0), supports=_w4_dims_ok, priority=10,
    description="Triton 4-bit weight GEMM (NVFP4 or INT4 blocks), activations in bf16/fp16 (fake-quantized first)",
), overwrite=True)
