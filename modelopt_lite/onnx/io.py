"""Loading, checking, running and writing ONNX models for post-training quantization.

Calibration and evaluation data is a sequence of batches, each a dict from
a model input name to a numpy array. An ``.npz`` file (or a dict of
arrays) holds one array per model input, named like the input, with the
samples along the first axis; it is cut into batches of `batch_size`
samples along that axis.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Union

import numpy as np
import onnx
from onnx import helper

from ..utils.fs import atomic_file

__all__ = ["load_model", "model_inputs", "load_batches", "make_session", "save_model", "set_opset"]

PathLike = Union[str, os.PathLike]
_PROTO_LIMIT = 2**31 - 2**20
_ORT_MAX_IR = 13
"""The highest IR version onnxruntime 1.31 loads."""


def load_model(model: Union[PathLike, onnx.ModelProto]) -> onnx.ModelProto:
    """A ModelProto from a path (with its external data) or a ModelProto (copied)."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {str(path)!r} does not exist")
    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf raises DecodeError, onnx raises others
        raise ValueError(f"{str(path)!r} is not a readable ONNX model ({type(e).__name__}: {e})") from None


def model_inputs(model: onnx.ModelProto) -> Dict[str, onnx.ValueInfoProto]:
    """The graph inputs that are fed (not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    return {i.name: i for i in model.graph.input if i.name not in inits}


def _describe(vi: onnx.ValueInfoProto) -> str:
    t = vi.type.tensor_type
    dims = [d.dim_param or (str(d.dim_value) if d.HasField("dim_value") else "?") for d in t.shape.dim]
    return f"{vi.name}: {helper.tensor_dtype_to_np_dtype(t.elem_type)} [{', '.join(dims)}]"


def _check_batch(batch: Mapping[str, np.ndarray], inputs: Dict[str, onnx.ValueInfoProto], where: str) -> None:
    names = set(batch)
    missing, extra = sorted(set(inputs) - names), sorted(names - set(inputs))
    if missing or extra:
        raise ValueError(
            f"{where}: the arrays do not match the model inputs"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; not model inputs: {', '.join(extra)}" if extra else "")
            + f". The model takes {'; '.join(_describe(v) for v in inputs.values())}")
    for name, vi in inputs.items():
        arr = batch[name]
        t = vi.type.tensor_type
        want = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if arr.dtype != want:
            raise ValueError(f"{where}: array {name!r} has dtype {arr.dtype}, the model input needs {want} "
                             f"(convert it with .astype(np.{want}))")
        if t.HasField("shape"):
            dims = t.shape.dim
            if arr.ndim != len(dims):
                raise ValueError(f"{where}: array {name!r} has rank {arr.ndim} (shape {list(arr.shape)}), "
                                 f"the model input has rank {len(dims)} ({_describe(vi)})")
            for axis, (n, d) in enumerate(zip(arr.shape, dims)):
                if d.HasField("dim_value") and d.dim_value != n:
                    raise ValueError(f"{where}: array {name!r} has size {n} on axis {axis}, the model input "
                                     f"needs {d.dim_value} ({_describe(vi)})")


def _split(arrays: Mapping[str, np.ndarray], batch_size: int, where: str) -> List[Dict[str, np.ndarray]]:
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sizes = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if any(s is None for s in sizes.values()):
        raise ValueError(f"{where}: every array needs a first axis of samples; got shapes "
                         f"{ {k: list(v.shape) for k, v in arrays.items()} }")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"{where}: the arrays must hold the same number of samples (first axis); got {sizes}")
    n = next(iter(sizes.values()), 0)
    if n == 0:
        raise ValueError(f"{where}: the arrays hold no sample")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [{k: v[s:s + batch_size] for k, v in arrays.items()} for s in range(0, n, batch_size)]


def load_batches(data, model: onnx.ModelProto, batch_size: int = 8, where: str = "calibration data"
                 ) -> List[Dict[str, np.ndarray]]:
    """Batches checked against the model's inputs (names, dtypes, ranks, fixed sizes).

    `data`: a path to an ``.npz`` file or a dict of arrays (samples on the
    first axis, cut into batches of `batch_size`), or an iterable of
    batches (dicts of arrays, used as they are).
    """
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: file {str(path)!r} does not exist")
        where = f"{where} {str(path)!r}"
        try:
            with np.load(path, allow_pickle=False) as npz:
                data = {k: npz[k] for k in npz.files}
        except (ValueError, OSError) as e:
            raise ValueError(f"{where} is not a readable .npz file ({e}); write it with "
                             "np.savez(path, input_name=array, ...)") from None
    if isinstance(data, Mapping):
        batches = _split(data, batch_size, where)
    elif isinstance(data, Iterable):
        batches = []
        for b in data:
            if not isinstance(b, Mapping):
                raise ValueError(f"{where}: each batch must be a dict from input name to array, got {type(b).__name__}")
            batches.append({k: np.asarray(v) for k, v in b.items()})
    else:
        raise ValueError(f"{where}: expected an .npz path, a dict of arrays or an iterable of batches, "
                         f"got {type(data).__name__}")
    if not batches:
        raise ValueError(f"{where} holds no batch")
    inputs = model_inputs(model)
    for n, b in enumerate(batches):
        _check_batch(b, inputs, where if len(batches) == 1 else f"{where}, batch {n}")
    return batches


def make_session(model: Union[onnx.ModelProto, PathLike], optimize: bool = True, options: Optional[Dict] = None):
    """A CPU ONNX Runtime session; all graph optimizations off unless `optimize` (then ORT's default level)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in (options or {}).items():
        so.add_session_config_entry(key, value)
    so.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        original = model.ir_version  # onnx writes IR versions newer than onnxruntime reads
        model.ir_version = min(original, _ORT_MAX_IR)
        try:
            return _proto_session(ort, model, so)
        finally:
            model.ir_version = original
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])


