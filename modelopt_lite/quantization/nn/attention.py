"""Quantized Hugging Face attention: the KV cache (k/v), the query and the softmax output.

Attention modules of transformers compute the q/k/v projections, apply
rotary embeddings, update the cache, then look the attention function up
with ``ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)``
and call it as ``fn(self, query, key, value, attention_mask, ...)``. The
key and value handed to that function are exactly what a KV cache stores:
post-RoPE, ``[batch, kv_heads, seq, head_dim]``.

`QuantAttention` adds four quantizers, all off until a config turns them
on: ``q_bmm_quantizer``, ``k_bmm_quantizer`` and ``v_bmm_quantizer`` (the
inputs of the two attention matmuls; k and v are the KV cache, whose scales
the exporters write as ``k_proj.k_scale`` / ``v_proj.v_scale``) and
``softmax_quantizer`` (the attention probabilities). When one is on, the
module's forward runs with the two names its code resolves the attention
function through (``ALL_ATTENTION_FUNCTIONS`` and ``eager_attention_forward``
in the globals of the module that defines the forward) replaced by stand-ins
that fake-quantize q/k/v right before whatever implementation is selected
(eager, sdpa, flash, flex, paged or one registered by the user), so the
quantization follows the model's own choice.

Softmax quantization needs the probabilities, which fused kernels never
materialise: with ``softmax_quantizer`` on, attention is computed by
`softmax_quantized_attention` (eager math: QK^T, scaling, soft-capping,
mask, softmax in float32, the quantizer, dropout, PV) whatever the model's
implementation, and sdpa or flash masks are converted to that math.

The replacement is a context manager that always restores the globals. It is
reference-counted per modeling file under a lock, and the stand-ins pass
calls from modules that are not quantized attention through unchanged, so
other threads and unquantized models using the same modeling file are not
affected; the one visible effect is that, while a quantized attention forward
runs, that file's ``ALL_ATTENTION_FUNCTIONS`` is a proxy of the real one
(reads and registrations go through to it).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ...trace.tracer import register_container
from ..tensor_quantizer import TensorQuantizer
from .base import QUANT_MODULES, QuantModule, register_quant_module

__all__ = [
    "QuantAttention", "ATTENTION_QUANTIZERS", "softmax_quantized_attention", "is_hf_attention_class",
    "register_hf_attention_classes",
]

ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")
_INTERFACE_NAME = "ALL_ATTENTION_FUNCTIONS"
_EAGER_NAME = "eager_attention_forward"
_QKV = ("query", "key", "value")

_active = threading.local()  # per thread: stack of [attention module, number of attention calls seen]


# --------------------------------------------------------------------------- the stand-ins


def _wrap(fn: Callable) -> Callable:
    """`fn` (an attention function) made to quantize when called by a `QuantAttention`."""
    if getattr(fn, "_modelopt_lite_attention", None) is not None or not callable(fn):
        return fn

    def attention(module, *args, **kwargs):
        if not isinstance(module, QuantAttention):
            return fn(module, *args, **kwargs)
        return module._quantized_attention(fn, args, kwargs)

    attention._modelopt_lite_attention = fn
    attention.__name__ = getattr(fn, "__name__", "attention")
    attention.__doc__ = getattr(fn, "__doc__", None)
    return attention


class _InterfaceProxy:
    """Stands in for a modeling file's ``ALL_ATTENTION_FUNCTIONS``: every function it hands out quantizes."""

    def __init__(self, interface):
        self._interface = interface

    def get_interface(self, attn_implementation, default):
        return _wrap(self._interface.get_interface(attn_implementation, default))

    def get(self, key, default=None):
        fn = self._interface.get(key, default)
        return _wrap(fn) if fn is not None else None

    def __getitem__(self, key):
        return _wrap(self._interface[key])

    def __setitem__(self, key, value):
        self._interface[key] = value

    def __delitem__(self, key):
        del self._interface[key]

    def __contains__(self, key):
        return key in self._interface

    def __iter__(self):
        return iter(self._interface)

    def __len__(self):
        return len(self._interface)

    def __getattr__(self, name):
        return getattr(self._interface, name)


_lock = threading.Lock()
_installed: Dict[int, List[Any]] = {}  # id(globals) -> [count, originals]


