"""The GEMM registry: which kernel multiplies a compressed weight by an activation.

A kernel is registered for a (weight storage, activation format) pair with
the compute capability it needs, an availability check (Triton importable,
the right device) and a shape check. `select_gemm` returns the first
registered kernel, by priority, that accepts the call; when none does, the
dequantize-then-matmul fallback, which is always correct, is used.

Weight storage kinds: ``fp8`` (E4M3 codes with per-tensor or per-channel
scales), ``nvfp4`` and ``int4`` (two codes per byte with block scales), and
``codes`` (one code per element, any format). Activation formats:
``none`` (the activation as given), ``fp8_tensor`` (E4M3, one static scale),
``fp8_token`` (E4M3, one scale per token, dynamic) and ``fake`` (any other
format: the activation is fake-quantized first, then multiplied in its own
dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import device_capability, kernels_enabled, triton_available

__all__ = ["GemmKernel", "GemmCall", "register_gemm", "select_gemm", "registered_gemms", "FALLBACK",
           "WEIGHT_KINDS", "ACTIVATION_KINDS"]

WEIGHT_KINDS = ("fp8", "nvfp4", "int4", "codes")
ACTIVATION_KINDS = ("none", "fp8_tensor", "fp8_token", "fake")


@dataclass(frozen=True)
class GemmCall:
    """What a kernel is asked to do: storage and activation kinds, device, sizes and dtype."""

    weight: str
    activation: str
    device: torch.device
    n: int
    k: int
    dtype: torch.dtype


@dataclass(frozen=True)
class GemmKernel:
    """One way to compute ``y = x @ W^T`` for a compressed weight.

    `run(module, x)` gets the compressed module (its storage and quantizers)
    and the activation after `pre_quant_scale`; kernels whose activation kind
    is ``fake`` or ``none`` receive the activation already fake-quantized.
    """

    name: str
    weights: Tuple[str, ...]
    activations: Tuple[str, ...]
    run: Callable
    min_capability: Tuple[int, int] = (0, 0)
    needs_cuda: bool = True
    needs_triton: bool = True
    supports: Optional[Callable[[GemmCall], bool]] = None
    priority: int = 0
    description: str = ""
    quantizes_activation: bool = False
    """True when the kernel quantizes the raw activation itself (fused), so the caller must not."""
    extra: Dict[str, object] = field(default_factory=dict)

    def accepts(self, call: GemmCall) -> bool:
        if call.weight not in self.weights or call.activation not in self.activations:
            return False
        if self.needs_cuda and call.device.type != "cuda":
            return False
        if self.needs_triton and not (kernels_enabled() and triton_available()):
            return False
        if self.needs_cuda and device_capability(call.device) < self.min_capability:
            return False
        return self.supports is None or bool(self.supports(call))


_REGISTRY: List[GemmKernel] = []


def register_gemm(kernel: GemmKernel, *, overwrite: bool = False) -> GemmKernel:
    """Add a kernel; a name already registered is refused unless `overwrite`."""
    for w in kernel.weights:
        if w not in WEIGHT_KINDS:
            raise ValueError(f"kernel {kernel.name!r}: unknown weight storage {w!r}; use one of {WEIGHT_KINDS}")
    for a in kernel.activations:
        if a not in ACTIVATION_KINDS:
            raise ValueError(f"kernel {kernel.name!r}: unknown activation kind {a!r}; use one of {ACTIVATION_KINDS}")
    existing = [k for k in _REGISTRY if k.name == kernel.name]
    if existing and not overwrite:
        raise ValueError(f"a GEMM kernel named {kernel.name!r} is already registered (pass overwrite=True to replace it)")
    for k in existing:
        _REGISTRY.remove(k)
    _REGISTRY.append(kernel)
    _REGISTRY.sort(key=lambda k: -k.priority)
    return kernel


def registered_gemms() -> List[GemmKernel]:
    """The registered kernels in the order they are tried (the fallback is not listed)."""
    return list(_REGISTRY)


def _dequant_matmul(module, x: torch.Tensor) -> torch.Tensor:
    w = module.dequantized_weight(x.dtype)
    return torch.nn.functional.linear(x, w, module.bias.to(x.dtype) if module.bias is not None else None)


FALLBACK = GemmKernel(
    name="dequant_matmul", weights=WEIGHT_KINDS, activations=("none", "fake"), run=_dequant_matmul,
    needs_cuda=False, needs_triton=False, priority=-1000,
    description="dequantize the weight exactly, then F.linear (any device, any format)",
)


def select_gemm(call: GemmCall) -> GemmKernel:
    """The kernel for `call`: the first registered one that accepts it, else the fallback.

    Any quantized activation can be fake-quantized first, so when no kernel takes its format
    directly (say FP8 activations with a 4-bit weight) the kernels for ``fake`` are tried next.
    """
    for kernel in _REGISTRY:
        if kernel.accepts(call):
            return kernel
    if call.activation not in ("none", "fake"):
        return select_gemm(replace(call, activation="fake"))
    return FALLBACK
