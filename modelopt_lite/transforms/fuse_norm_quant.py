"""Fuse a normalization or a SwiGLU product with the activation quantizer that reads it.

* ``norm_quant``: RMSNorm (the HF Llama op sequence ``x.to(float32)``, ``pow(2).mean(-1, keepdim)``,
  ``rsqrt(var + eps)``, multiply, ``.to(x.dtype)``, ``weight * h``; or ``rms_norm`` on float32
  tensors) or LayerNorm (``layer_norm``) whose output feeds only ``modelopt_lite.fake_quant`` nodes
  with one spec and one amax -> one ``modelopt_lite.rms_norm_quant`` / ``layer_norm_quant`` node
  (several identical quantizers, e.g. the q/k/v input quantizers, become one).
* ``swiglu_quant``: ``silu(gate) * up`` feeding only such quantizers -> one ``silu_mul_quant`` node.

With ``fuse_unquantized`` (the default), the multi-op RMSNorm chain and the SwiGLU product are
also fused when no quantizer reads them (the op with an empty spec: one kernel instead of eight
or two on CUDA); a single ``layer_norm`` / ``rms_norm`` op without quantizers is left as it is.

A match is left alone when the unquantized value has another reader (a residual add), the
quantizers differ (spec or amax), the dtypes are ones the fused op does not take, or the format
is not one the fused kernel covers (unless ``allow_fallback``). Quantizers whose amaxes are
different buffers holding equal values are merged when ``merge_equal_amax`` (the default).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch
from torch import fx

from ..kernels import norm_quant as _nq
from ..quantization.ops import format_from_spec
from ..trace.graph_utils import get_attr_path
from .pattern import canonical_target, node_meta
from .registry import Transform, TransformConfig, TransformContext, register_transform

__all__ = ["FuseNormQuant", "FuseSwigluQuant"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FQ = "modelopt_lite::fake_quant"
_ASSERTS = ("_assert_tensor_metadata", "_assert_scalar")


class _Config(TransformConfig):
    merge_equal_amax: bool = True
    """Merge quantizers whose amaxes are different buffers with equal values (q/k/v inputs)."""
    allow_fallback: bool = False
    """Also fuse formats the Triton kernel does not cover (the op then runs the PyTorch composition)."""
    fuse_unquantized: bool = True
    """Also fuse a normalization / SwiGLU product that no quantizer reads (the op with an empty spec)."""


def _call(n: Any, *names: str) -> bool:
    return isinstance(n, fx.Node) and n.op in ("call_function", "call_method") and canonical_target(n) in names


def _users(n: fx.Node) -> List[fx.Node]:
    """Readers of `n` other than metadata assertions."""
    return [u for u in n.users if not _call(u, *_ASSERTS)]


def _shape_read(n: fx.Node) -> bool:
    """``t.shape`` / ``t.size()`` / ``t.dim()`` / ``sym_size``: reads of the shape only."""
    if n.op == "call_function" and n.target is getattr:
        return n.args[1:] in (("shape",), ("ndim",))
    return _call(n, "size", "dim", "sym_size")


def _arg(n: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def _dtype_of(v: Any) -> Any:
    """A dtype literal, or the dtype an FX ``getattr(t, "dtype")`` node reads (from t's metadata)."""
    if isinstance(v, fx.Node) and v.op == "call_function" and v.target is getattr and v.args[1:] == ("dtype",):
        return node_meta(v.args[0])[1]
    return v


def _cast_dtype(n: Any) -> Optional[torch.dtype]:
    """The dtype a ``to`` / ``_to_copy`` / ``type`` / ``float`` call casts to (None when it is not such a cast)."""
    if _call(n, "float") and n.op == "call_method" and len(n.args) == 1 and not n.kwargs:
        return torch.float32
    if not _call(n, "to", "_to_copy", "type"):
        return None
    if len(n.args) == 2:
        dt = _dtype_of(n.args[1])
    else:
        dt = _dtype_of(n.kwargs.get("dtype"))
    others = {k for k in n.kwargs if k not in ("dtype", "copy", "non_blocking", "memory_format")}
    return dt if isinstance(dt, torch.dtype) and not others else None


def _other(mul: fx.Node, one: fx.Node) -> Any:
    """The other operand of a two-operand multiply that has `one` as an operand, else None."""
    if not _call(mul, "mul") or len(mul.args) != 2 or mul.kwargs:
        return None
    a, b = mul.args
    return b if a is one else a if b is one else None


def _amax_value(gm: fx.GraphModule, n: fx.Node) -> Optional[torch.Tensor]:
    value = get_attr_path(gm, n.target) if n.op == "get_attr" else None
    return value if isinstance(value, torch.Tensor) else None


def _same_amax(gm: fx.GraphModule, a: Any, b: Any, merge_equal: bool) -> bool:
    if a is b or (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == "get_attr"
                  and a.target == b.target):
        return True
    if not (merge_equal and isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    va, vb = _amax_value(gm, a), _amax_value(gm, b)
    return (va is not None and vb is not None and va.dtype == vb.dtype and va.shape == vb.shape
            and bool(torch.equal(va, vb)))


def _quantizers(gm: fx.GraphModule, out: fx.Node, cfg: _Config, row: int) -> Optional[Tuple[Any, str, Optional[List[fx.Node]]]]:
    """(amax, spec, quantizer nodes) when every reader of `out` is one identical fake_quant;
    (None, "", None) when no reader is a fake_quant and unquantized fusion is on; else None."""
    readers = [u for u in _users(out) if not _shape_read(u)]
    if readers and cfg.fuse_unquantized and not any(_call(u, _FQ) for u in readers):
        return None, "", None
    if not readers or not all(_call(u, _FQ) for u in readers):
        return None
    parts = [(_arg(u, 0, "x"), _arg(u, 1, "amax"), _arg(u, 2, "spec")) for u in readers]
    if any(x is not out or not isinstance(spec, str) for x, _, spec in parts):
        return None
    amax, spec = parts[0][1], parts[0][2]
    if any(s != spec or not _same_amax(gm, amax, a, cfg.merge_equal_amax) for _, a, s in parts[1:]):
        return None
    try:
        fmt = format_from_spec(spec)
    except (ValueError, KeyError, TypeError):
        return None
    if not cfg.allow_fallback:
        if amax is None:
            probe = None
        else:
            shape, _ = node_meta(amax)
            value = _amax_value(gm, amax)
            numel = value.numel() if value is not None else (None if shape is None else int(torch.Size(shape).numel()))
            if numel is None:
                return None
            probe = torch.empty(numel)
        if _nq.kernel_plan(fmt, row, probe) is None:
            return None
    return amax, spec, readers


def _replace(gm: fx.GraphModule, readers: Optional[List[fx.Node]], target, args: tuple, chain: List[fx.Node]) -> None:
    """Insert target(*args) before the first quantizer, rewire all quantizers to it, drop the dead chain.
    Without quantizers (`readers` None) the op takes the place of the chain's output, ``chain[0]``.
    Shape reads of the output (which may come before the quantizers) read ``args[0]`` instead: the
    fused ops keep their first input's shape."""
    graph = gm.graph
    if readers is None:
        readers = [chain[0]]
    else:
        for u in list(chain[0].users):
            if _shape_read(u):
                u.replace_input_with(chain[0], args[0])
    if len(readers) > 1:
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min(readers, key=order.__getitem__)
    else:
        first = readers[0]
    with graph.inserting_before(first):
        new = graph.call_function(target, args)
    for k in ("val", "tensor_meta", "stack_trace", "nn_module_stack"):
        if k in first.meta:
            new.meta[k] = first.meta[k]
    dropped = [a for r in readers[1:] for a in (_arg(r, 1, "amax"),) if isinstance(a, fx.Node) and a is not args[-2]]
    for r in readers:
        r.replace_all_uses_with(new)
        if r is not chain[0]:
            graph.erase_node(r)
    for a in dropped:  # the amax reads of merged quantizers
        if a.op == "get_attr" and not a.users:
            graph.erase_node(a)
    for n in chain:  # outputs first
        if _users(n):
            continue
        for u in list(n.users):
            graph.erase_node(u)
        graph.erase_node(n)


def _float(v: Any) -> bool:
    return isinstance(v, (float, int)) and not isinstance(v, bool)


class _FusionBase(Transform):
    Config = _Config
    ANCHORS: Tuple[str, ...] = ()
    """Ops one of which every match contains (what unquantized fusion looks for)."""

    def applicable(self, gm: fx.GraphModule, ctx: TransformContext) -> Optional[str]:
        if any(_call(n, _FQ) for n in gm.graph.nodes):
            return None
        if not self.config.fuse_unquantized:
            return "no modelopt_lite.fake_quant nodes in the graph"
        if any(_call(n, *self.ANCHORS) for n in gm.graph.nodes):
            return None
        return f"no modelopt_lite.fake_quant or {'/'.join(self.ANCHORS)} nodes in the graph"


@register_transform("norm_quant")
class FuseNormQuant(_FusionBase):
    """RMSNorm / LayerNorm + activation fake quant -> ``rms_norm_quant`` / ``layer_norm_quant``."""

    ANCHORS = ("rsqrt", "rms_norm", "layer_norm")

    def apply(self, gm: fx.GraphModule, ctx: TransformContext) -> int:
        count = 0
        for n in list(gm.graph.nodes):
            if getattr(n, "_erased", False):
                continue
            if _call(n, "rsqrt"):
                count += self._llama_rms(gm, n)
            elif _call(n, "rms_norm"):
                count += self._aten_norm(gm, n, rms=True)
            elif _call(n, "layer_norm"):
                count += self._aten_norm(gm, n, rms=False)
        return count

    def _llama_rms(self, gm: fx.GraphModule, r: fx.Node) -> int:
        add = r.args[0] if len(r.args) == 1 and not r.kwargs else None
        if not _call(add, "add") or len(add.args) != 2 or add.kwargs:
            return 0
        mean, eps = add.args if isinstance(add.args[0], fx.Node) else add.args[::-1]
        if not _call(mean, "mean") or not _float(eps) or isinstance(eps, fx.Node):
            return 0
        dim, keep = _arg(mean, 1, "dim"), _arg(mean, 2, "keepdim", False)
        if dim not in (-1, [-1], (-1,)) or keep is not True or mean.kwargs.get("dtype") is not None:
            return 0
        pw = mean.args[0]
        if not _call(pw, "pow") or len(pw.args) != 2 or pw.args[1] not in (2, 2.0) or isinstance(pw.args[1], bool):
            return 0
        xf = pw.args[0]
        ur = _users(r)
        if len(ur) != 1 or _other(ur[0], r) is not xf:
            return 0
        mul = ur[0]
        um = _users(mul)
        cast_dt = _cast_dtype(um[0]) if len(um) == 1 else None
        if cast_dt is None:
            return 0
        cast = um[0]
        uc = _users(cast)
        if len(uc) != 1 or _other(uc[0], cast) is None:
            return 0
        out, w = uc[0], _other(uc[0], cast)
        if _cast_dtype(xf) == torch.float32:
            x, chain_x = xf.args[0], [xf]
            if any(u not in (pw, mul) for u in _users(xf)):
                chain_x = []
        else:
            x, chain_x = xf, []
        if any(len(_users(c)) != 1 for c in (pw, mean, add)):
            return 0
        xs, xd = node_meta(x)
        ws, wd = node_meta(w)
        if xd not in _DTYPES or cast_dt != xd or wd not in (xd, torch.float32) or ws is None or tuple(ws) != (xs[-1],):
            return 0
        if _cast_dtype(xf) is None and xd != torch.float32:
            return 0
        q = _quantizers(gm, out, self.config, xs[-1])
        if q is None:
            return 0
        amax, spec, readers = q
        dt_reads = [a for a in cast.args[1:] + tuple(cast.kwargs.values()) if isinstance(a, fx.Node)]
        _replace(gm, readers, torch.ops.modelopt_lite.rms_norm_quant.default, (x, w, float(eps), amax, spec),
                 [out, cast, mul, r, add, mean, pw] + chain_x + dt_reads)
        return 1

    def _aten_norm(self, gm: fx.GraphModule, n: fx.Node, rms: bool) -> int:
        x, shape = _arg(n, 0, "input"), _arg(n, 1, "normalized_shape")
        w = _arg(n, 2, "weight")
        b = None if rms else _arg(n, 3, "bias")
        eps = _arg(n, 3 if rms else 4, "eps", None if rms else 1e-5)
        xs, xd = node_meta(x)
        if xd not in _DTYPES or not isinstance(shape, (list, tuple)) or len(shape) != 1 or shape[0] != xs[-1]:
            return 0
        if any(t is not None and (not isinstance(t, fx.Node) or node_meta(t)[1] != xd
                                  or tuple(node_meta(t)[0] or ()) != (xs[-1],)) for t in (w, b)):
            return 0
        if rms:
            # aten.rms_norm equals the Llama formula for float32 only (it rounds once, after the weight)
            if xd != torch.float32 or w is None:
                return 0
            eps = torch.finfo(torch.float32).eps if eps is None else eps
        if not _float(eps):
            return 0
        q = _quantizers(gm, n, self.config, xs[-1])
        if q is None or q[2] is None:
            return 0  # (an unquantized aten norm is one kernel already)
        amax, spec, readers = q
        if rms:
            target, args = torch.ops.modelopt_lite.rms_norm_quant.default, (x, w, float(eps), amax, spec)
        else:
            target, args = torch.ops.modelopt_lite.layer_norm_quant.default, (x, w, b, float(eps), amax, spec)
        _replace(gm, readers, target, args, [n])
        return 1


@register_transform("swiglu_quant")
class FuseSwigluQuant(_FusionBase):
    """``silu(gate) * up`` + activation fake quant -> ``silu_mul_quant``."""

    ANCHORS = ("silu",)

    def apply(self, gm: fx.GraphModule, ctx: TransformContext) -> int:
        count = 0
        for s in list(gm.graph.nodes):
            if getattr(s, "_erased", False) or not _call(s, "silu") or _arg(s, 1, "inplace", False):
                continue
            us = _users(s)
            if len(us) != 1 or _other(us[0], s) is None:
                continue  # (a float product does not depend on the operand order)
            out, gate, up = us[0], s.args[0], _other(us[0], s)
            gs, gd = node_meta(gate)
            ups, ud = node_meta(up) if isinstance(up, fx.Node) else (None, None)
            if gd not in _DTYPES or ud not in _DTYPES or gs is None or tuple(gs) != tuple(ups):
                continue
            q = _quantizers(gm, out, self.config, gs[-1])
            if q is None:
                continue
            amax, spec, readers = q
            _replace(gm, readers, torch.ops.modelopt_lite.silu_mul_quant.default, (gate, up, amax, spec), [out, s])
            count += 1
        return count