@contextlib.contextmanager
def _intercepted(namespace: Dict[str, Any]):
    """Replace the attention names in `namespace` (a module's globals) for the duration; always restored."""
    key = id(namespace)
    with _lock:
        entry = _installed.get(key)
        if entry is None:
            originals = {n: namespace[n] for n in (_INTERFACE_NAME, _EAGER_NAME) if n in namespace}
            entry = _installed[key] = [0, originals]
            if _INTERFACE_NAME in originals:
                namespace[_INTERFACE_NAME] = _InterfaceProxy(originals[_INTERFACE_NAME])
            if _EAGER_NAME in originals:
                namespace[_EAGER_NAME] = _wrap(originals[_EAGER_NAME])
        entry[0] += 1
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                namespace.update(entry[1])
                del _installed[key]


def _forward_function(cls: type) -> Optional[Callable]:
    """The Python function that runs as `cls.forward` (decorators unwrapped), or None."""
    forward = getattr(cls, "forward", None)
    if forward is None:
        return None
    fn = inspect.unwrap(forward)
    return fn if inspect.isfunction(fn) else None


_NAMESPACES: Dict[type, Dict[str, Any]] = {}


def _namespace(cls: type) -> Dict[str, Any]:
    """The globals through which `cls.forward` resolves its attention function."""
    ns = _NAMESPACES.get(cls)
    if ns is None:
        fn = _forward_function(cls)
        if fn is None:
            raise TypeError(f"{cls.__qualname__} has no Python forward to quantize")
        ns = _NAMESPACES[cls] = fn.__globals__
    return ns


# --------------------------------------------------------------------------- the quantized module


class QuantAttention(QuantModule):
    """Mixin for transformers attention modules: q/k/v and softmax quantizers (off by default)."""

    def _setup(self) -> None:
        for name in ATTENTION_QUANTIZERS:
            q = self._new_quantizer({"num_bits": 8, "axis": None})
            q.disable()
            setattr(self, name, q)
        _namespace(self._original_class)  # fail at conversion, not at the first forward

    def _new_quantizer(self, attrs) -> TensorQuantizer:
        q = TensorQuantizer(attrs)
        ref = next(self.parameters(), None)  # attention keeps its parameters in the projections
        return q.to(ref.device) if ref is not None else q

    @property
    def quantizes_attention(self) -> bool:
        """True when any of the four attention quantizers is on."""
        return any(getattr(self, n).is_enabled for n in ATTENTION_QUANTIZERS)

    def forward(self, *args, **kwargs):
        """The original forward; with an attention quantizer on, its attention function quantizes (see module doc)."""
        if not self.quantizes_attention:
            return super().forward(*args, **kwargs)
        stack = _active.__dict__.setdefault("stack", [])
        frame = [self, 0]
        stack.append(frame)
        try:
            with _intercepted(_namespace(self._original_class)):
                out = super().forward(*args, **kwargs)
        finally:
            stack.pop()
        if frame[1] == 0:
            raise RuntimeError(
                f"{type(self).__name__}: the forward did not call the attention function through "
                f"{_INTERFACE_NAME} (e.g. GPT-2 with reorder_and_upcast_attn and eager attention), so the "
                "attention quantizers could not be applied; use attn_implementation='sdpa' or turn that option off")
        return out

    def _quantized_attention(self, fn: Callable, args: Tuple, kwargs: Dict[str, Any]):
        """Fake-quantize q/k/v, then run `fn` (or the eager math when the softmax is quantized)."""
        stack = getattr(_active, "stack", None)
        if stack and stack[-1][0] is self:
            stack[-1][1] += 1
        args, kwargs = list(args), dict(kwargs)
        for i, (name, attr) in enumerate(zip(_QKV, ATTENTION_QUANTIZERS)):
            if i < len(args):
                args[i] = getattr(self, attr)(args[i])
            elif name in kwargs:
                kwargs[name] = getattr(self, attr)(kwargs[name])
            else:
                raise TypeError(f"{type(self).__name__}: the attention function was called without `{name}`")
        if not self.softmax_quantizer.is_enabled:
            return fn(self, *args, **kwargs)
        names = (*_QKV, "attention_mask")
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}: unexpected positional arguments to the attention function")
        kwargs.update(zip(names, args))
        kwargs.setdefault("attention_mask", None)
        return softmax_quantized_attention(self, **kwargs)


register_container(QuantAttention)  # the tracer must see q/k/v projections inside attention


# --------------------------------------------------------------------------- eager math with a softmax quantizer


def _implementation(module: nn.Module) -> str:
    return str(getattr(getattr(module, "config", None), "_attn_implementation", None) or "eager")


