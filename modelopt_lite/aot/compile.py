"""Triton AoT compilation with checked, corrected launchers (see the package docstring)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

from ..utils.fs import atomic_directory

__all__ = ["AotVariant", "AotResult", "compile_aot", "shared_memory_limit", "fix_kernel_source",
           "fix_dispatcher_source"]

# Largest dynamic shared memory one block may opt in to, by compute capability (bytes).
_SMEM_LIMITS = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448, 100: 232448,
                120: 101376}


@dataclass(frozen=True)
class AotVariant:
    """One specialisation: Triton's signature string (types with optional `:16` hints, constexpr values),
    the launch grid as C expressions of the arguments, warps and pipeline stages."""

    signature: str
    grid: str
    num_warps: int = 4
    num_stages: int = 2


@dataclass
class AotResult:
    out_dir: Path
    name: str
    sources: List[Path]
    headers: List[Path]
    shared_bytes: Dict[str, int] = field(default_factory=dict)
    """Dynamic shared memory per generated kernel function."""

    @property
    def dispatcher_source(self) -> Path:
        return self.out_dir / f"{self.name}.c"

    @property
    def dispatcher_header(self) -> Path:
        return self.out_dir / f"{self.name}.h"


def shared_memory_limit(target: str) -> int:
    """The opt-in dynamic shared memory limit of a `cuda:<arch>:<warp size>` target."""
    parts = target.split(":")
    if len(parts) != 3 or parts[0] != "cuda" or not parts[1].isdigit():
        raise ValueError(f"target {target!r}: expected 'cuda:<compute capability>:32', e.g. 'cuda:90:32'")
    arch = int(parts[1])
    known = [a for a in _SMEM_LIMITS if a <= arch]
    if not known:
        raise ValueError(f"target {target!r}: compute capability {arch} is older than any supported ({min(_SMEM_LIMITS)})")
    return _SMEM_LIMITS[max(known)]


class _TargetOnlyDriver:
    """Enough of a Triton driver to compile for a named target on a machine without a GPU."""

    def __init__(self, target):
        self._target = target

    def get_current_target(self):
        return self._target

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import ty_to_cpp

        return ty_to_cpp(ty)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def _driver_for(target: str) -> Iterator[None]:
    """Use the real driver when one is active, else a target-only stand-in, for the duration."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    try:
        driver.active.get_current_target()
        yield
        return
    except RuntimeError:  # no GPU driver on this machine
        pass
    backend, arch, warp = target.split(":")
    previous = getattr(driver, "_active", None)
    driver.set_active(_TargetOnlyDriver(GPUTarget(backend, int(arch), int(warp))))
    try:
        yield
    finally:
        driver.set_active(previous)  # None again: the next use looks for a real driver


_LAUNCH = re.compile(r"cuLaunchKernel\(\s*(\w+)_func,[^;]*?,\s*(\d+)\s*,\s*stream\s*,")


def fix_kernel_source(text: str) -> str:
    """Make a generated kernel source's unload idempotent and its launcher return on an empty grid."""
    unload = re.compile(r"CUDA_CHECK\(cuModuleUnload\((\w+)_mod\)\);")
    text, n = unload.subn(lambda m: (f"if ({m.group(1)}_mod != NULL) {{ CUDA_CHECK(cuModuleUnload({m.group(1)}_mod)); "
                                      f"{m.group(1)}_mod = NULL; {m.group(1)}_func = NULL; }}"), text)
    if n != 1:
        raise RuntimeError("unexpected Triton AoT output: no single cuModuleUnload call to guard")
    launch = re.compile(r"(if\s*\(gX \* gY \* gZ > 0\)\s*\n\s*return cuLaunchKernel\([^;]*\);)")
    text, n = launch.subn(lambda m: m.group(1) + "\n    return CUDA_SUCCESS;", text)
    if n != 1:
        raise RuntimeError("unexpected Triton AoT output: no single guarded cuLaunchKernel call")
    return text


_RESULT_FN = re.compile(r"\n(TT_ResultTy (\w+)\([^)]*\)\s*\{)(.*?)\n\}", re.S)


def _falls_through(body: str) -> bool:
    """True when a function body can reach its end without returning (its last statement is not an
    unconditional return)."""
    lines = [ln.strip() for ln in body.strip().splitlines() if ln.strip()]
    if not lines or not lines[-1].startswith("return"):
        return True
    return len(lines) > 1 and lines[-2].startswith("if") and not lines[-2].endswith(";")


def fix_dispatcher_source(text: str) -> str:
    """Make every dispatcher return CUDA_ERROR_INVALID_VALUE when no specialisation matches."""
    out, pos = [], 0
    for m in _RESULT_FN.finditer(text):
        if _falls_through(m.group(3)):
            out.append(text[pos:m.end(3)] + "\n  return TT_ERROR_INVALID_VALUE;")
            pos = m.end(3)
    out.append(text[pos:])
    return "".join(out)


def _check_dispatchers(text: str) -> None:
    for m in _RESULT_FN.finditer(text):
        if _falls_through(m.group(3)):
            raise RuntimeError(f"dispatcher {m.group(2)} can fall through without an error")