def _proto_session(ort, model: onnx.ModelProto, so):
    if model.ByteSize() < _PROTO_LIMIT:
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    tmp = Path(tempfile.mkdtemp(prefix="modelopt_lite_onnx_"))
    try:
        path = tmp / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_COMPATIBLE = {"QuantizeLinear", "DequantizeLinear", "Cast", "CastLike", "Constant", "ConstantOfShape", "Equal",
               "Identity", "Pad", "Reshape", "Shape", "Size", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
               "ReduceMax", "ReduceMin", "Resize", "If", "Loop", "Scan"}
"""Operators whose versions 14..21 only add types or optional inputs: a model keeps its meaning under a newer opset."""


def set_opset(model: onnx.ModelProto, needed: int) -> int:
    """Raise the default-domain opset to at least `needed`; refuses when an operator's definition changed."""
    entry = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    current = entry.version if entry is not None else 1
    if current >= needed:
        return current
    changed = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type in _COMPATIBLE:
            continue
        try:
            old = onnx.defs.get_schema(node.op_type, current).since_version
            new = onnx.defs.get_schema(node.op_type, needed).since_version
        except onnx.defs.SchemaError:
            continue
        if old != new:
            changed.add(node.op_type)
    if changed:
        raise ValueError(f"the model uses opset {current}, this mode needs {needed}, and the definition of "
                         f"{', '.join(sorted(changed))} changed in between: re-export the model with opset {needed}")
    if entry is None:
        model.opset_import.append(helper.make_opsetid("", needed))
    else:
        entry.version = needed
    return needed


def finish_model(model: onnx.ModelProto) -> None:
    """IR version for the opsets (capped at what onnxruntime loads), then onnx.checker."""
    ir = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = min(max(ir, min(model.ir_version, _ORT_MAX_IR)), _ORT_MAX_IR)
    if model.ByteSize() < _PROTO_LIMIT:
        onnx.checker.check_model(model)


def save_model(model: onnx.ModelProto, path: PathLike, use_external_data: bool = False,
               overwrite: bool = True) -> Path:
    """Write `model` atomically; weights go to ``<name>.data`` beside it with `use_external_data`.

    A model over 2 GB cannot be a single protobuf file: it needs `use_external_data`.
    """
    path = Path(path)
    too_big = model.ByteSize() >= _PROTO_LIMIT
    if too_big and not use_external_data:
        raise ValueError(f"the quantized model is {model.ByteSize() / 2**30:.2f} GiB, over the 2 GiB protobuf "
                         "limit: pass use_external_data=True (--external-data) to store the weights beside it")
    if not use_external_data:
        with atomic_file(path, overwrite=overwrite) as tmp:
            tmp.write_bytes(model.SerializeToString())
        return path
    data_name = path.name + ".data"
    data_path = path.with_name(data_name)
    if not overwrite and (path.exists() or data_path.exists()):
        raise FileExistsError(f"{path} or {data_path} already exists; pass overwrite=True to replace them")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)  # saving with external data empties the tensors of the proto it is given
        onnx.save_model(copy, str(tmpdir / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        if (tmpdir / data_name).exists():
            os.replace(tmpdir / data_name, data_path)
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    if too_big:
        onnx.checker.check_model(str(path))
    return path