def _additive_mask(module, mask, query, key, is_causal, sliding_window) -> torch.Tensor:
    """The mask as an additive float tensor broadcastable to [batch, heads, q_len, kv_len]."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    neg = torch.finfo(query.dtype).min
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        mask = mask[..., :kv_len]
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, neg)
        return mask.to(query.dtype)
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        raise ValueError(
            f"softmax quantization computes attention in eager math and cannot use a {type(mask).__name__} mask "
            f"(attn_implementation {_implementation(module)!r}); load the model with attn_implementation='eager' "
            "or 'sdpa'")
    # No mask (sdpa lets the kernel apply causality) or a 2-D padding mask (flash attention).
    flash_style = mask is not None or "flash" in _implementation(module)
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    qpos = torch.arange(q_len, device=query.device)[:, None]
    kpos = torch.arange(kv_len, device=query.device)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device)
    if flash_style:
        qpos = qpos + (kv_len - q_len)  # causal alignment at the bottom right, as flash kernels do
        if is_causal:
            allowed &= kpos <= qpos
        if sliding_window is not None:
            allowed &= (qpos - kpos) < sliding_window
    elif is_causal and q_len > 1:  # sdpa's rule: top-left alignment, none for a single query
        allowed &= kpos <= qpos
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, -kv_len:].bool()
    return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, neg)


def softmax_quantized_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    softcap: Optional[float] = None,
    sliding_window: Optional[int] = None,
    is_causal: Optional[bool] = None,
    position_bias: Optional[torch.Tensor] = None,
    s_aux: Optional[torch.Tensor] = None,
    **kwargs,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with ``module.softmax_quantizer`` applied to the probabilities.

    query ``[b, heads, q, d]``, key/value ``[b, kv_heads, kv, d]`` (grouped
    query attention repeats each kv head); masks in eager (additive float),
    sdpa (boolean, or None with the module's causality) or flash (2-D
    padding) form. ``s_aux`` are attention sinks (one logit per head that
    takes probability mass but has no value). Returns (output
    ``[b, q, heads, d_v]``, probabilities ``[b, heads, q, kv]``).
    """
    for name in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if kwargs.get(name) is not None:
            raise ValueError(f"softmax quantization cannot run packed (varlen) sequences ({name} given); "
                             "pass padded batches instead")
    heads, kv_heads = query.shape[1], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"query has {heads} heads, not a multiple of the {kv_heads} key/value heads")
    if heads != kv_heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        scores = scores + position_bias
    scores = scores + _additive_mask(module, attention_mask, query, key, is_causal, sliding_window)
    if s_aux is not None:
        sinks = s_aux.reshape(1, -1, 1, 1).to(scores.dtype).expand(scores.shape[0], -1, scores.shape[2], 1)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.amax(dim=-1, keepdim=True)
        probs = torch.softmax(logits.float(), dim=-1)[..., :-1].to(query.dtype)
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    probs = module.softmax_quantizer(probs)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value.to(probs.dtype)).transpose(1, 2).contiguous()
    return out, probs


# --------------------------------------------------------------------------- finding the classes


def is_hf_attention_class(cls: type) -> bool:
    """True for a module class whose forward looks up its attention function in transformers' interface.

    That is: its forward reads ``ALL_ATTENTION_FUNCTIONS`` (an
    ``AttentionInterface``) and the module that defines the forward also
    defines ``eager_attention_forward``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or issubclass(cls, QuantModule):
        return False
    fn = _forward_function(cls)
    if fn is None or _INTERFACE_NAME not in fn.__code__.co_names:
        return False
    namespace = fn.__globals__
    if not callable(namespace.get(_EAGER_NAME)):
        return False
    interface = namespace.get(_INTERFACE_NAME)
    if isinstance(interface, _InterfaceProxy):
        return True
    try:
        from transformers.utils.generic import GeneralInterface
    except ImportError:
        return False
    return isinstance(interface, GeneralInterface)


_scanned: Dict[str, int] = {}


def _is_modeling_module(name: str) -> bool:
    tail = name.rsplit(".", 1)[-1]
    return tail.startswith("modeling_") and (name.startswith("transformers.") or name.startswith("transformers_modules."))


def register_hf_attention_classes() -> List[type]:
    """Register `QuantAttention` for the attention classes of every loaded transformers modeling file.

    Only modules already imported are scanned (each once), so it is cheap to
    call before every conversion. Classes registered by hand are left as
    they are. Returns the classes newly registered.
    """
    added: List[type] = []
    for name, mod in list(sys.modules.items()):
        if mod is None or not _is_modeling_module(name) or _scanned.get(name) == id(mod):
            continue
        _scanned[name] = id(mod)
        for obj in list(vars(mod).values()):
            if isinstance(obj, type) and obj.__module__ == name and obj not in QUANT_MODULES \
                    and is_hf_attention_class(obj):
                register_quant_module(obj, QuantAttention)
                added.append(obj)
    return added