def _compile_variant(kernel_file: Path, kernel_name: str, v: AotVariant, target: str, out_path: Path, name: str,
                     index: int):
    """Run Triton's compiler for one variant in a fresh interpreter (Triton's interpreter mode off, and a
    target-only driver when there is no GPU); returns (function name, files written)."""
    request = {"path": str(kernel_file), "kernel_name": kernel_name, "signature": v.signature, "grid": v.grid,
               "target": target, "num_warps": v.num_warps, "num_stages": v.num_stages, "out_name": name,
               "out_path": str(out_path)}
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-m", "modelopt_lite.aot.compile", json.dumps(request)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
        raise ValueError(f"variant {index} ({v.signature!r}, grid {v.grid!r}): Triton could not compile "
                         f"{kernel_name}: {last[0]}")
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    return answer["func_name"], [Path(f) for f in answer["files"]]


def _worker(request_json: str) -> None:
    import triton.tools.compile as tc

    req = json.loads(request_json)
    args = tc.CompileArgs(path=req["path"], kernel_name=req["kernel_name"], signature=req["signature"],
                          grid=req["grid"], target=req["target"], num_warps=req["num_warps"],
                          num_stages=req["num_stages"], out_name=req["out_name"], out_path=Path(req["out_path"]))
    with _driver_for(req["target"]):
        func_name, files = tc.compile_kernel(args)
    print(json.dumps({"func_name": func_name, "files": [str(f) for f in files]}))


def _dispatch_key(v: AotVariant):
    """What the linked dispatcher can tell variants apart by: the C argument list (pointers are untyped
    CUdeviceptr), the divisibility hints, the constexpr values, warps and stages."""
    parts = []
    for item in (x.strip() for x in v.signature.split(",")):
        ty, _, hint = item.partition(":")
        parts.append(("ptr" if ty.startswith("*") else ty, hint))
    return tuple(parts), v.num_warps, v.num_stages


def _check_distinguishable(variants: Sequence[AotVariant]) -> None:
    seen = {}
    for i, v in enumerate(variants):
        key = _dispatch_key(v)
        if key in seen:
            raise ValueError(f"variants {seen[key]} and {i} differ only in pointer element types "
                             f"({variants[seen[key]].signature!r} vs {v.signature!r}), which a launcher cannot tell "
                             "apart at run time: compile them under different names (one dispatcher per dtype)")
        seen[key] = i


def compile_aot(kernel_file: Union[str, Path], kernel_name: str, variants: Sequence[AotVariant],
                out_dir: Union[str, Path], name: str, target: str = "cuda:90:32",
                smem_limit: Optional[int] = None, overwrite: bool = False) -> AotResult:
    """Compile `kernel_name` from `kernel_file` for every variant; write sources, headers and a manifest.

    The output directory appears only when everything succeeded (an existing non-empty one needs
    `overwrite=True`).
    """
    kernel_file = Path(kernel_file).resolve()
    if not kernel_file.is_file():
        raise FileNotFoundError(f"kernel file {str(kernel_file)!r} does not exist")
    if not variants:
        raise ValueError("give at least one AotVariant (signature, grid, warps, stages)")
    if not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise ValueError(f"name {name!r} must be a C identifier")
    limit = shared_memory_limit(target) if smem_limit is None else int(smem_limit)
    _check_distinguishable(variants)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        shared: Dict[str, int] = {}
        sources, headers = [], []
        for i, v in enumerate(variants):
            func_name, files = _compile_variant(kernel_file, kernel_name, v, target, tmp / f"{name}_v{i}", name, i)
            for f in files:
                if f.suffix == ".c":
                    text = f.read_text()
                    m = _LAUNCH.search(text)
                    need = int(m.group(2)) if m else 0
                    if need > limit:
                        raise ValueError(
                            f"variant {i} ({v.signature!r}, {v.num_warps} warps, {v.num_stages} stages) needs "
                            f"{need} bytes of dynamic shared memory; {target} allows {limit}: use fewer stages "
                            "or smaller blocks")
                    shared[func_name] = need
                    f.write_text(fix_kernel_source(text))
                    sources.append(f.name)
                else:
                    headers.append(f.name)
        link = subprocess.run([sys.executable, "-m", "triton.tools.link", *[str(tmp / h) for h in headers],
                               "-o", str(tmp / name)], capture_output=True, text=True)
        if link.returncode != 0:
            raise RuntimeError(f"triton.tools.link failed: {link.stderr.strip()[-2000:]}")
        disp = tmp / f"{name}.c"
        fixed = fix_dispatcher_source(disp.read_text())
        _check_dispatchers(fixed)
        disp.write_text(fixed)
        manifest = {"kernel": kernel_name, "source": kernel_file.name, "target": target, "smem_limit": limit,
                    "variants": [asdict(v) for v in variants], "shared_bytes": shared}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return AotResult(out_dir, name, [out_dir / s for s in sources] + [out_dir / f"{name}.c"],
                     [out_dir / h for h in headers] + [out_dir / f"{name}.h"], shared)


if __name__ == "__main__":
    _worker(sys.argv[1])
