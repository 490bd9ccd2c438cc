"""Reductions for the granularities: per tensor, per channel (axis) and blocks.

Blocks along any axes are handled by padding each blocked dimension with
zeros to a multiple of its block size and splitting it into
(n_blocks, block) so every block is reduced over its own dimensions.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def normalize_axes(axis, ndim: int) -> Tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis {a} is out of range for a {ndim}-d tensor")
        out.append(a % ndim)
    return tuple(sorted(set(out)))


def channel_amax(x: torch.Tensor, axis) -> torch.Tensor:
    """Abs-max over every dimension except `axis` (kept with size 1 elsewhere)."""
    if axis is None:
        return x.abs().amax().float()
    keep = normalize_axes(axis, x.dim())
    reduce = tuple(d for d in range(x.dim()) if d not in keep)
    if not reduce:
        return x.abs().float()
    return x.abs().amax(dim=reduce, keepdim=True).float()


class Blocking:
    """Splits a tensor of a fixed shape into blocks given `{axis: size}`.

    A size of None means the whole dimension (one block, as per-token
    quantization uses).
    """

    def __init__(self, shape: Sequence[int], block_sizes: Mapping[int, Optional[int]]):
        self.shape = tuple(shape)
        ndim = len(self.shape)
        sizes = {}
        for axis, size in block_sizes.items():
            (a,) = normalize_axes(axis, ndim)
            size = self.shape[a] if size is None else int(size)
            if size <= 0:
                raise ValueError(f"block size along axis {axis} must be positive, got {size}")
            sizes[a] = size
        self.sizes = sizes
        self.padded = tuple(
            -(-n // sizes[d]) * sizes[d] if d in sizes else n for d, n in enumerate(self.shape)
        )
        blocked, inner, outer_shape = [], [], []
        for d, n in enumerate(self.padded):
            if d in sizes:
                blocked += [n // sizes[d], sizes[d]]
                inner.append(len(blocked) - 1)
                outer_shape.append(n // sizes[d])
            else:
                blocked.append(n)
                outer_shape.append(n)
        self.blocked_shape = tuple(blocked)
        self.inner_dims = tuple(inner)
        self.scale_shape = tuple(outer_shape)  # one entry per block

    @property
    def needs_pad(self) -> bool:
        return self.padded != self.shape

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.shape:
            raise ValueError(f"tensor of shape {tuple(x.shape)} does not match blocking for {self.shape}")
        if self.needs_pad:
            pad = []
            for d in reversed(range(len(self.shape))):
                pad += [0, self.padded[d] - self.shape[d]]
            x = F.pad(x, pad)
        return x.reshape(self.blocked_shape)

    def from_blocks(self, xb: torch.Tensor) -> torch.Tensor:
        x = xb.reshape(self.padded)
        if self.needs_pad:
            x = x[tuple(slice(0, n) for n in self.shape)]
        return x

    def block_amax(self, xb: torch.Tensor) -> torch.Tensor:
        """Per-block abs-max in the compact `scale_shape` (one value per block)."""
        return xb.abs().amax(dim=self.inner_dims).float()

    def expand(self, per_block: torch.Tensor) -> torch.Tensor:
        """A compact per-block tensor viewed so it broadcasts against blocks."""
        return _unsqueeze_at(per_block.reshape(self.scale_shape), self.inner_dims)


def _unsqueeze_at(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    for d in sorted(dims):
        t = t.unsqueeze(d)
    return t
