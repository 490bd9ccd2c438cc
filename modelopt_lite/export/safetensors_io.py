"""Streaming safetensors writer: tensors go to disk as they are produced.

Each tensor's bytes are appended to a raw data file as soon as it is added,
so memory holds one tensor at a time. When a shard reaches the size limit it
is finished by writing the header and copying the data behind it in chunks.
Above one shard, files are named ``<prefix>-0000K-of-0000N.safetensors`` and
an index (``weight_map``) is written, as transformers does.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch

__all__ = ["ShardedSafetensorsWriter", "parse_size", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_CHUNK = 64 << 20


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?I?B?)\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot read the size {size!r}; use bytes or e.g. '5GB', '500MB'")
    unit = m.group(2).rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    return int(float(m.group(1)) * base**power)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


class _Shard:
    def __init__(self, raw_path: Path):
        self.raw_path = raw_path
        self.raw = open(raw_path, "wb")
        self.header: Dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
        data = _tensor_bytes(t)
        self.header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.size, self.size + len(data)]}
        self.raw.write(data)
        self.size += len(data)

    def finish(self, path: Path, metadata: Dict[str, str]) -> None:
        self.raw.close()
        header = {"__metadata__": metadata, **self.header}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(path, "wb") as out, open(self.raw_path, "rb") as raw:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            while True:
                chunk = raw.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
        os.remove(self.raw_path)


class ShardedSafetensorsWriter:
    """Write tensors into `directory` as one or more safetensors files.

    ``add(name, tensor)`` streams the tensor to disk; ``close()`` names the
    shards and writes the index when there is more than one. Nothing is
    atomic here: write into a temporary directory (see utils.fs).
    """

    def __init__(self, directory: Union[str, Path], max_shard_size: Union[int, str] = "5GB",
                 prefix: str = "model", metadata: Optional[Dict[str, str]] = None):
        self.directory = Path(directory)
        self.limit = parse_size(max_shard_size)
        if self.limit <= 0:
            raise ValueError("max_shard_size must be positive")
        self.prefix = prefix
        self.metadata = {"format": "pt", **(metadata or {})}
        self._done: List[_Shard] = []
        self._current: Optional[_Shard] = None
        self._names: set = set()
        self.total_size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._current is not None and self._current.size > 0 and self._current.size + nbytes > self.limit:
            self._done.append(self._current)
            self._current = None
        if self._current is None:
            self._current = _Shard(self.directory / f".{self.prefix}-shard{len(self._done)}.raw")
        self._current.add(name, tensor)
        self._names.add(name)
        self.total_size += nbytes

    def close(self) -> List[str]:
        """Finish every shard; returns the file names written."""
        shards = self._done + ([self._current] if self._current is not None else [])
        if not shards:
            shards = [_Shard(self.directory / f".{self.prefix}-shard0.raw")]
        n = len(shards)
        names = [f"{self.prefix}.safetensors"] if n == 1 else [
            f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for shard, fname in zip(shards, names):
            shard.finish(self.directory / fname, self.metadata)
            weight_map.update({k: fname for k in shard.header})
        if n > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        self._done, self._current = [], None
        return names
