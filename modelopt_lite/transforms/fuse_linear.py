"""Linear-layer fusions: quantized layers lowered to one GEMM op, and horizontal fusion.

Both work on graphs in which quantized layers are leaves (``call_module`` nodes): capture
with `capture_quantized(model)` (FX, `CompressedLinear` and `TensorQuantizer` kept as leaves)
and pass the GraphModule to `optimize`. Run ``horizontal_linear`` before ``quantized_linear``.

``quantized_linear`` replaces each call of a `QuantLinear` or `CompressedLinear` by the ops it
runs, decided at transform time from the layer's storage, the device of its buffers and the
dtype of its input (``meta["val"]`` / ``meta["tensor_meta"]``), with the GEMM registry's
``kernel_for`` (the same choice the module makes at run time):

* ``fp8_w8a8_triton`` -> ``[x * pre_quant_scale] -> modelopt_lite.fp8_linear(x, codes, scale, x_amax, bias)``;
* ``w4_triton`` -> ``[x * pre_quant_scale] -> [modelopt_lite.fake_quant] -> modelopt_lite.w4_linear(x, ...)``;
* the fallback (CPU, other dtypes) -> ``[pqs] -> [fake_quant] -> F.linear(x, compressed_weight(...), bias)``,
  the exact dequantize-then-matmul of the module (bit-identical); without dtype metadata only when
  the registry gives the fallback for every float dtype on that device, else the call is left;
* `QuantLinear` -> ``fake_quant(x) -> fake_quant(W) -> F.linear`` (any device and dtype).

An enabled output quantizer is emitted after the GEMM. Layers whose quantizers are calibrating,
and CompressedLinear layers served by a kernel this transform does not know, are left alone.

``horizontal_linear`` fuses layers that read the same input node and share storage kind, dtype,
input quantizer (format, amax, pre_quant_scale) and a mergeable weight layout into one layer on
weights concatenated along N, followed by ``torch.split``: float ``nn.Linear`` / QuantLinear with
every quantizer off (float weights); fp8 (per-tensor scales widened to per channel); NVFP4 with
equal global scales and INT4 with equal blocks (codes unpacked and re-packed, exactly); one-code
formats whose scales are per row. Mixed bias / no bias get a zero bias (``zero_bias``).
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from pydantic import field_validator
from torch import fx, nn

from .pattern import node_meta
from .registry import Transform, TransformConfig, TransformContext, register_transform

__all__ = ["QuantizedLinear", "HorizontalLinear", "capture_quantized", "compressed_weight", "gemm_node_count"]

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_META_KEYS = ("val", "tensor_meta")
_STORAGE_KINDS = ("fp8", "nvfp4", "int4", "codes")  # CompressedLinear.kind
_LOWERED_KINDS = ("fake_quant",) + _STORAGE_KINDS
_FUSED_KINDS = ("float",) + _STORAGE_KINDS


def _gemm_targets() -> set:
    from ..kernels import fp8_gemm, w4_gemm  # noqa: F401  (they define the ops)

    return {F.linear, torch.ops.aten.linear.default, torch.ops.modelopt_lite.w4_linear.default,
            torch.ops.modelopt_lite.fp8_linear.default}


def capture_quantized(model: nn.Module) -> fx.GraphModule:
    """FX graph of `model` with CompressedLinear, quantized layers and TensorQuantizer modules as leaves."""
    from .capture import capture_fx

    return capture_fx(model)[0]


def gemm_node_count(gm: fx.GraphModule) -> int:
    """GEMM launches in the graph: linear-like call_module nodes plus linear / quantized-GEMM op calls."""
    from ..quantization.compress import CompressedLinear

    count, targets = 0, _gemm_targets()
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Linear, CompressedLinear)):
            count += 1
        elif n.op == "call_function" and n.target in targets:
            count += 1
    return count


def compressed_weight(like: torch.Tensor, kind: str, n: int, k: int, block: int, weight_dtype: torch.dtype,
                      spec: Optional[str] = None, **bufs: Optional[torch.Tensor]) -> torch.Tensor:
    """`CompressedLinear.dequantized_weight(like.dtype)` from the stored buffers (bit for bit)."""
    if kind in ("nvfp4", "int4"):
        from ..kernels.w4_gemm import PackedW4, dequantize_w4

        w = dequantize_w4(PackedW4.from_buffers(kind, n, k, block, bufs), weight_dtype)
    elif kind == "fp8":
        scale = bufs["scale"]
        w = (bufs["codes"].float() * (scale.reshape(-1, 1) if scale.dim() else scale)).to(weight_dtype)
    else:
        from ..quantization.formats import QuantizedTensor, dequantize
        from ..quantization.ops import format_from_spec

        w = dequantize(QuantizedTensor(codes=bufs["codes"], fmt=format_from_spec(spec), dtype=weight_dtype,
                                       amax=bufs.get("amax"), block_scale=bufs.get("block_scale"),
                                       global_scale=bufs.get("global_scale")))
    return w if w.dtype == like.dtype else w.to(like.dtype)


# ------------------------------------------------------------------ graph helpers
def _copy_meta(dst: fx.Node, src: Any) -> None:
    if isinstance(src, fx.Node):
        for key in _META_KEYS:
            if key in src.meta:
                dst.meta[key] = src.meta[key]


def _quantizer_static(q) -> bool:
    """A quantizer whose behaviour is fixed (not calibrating): it can be written as graph ops."""
    return not q._calibrating


def _emit_quantizer(graph: fx.Graph, x: fx.Node, q, path: str, pqs: bool = True, quant: bool = True) -> fx.Node:
    """The ops of ``TensorQuantizer.forward`` (pre_quant_scale, then fake_quant) applied to `x`."""
    src = x
    if pqs and q.pre_quant_scale is not None:
        s = graph.call_method("type_as", (graph.get_attr(f"{path}._pre_quant_scale"), x))
        x = graph.call_function(operator.mul, (x, s))
        _copy_meta(x, src)
    if not quant or not q.is_enabled or not q._quantizing:
        return x
    amax = graph.get_attr(f"{path}._amax") if q.uses_static_amax and q.amax is not None else None
    if amax is not None and q.amax.numel() > 1 and q.global_amax is not None:
        out = graph.call_function(torch.ops.modelopt_lite.fake_quant_blocks.default,
                                  (x, amax, graph.get_attr(f"{path}._global_amax"), q._spec))
    else:
        out = graph.call_function(torch.ops.modelopt_lite.fake_quant.default, (x, amax, q._spec))
    _copy_meta(out, src)
    return out


def _single_input(node: fx.Node) -> Optional[fx.Node]:
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs and isinstance(node.args[0], fx.Node):
        return node.args[0]
    return None


def is_quant_linear(m: nn.Module) -> bool:
    """A QuantLinear running its own forward on a 2-D [out, in] weight (what the fusions can rewrite)."""
    from ..quantization.nn.linear import QuantLinear

    return (isinstance(m, QuantLinear) and type(m).forward is QuantLinear.forward and not m.weight_axis_last
            and m.weight.dim() == 2)


def _check_kinds(v: List[str], allowed: Tuple[str, ...]) -> List[str]:
    bad = [k for k in v if k not in allowed]
    if bad:
        raise ValueError(f"unknown kinds {bad}; choose from {list(allowed)}")
    return v


# ------------------------------------------------------------------ quantized_linear
@register_transform("quantized_linear")
class QuantizedLinear(Transform):
    """Lowers QuantLinear / CompressedLinear calls to their quantized GEMM ops (see the module docstring)."""

    KINDS = _LOWERED_KINDS

    class Config(TransformConfig):
        kinds: List[str] = list(_LOWERED_KINDS)
        """Layers to lower: ``fake_quant`` (QuantLinear) and CompressedLinear storage kinds."""
        dequant_fallback: bool = True
        """Where the registry gives the fallback, emit dequantize-then-linear (False: leave the call)."""

        @field_validator("kinds")
        @classmethod
        def _known(cls, v: List[str]) -> List[str]:
            return _check_kinds(v, QuantizedLinear.KINDS)

    def _candidates(self, gm: fx.GraphModule) -> List[Tuple[fx.Node, nn.Module]]:
        from ..quantization.compress import CompressedLinear

        out = []
        for n in gm.graph.nodes:
            if _single_input(n) is None:
                continue
            m = gm.get_submodule(n.target)
            if isinstance(m, CompressedLinear) and m.kind in self.config.kinds:
                out.append((n, m))
            elif is_quant_linear(m) and "fake_quant" in self.config.kinds:
                out.append((n, m))
        return out

    def applicable(self, gm: fx.GraphModule, ctx: TransformContext) -> Optional[str]:
        if self._candidates(gm):
            return None
        return "no QuantLinear or CompressedLinear call_module nodes of the configured kinds in the graph"

    def apply(self, gm: fx.GraphModule, ctx: TransformContext) -> int:
        count = 0
        for node, m in self._candidates(gm):
            quantizers = [m.input_quantizer, m.output_quantizer] + ([m.weight_quantizer] if is_quant_linear(m) else [])
            if not all(_quantizer_static(q) for q in quantizers):
                continue
            with gm.graph.inserting_before(node):
                out = self._lower_fake(gm.graph, node, m) if is_quant_linear(m) else self._lower_compressed(gm, node, m)
            if out is None:
                continue
            with gm.graph.inserting_before(node):
                last = _emit_quantizer(gm.graph, out, m.output_quantizer, f"{node.target}.output_quantizer")
            _copy_meta(out, node)
            _copy_meta(last, node)
            node.replace_all_uses_with(last)
            gm.graph.erase_node(node)
            count += 1
        return count

    @staticmethod
    def _lower_fake(graph: fx.Graph, node: fx.Node, m: nn.Module) -> fx.Node:
        p = node.target
        x = _emit_quantizer(graph, node.args[0], m.input_quantizer, f"{p}.input_quantizer")
        w = _emit_quantizer(graph, graph.get_attr(f"{p}.weight"), m.weight_quantizer, f"{p}.weight_quantizer")
        bias = graph.get_attr(f"{p}.bias") if m.bias is not None else None
        return graph.call_function(F.linear, (x, w, bias))

    def _kernel(self, m: nn.Module, dtype: Optional[torch.dtype]):
        """The registry kernel the module would use for inputs of `dtype` (None: unknown dtype)."""
        from ..kernels import registry

        dev = getattr(m, m._buffer_names[0]).device
        if dtype is not None:
            return m.kernel_for(torch.empty(0, device=dev, dtype=dtype))
        picks = {m.kernel_for(torch.empty(0, device=dev, dtype=d)).name for d in _FLOAT_DTYPES}
        return registry.FALLBACK if picks == {registry.FALLBACK.name} else None

    def _lower_compressed(self, gm: fx.GraphModule, node: fx.Node, m: nn.Module) -> Optional[fx.Node]:
        from ..kernels import registry
        from ..quantization.compress import activation_kind

        graph, p, x = gm.graph, node.target, node.args[0]
        dtype = node_meta(x)[1]
        kernel = self._kernel(m, dtype if dtype in _FLOAT_DTYPES else None)
        if kernel is None or (kernel.name == registry.FALLBACK.name
                              and (not self.config.dequant_fallback or not self._spec_roundtrips(m))):
            return None
        if kernel.name != registry.FALLBACK.name and dtype not in KERNEL_DTYPES:
            return None
        iq, iq_path = m.input_quantizer, f"{p}.input_quantizer"
        if kernel.name not in (registry.FALLBACK.name, "fp8_w8a8_triton", "w4_triton"):
            return None  # a kernel this transform cannot write as an op: keep the module call
        bias = graph.get_attr(f"{p}.bias") if m.bias is not None else None
        if kernel.name == registry.FALLBACK.name:
            xq = _emit_quantizer(graph, x, iq, iq_path)
            bufs = {b: graph.get_attr(f"{p}.{b}") for b in m._buffer_names if getattr(m, b) is not None}
            spec = None if m.kind != "codes" else _spec_of(m.fmt)
            w = graph.call_function(compressed_weight, (xq, m.kind, m.out_features, m.in_features, m.block,
                                                        m.weight_dtype, spec), bufs)
            b = graph.call_method("type_as", (bias, xq)) if bias is not None else None
            return graph.call_function(F.linear, (xq, w, b))
        if kernel.name == "fp8_w8a8_triton":
            xs = _emit_quantizer(graph, x, iq, iq_path, quant=False)
            amax = None
            if activation_kind(iq) == "fp8_tensor":
                amax = graph.call_method("reshape", (graph.get_attr(f"{iq_path}._amax"), ()))
            return graph.call_function(torch.ops.modelopt_lite.fp8_linear.default,
                                       (xs, graph.get_attr(f"{p}.codes"), graph.get_attr(f"{p}.scale"), amax, bias,
                                        dtype, False))
        xq = _emit_quantizer(graph, x, iq, iq_path)  # w4_triton: weight-only, the input fake-quantized first
        gs = graph.get_attr(f"{p}.w4_global_scale") if m.kind == "nvfp4" else None
        return graph.call_function(torch.ops.modelopt_lite.w4_linear.default,
                                   (xq, graph.get_attr(f"{p}.w4_data"), graph.get_attr(f"{p}.w4_scales"), gs,
                                    bias, m.kind, m.out_features, m.in_features, m.block))

    @staticmethod
    def _spec_roundtrips(m: nn.Module) -> bool:
        if m.kind != "codes":
            return True
        from ..quantization.ops import format_from_spec

        return format_from_spec(_spec_of(m.fmt)) == m.fmt


def _spec_of(fmt) -> str:
    from ..quantization.ops import format_to_spec

    return format_to_spec(fmt)

# ------------------------------------------------------------------ horizontal_linear
def _tensor_key(t: Optional[torch.Tensor]) -> Any:
    if t is None:
        return None
    t = t.detach()
    return (str(t.dtype), tuple(t.shape), tuple(t.float().flatten().cpu().tolist()))


def _quantizer_key(q) -> Any:
    """Everything that decides what a TensorQuantizer does to its input (format only when it is on)."""
    if not q.is_enabled:
        return (False, q._calibrating, _tensor_key(q.pre_quant_scale))
    return (q.is_enabled, q._spec, q.uses_static_amax, q._quantizing, q._calibrating, _tensor_key(q.amax),
            _tensor_key(q.global_amax), _tensor_key(q.pre_quant_scale))


def _float_linear(m: nn.Module) -> bool:
    """A layer computing plain ``F.linear(x, weight, bias)``."""
    if type(m) is nn.Linear:
        return True
    return is_quant_linear(m) and all(not q.is_enabled and q.pre_quant_scale is None for q in
                                       (m.input_quantizer, m.weight_quantizer, m.output_quantizer))


def _codes_per_row(m: nn.Module) -> bool:
    """A one-code-per-element layer whose scales all run along N (rows), so rows concatenate exactly."""
    if getattr(m, "global_scale", None) is not None:
        return False
    for name in ("amax", "block_scale"):
        t = getattr(m, name, None)
        if t is not None and (t.dim() == 0 or t.shape[0] != m.out_features or t.numel() == 1):
            return False
    return getattr(m, "amax", None) is not None or getattr(m, "block_scale", None) is not None


def _layer_key(m: nn.Module) -> Optional[tuple]:
    """Layers with equal keys can share one GEMM on concatenated weights; None: never fused."""
    from ..quantization.compress import CompressedLinear

    if _float_linear(m):
        return ("float", m.weight.dtype, m.weight.device, m.in_features)
    if not isinstance(m, CompressedLinear) or m.output_quantizer.is_enabled or m.input_quantizer._calibrating:
        return None
    base = (m.kind, m.weight_dtype, getattr(m, m._buffer_names[0]).device, m.in_features,
            _quantizer_key(m.input_quantizer))
    if m.kind == "fp8":
        return base + (m.codes.dtype,)
    if m.kind == "nvfp4":
        return base + (_tensor_key(m.w4_global_scale),)
    if m.kind == "int4":
        return base + (m.block,)
    if not _codes_per_row(m):
        return None
    return base + (_spec_of(m.fmt), m.codes.dtype, tuple(n for n in ("amax", "block_scale") if getattr(m, n, None) is not None))


def _cat_bias(mods: List[nn.Module], dtype: torch.dtype, device: torch.device) -> Optional[nn.Parameter]:
    if all(m.bias is None for m in mods):
        return None
    parts = [m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, dtype=dtype, device=device)
             for m in mods]
    return nn.Parameter(torch.cat(parts), requires_grad=False)


def _unpacked(m: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """(codes [n, k], scales [n, blocks]) of a 4-bit layer, as pack_nvfp4 / pack_int4 take them."""
    from ..kernels.w4_layout import decode_nv_scales, unpack_words

    p = m.packed()
    codes = unpack_words(p.data, p.kind, p.q, p.n, p.k)
    nb = -(-p.k // p.block)
    if p.kind == "nvfp4":
        return codes.to(torch.uint8), decode_nv_scales(p.scales[:p.n, :nb]).to(torch.float8_e4m3fn)
    return (codes - 8).to(torch.int8), p.scales[:p.n, :nb]


def _fuse_compressed(mods: List[nn.Module]) -> nn.Module:
    from ..kernels.w4_gemm import pack_int4, pack_nvfp4
    from ..quantization.compress import CompressedLinear

    first, kind = mods[0], mods[0].kind
    dev = getattr(first, first._buffer_names[0]).device
    n = sum(m.out_features for m in mods)
    if kind == "fp8":
        scales = [m.scale.reshape(-1) for m in mods]
        if all(s.numel() == 1 for s in scales) and all(torch.equal(s, scales[0]) for s in scales):
            scale = mods[0].scale.clone()
        else:
            scale = torch.cat([s.expand(m.out_features) if s.numel() == 1 else s for s, m in zip(scales, mods)])
        bufs = {"codes": torch.cat([m.codes for m in mods]), "scale": scale.float()}
    elif kind in ("nvfp4", "int4"):
        parts = [_unpacked(m) for m in mods]
        codes, scales = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
        packed = (pack_nvfp4(codes, scales, first.w4_global_scale) if kind == "nvfp4"
                  else pack_int4(codes, scales, first.block))
        bufs = packed.buffers()
    else:
        bufs = {"codes": torch.cat([m.codes for m in mods])}
        for name in ("amax", "block_scale"):
            if getattr(first, name, None) is not None:
                bufs[name] = torch.cat([getattr(m, name) for m in mods])
    bias = _cat_bias(mods, first.weight_dtype, dev)
    return CompressedLinear(first.in_features, n, kind, first.fmt, first.weight_dtype, bufs, bias,
                            copy.deepcopy(first.input_quantizer), copy.deepcopy(first.output_quantizer),
                            block=first.block, original_nbytes=sum(m.original_nbytes for m in mods))


def _fuse_float(mods: List[nn.Module]) -> nn.Linear:
    w = torch.cat([m.weight.detach() for m in mods])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    fused.weight = nn.Parameter(w, requires_grad=False)
    fused.bias = _cat_bias(mods, w.dtype, w.device)
    return fused


@register_transform("horizontal_linear")
class HorizontalLinear(Transform):
    """Fuses linear layers that read the same input into one GEMM plus a split (see the module docstring)."""

    KINDS = _FUSED_KINDS

    class Config(TransformConfig):
        min_group: int = 2
        """Fuse groups of at least this many layers (>= 2)."""
        kinds: List[str] = list(_FUSED_KINDS)
        """Layer kinds to fuse: ``float`` (nn.Linear, QuantLinear with quantizers off) and CompressedLinear storage kinds."""
        zero_bias: bool = True
        """Give a zero bias to the layers without one when others have one (False: such groups split by bias)."""

        @field_validator("kinds")
        @classmethod
        def _known(cls, v: List[str]) -> List[str]:
            return _check_kinds(v, HorizontalLinear.KINDS)

        @field_validator("min_group")
        @classmethod
        def _at_least_two(cls, v: int) -> int:
            if v < 2:
                raise ValueError(f"min_group must be at least 2 (a single layer is not fused), got {v}")
            return v

    def _groups(self, gm: fx.GraphModule) -> List[List[fx.Node]]:
        by_key: Dict[tuple, List[fx.Node]] = {}
        seen_targets: Dict[fx.Node, set] = {}
        for n in gm.graph.nodes:
            x = _single_input(n)
            if x is None:
                continue
            m = gm.get_submodule(n.target)
            key = _layer_key(m)
            if key is None or key[0] not in self.config.kinds or n.target in seen_targets.setdefault(x, set()):
                continue
            seen_targets[x].add(n.target)
            if not self.config.zero_bias:
                key = key + (m.bias is not None,)
            by_key.setdefault((x,) + key, []).append(n)
        return [g for g in by_key.values() if len(g) >= self.config.min_group]

    def applicable(self, gm: fx.GraphModule, ctx: TransformContext) -> Optional[str]:
        if self._groups(gm):
            return None
        return f"no {self.config.min_group}+ fusable linear layers read the same input"

    def apply(self, gm: fx.GraphModule, ctx: TransformContext) -> int:
        count = 0
        for group in self._groups(gm):
            mods = [gm.get_submodule(n.target) for n in group]
            fused = _fuse_float(mods) if _float_linear(mods[0]) else _fuse_compressed(mods)
            name = _free_name(gm, "fused_" + "_".join(n.target.replace(".", "_") for n in group))
            gm.add_submodule(name, fused)
            graph, x = gm.graph, group[0].args[0]
            sizes = [m.out_features for m in mods]
            with graph.inserting_before(group[0]):
                node = graph.call_module(name, (x,))
                parts = graph.call_function(torch.split, (node, sizes), {"dim": -1})
                outs = [graph.call_function(operator.getitem, (parts, i)) for i in range(len(group))]
            _fused_meta(node, group)
            for old, new in zip(group, outs):
                _copy_meta(new, old)
                old.replace_all_uses_with(new)
                graph.erase_node(old)
            count += 1
        return count


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _fused_meta(node: fx.Node, group: List[fx.Node]) -> None:
    """tensor_meta of the fused output, when every part has metadata."""
    from torch.fx.passes.shape_prop import _extract_tensor_metadata

    metas = [node_meta(n) for n in group]
    if any(s is None for s, _ in metas):
        return
    shape = (*metas[0][0][:-1], sum(s[-1] for s, _ in metas))
    node.meta["tensor_meta"] = _extract_tensor_metadata(torch.empty(shape, dtype=metas[0][1], device="meta"))
