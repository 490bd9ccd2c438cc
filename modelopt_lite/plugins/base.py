"""Plugins: a class with a shape/dtype rule and a compute routine, seen by torch as one custom op.

    @plugin("MyOp")
    class MyOp(PluginBase):
        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def shape_dtype_inference(self, inputs):
            return SymTensor(inputs[0].dtype, inputs[0].shape)

        def forward(self, inputs, outputs):
            torch.mul(inputs[0], self.scale, out=outputs[0])

    y = MyOp(2.0)(x)   # calls torch.ops.modelopt_lite_plugins.MyOp

Registration defines the op ``modelopt_lite_plugins::<Name>(Tensor[] inputs, str attrs) -> Tensor``
(``-> (Tensor, ...)`` for ``num_outputs > 1``). ``attrs`` is the plugin's ``__init__`` arguments as a JSON
object with sorted keys; the op rebuilds the plugin from it (cached), so an exported or saved graph carries
everything the plugin needs. The fake implementation runs ``shape_dtype_inference`` on the fake inputs
(whose sizes are SymInts under dynamic shapes) and returns empty tensors of those shapes and dtypes.
"""

from __future__ import annotations

import functools
import inspect
import json
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Type, Union, Tuple

import torch

__all__ = ["PluginBase", "SymTensor", "PluginError", "plugin", "register_plugin", "registered_plugins",
           "get_plugin", "plugin_op", "NAMESPACE", "DEFAULT_DOMAIN"]

NAMESPACE = "modelopt_lite_plugins"
DEFAULT_DOMAIN = "modelopt_lite.plugins"
_ATTR_TYPES = (bool, int, float, str)


class PluginError(ValueError):
    """A plugin definition, registration or attribute that cannot be used."""


@dataclass
class SymTensor:
    """A tensor's dtype and shape; sizes are ints or SymInts (which support arithmetic) while tracing."""

    dtype: torch.dtype
    shape: List[Any]
    device: Optional[torch.device] = None

    def __post_init__(self):
        if not isinstance(self.dtype, torch.dtype):
            raise PluginError(f"SymTensor dtype must be a torch.dtype, got {self.dtype!r}")
        self.shape = list(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @classmethod
    def of(cls, t: torch.Tensor) -> "SymTensor":
        return cls(t.dtype, list(t.shape), t.device)


class PluginBase:
    """Base class of plugins; see the module docstring.

    Class attributes: ``num_outputs`` (default 1) and ``domain`` (the ONNX domain of the exported node,
    default ``modelopt_lite.plugins``). The instance attribute ``plugin_attributes`` holds the bound
    ``__init__`` arguments (bool/int/float/str), which are the op's attributes.
    """

    num_outputs: int = 1
    domain: str = DEFAULT_DOMAIN
    plugin_name: Optional[str] = None  # set by registration
    aot_kernel: Optional[Tuple[str, str]] = None
    """(file relative to the package root's parent, kernel name): the Triton kernel `modelopt-lite aot
    --plugin NAME` compiles. The file must import only triton (Triton's AoT tool loads it standalone)."""
    aot_variants: Dict[str, Tuple[Tuple, ...]] = {}
    """Default specialisations for `aot`, grouped into one dispatcher each (e.g. by dtype):
    {suffix: ((signature, grid, num_warps, num_stages), ...)}."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj._attrs_json = _attributes_json(cls, *args, **kwargs)
        return obj

    @property
    def plugin_attributes(self) -> Dict[str, Any]:
        """The bound ``__init__`` arguments (fixed at construction)."""
        return json.loads(self._attrs_json)

    def __init__(self, *args, **kwargs):
        # Subclasses call super().__init__() with no arguments; the attributes were bound in __new__.
        super().__init__()

    def shape_dtype_inference(self, inputs: Sequence[SymTensor]) -> Union[SymTensor, Sequence[SymTensor]]:
        raise PluginError(f"{type(self).__name__} must define shape_dtype_inference(self, inputs)")

    def forward(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor]) -> None:
        raise PluginError(f"{type(self).__name__} must define forward(self, inputs, outputs)")

    @property
    def attributes_json(self) -> str:
        """The op's ``attrs`` argument: the ``__init__`` arguments as JSON with sorted keys."""
        return self._attrs_json

    def __call__(self, *inputs: torch.Tensor):
        """Runs the op on the tensors (a tensor, or a tuple of ``num_outputs`` tensors)."""
        return plugin_op(_registered_name(type(self)))(list(inputs), self._attrs_json)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.plugin_attributes.items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------- attributes
def _init_params(cls) -> List[inspect.Parameter]:
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    bad = [p.name for p in params if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if bad:
        raise PluginError(f"{cls.__name__}.__init__ takes *args/**kwargs ({bad}); plugin attributes must be "
                          f"named parameters")
    return params


def _annotation_type(p: inspect.Parameter):
    ann = p.annotation
    if isinstance(ann, str):  # postponed annotations
        ann = {"bool": bool, "int": int, "float": float, "str": str}.get(ann, ann)
    return ann if ann in _ATTR_TYPES else None


def _check_value(cls, name: str, value, want):
    if type(value) not in _ATTR_TYPES:
        raise PluginError(f"{cls.__name__} attribute {name!r} is a {type(value).__name__}; plugin attributes must "
                          f"be bool, int, float or str (pass a plain Python value)")
    if want is None or type(value) is want:
        return value
    if want is float and type(value) is int:
        return float(value)
    raise PluginError(f"{cls.__name__} attribute {name!r} is annotated {want.__name__} but got "
                      f"{type(value).__name__} {value!r}")


def _bind_attributes(cls, args, kwargs) -> Dict[str, Any]:
    params = _init_params(cls)
    sig = inspect.Signature(params)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise PluginError(f"{cls.__name__}{sig}: {e}") from None
    bound.apply_defaults()
    types = {p.name: _annotation_type(p) for p in params}
    return {k: _check_value(cls, k, v, types[k]) for k, v in bound.arguments.items()}


@torch.compiler.assume_constant_result
def _attributes_json(cls, *args, **kwargs) -> str:
    # Evaluated eagerly when a compiled function constructs a plugin: binding and JSON do not trace.
    return json.dumps(_bind_attributes(cls, args, kwargs), sort_keys=True)


def attribute_types(cls) -> Dict[str, Optional[type]]:
    """Each ``__init__`` parameter's type: its annotation, else its default's type, else None (taken per value)."""
    out = {}
    for p in _init_params(cls):
        t = _annotation_type(p)
        if t is None and p.default is not inspect.Parameter.empty and type(p.default) in _ATTR_TYPES:
            t = type(p.default)
        out[p.name] = t
    return out


# ---------------------------------------------------------------- registry
_LOCK = threading.RLock()
_REGISTRY: Dict[str, Type[PluginBase]] = {}
_DEFINED: Dict[str, int] = {}  # op name -> number of outputs in its schema
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def _same_class(a, b) -> bool:
    return a is b or (a.__module__ == b.__module__ and a.__qualname__ == b.__qualname__)


def _registered_name(cls) -> str:
    name = cls.__dict__.get("plugin_name")
    if name is None or not _same_class(_REGISTRY.get(name, object), cls):
        raise PluginError(f"{cls.__name__} is not registered; decorate it with @plugin(\"Name\") or call "
                          f"register_plugin({cls.__name__}, \"Name\")")
    return name


def register_plugin(cls: Type[PluginBase], name: str, overwrite: bool = False) -> Type[PluginBase]:
    """Register ``cls`` as the op ``modelopt_lite_plugins::<name>`` (see the module docstring).

    Registering the same class again (also a re-created class of the same module and qualified name, as
    after a module reload) replaces the entry silently; another class under a taken name needs ``overwrite=True``.
    """
    if not (isinstance(cls, type) and issubclass(cls, PluginBase)):
        raise PluginError(f"only PluginBase subclasses can be registered, got {cls!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise PluginError(f"plugin name must be a Python identifier (it becomes an op name), got {name!r}")
    for meth in ("shape_dtype_inference", "forward"):
        if getattr(cls, meth) is getattr(PluginBase, meth):
            raise PluginError(f"{cls.__name__} must define {meth}")
    n_out = cls.num_outputs
    if type(n_out) is not int or n_out < 1:
        raise PluginError(f"{cls.__name__}.num_outputs must be an int >= 1, got {n_out!r}")
    if not isinstance(cls.domain, str) or not cls.domain:
        raise PluginError(f"{cls.__name__}.domain must be a non-empty string, got {cls.domain!r}")
    attribute_types(cls)  # refuses *args / **kwargs now rather than at first use
    with _LOCK:
        old = _REGISTRY.get(name)
        if old is not None and not _same_class(old, cls) and not overwrite:
            raise PluginError(f"plugin {name!r} is already registered by {old.__module__}.{old.__qualname__}; "
                              f"choose another name or pass overwrite=True")
        if name in _DEFINED and _DEFINED[name] != n_out:
            raise PluginError(f"plugin {name!r} was defined with {_DEFINED[name]} output(s); a registered op's "
                              f"schema cannot change, so {cls.__name__} (num_outputs={n_out}) needs another name")
        if name not in _DEFINED:
            _define_op(name, n_out)
        _REGISTRY[name] = cls
        cls.plugin_name = name
        _instance.cache_clear()
    return cls


def plugin(name: str, overwrite: bool = False):
    """Class decorator: ``@plugin("Name")`` registers the class (``register_plugin(cls, name, overwrite)``)."""
    def wrap(cls):
        return register_plugin(cls, name, overwrite=overwrite)
    return wrap


def registered_plugins() -> Dict[str, Type[PluginBase]]:
    """A copy of the registry: plugin name -> class."""
    with _LOCK:
        return dict(_REGISTRY)


def get_plugin(name: str) -> Type[PluginBase]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PluginError(f"no plugin named {name!r} is registered (registered: {sorted(_REGISTRY)}); import the "
                          f"package that defines it") from None


def plugin_op(name: str):
    """The OpOverload ``torch.ops.modelopt_lite_plugins.<name>.default``."""
    get_plugin(name)
    return getattr(getattr(torch.ops, NAMESPACE), name).default


@functools.lru_cache(maxsize=256)
def _instance(name: str, attrs: str) -> PluginBase:
    try:
        kwargs = json.loads(attrs) if attrs else {}
    except json.JSONDecodeError as e:
        raise PluginError(f"plugin {name!r}: attrs is not JSON ({e})") from None
    return get_plugin(name)(**kwargs)


# ---------------------------------------------------------------- the op
def _out_specs(p: PluginBase, inputs: Sequence[torch.Tensor]) -> List[SymTensor]:
    specs = p.shape_dtype_inference([SymTensor.of(t) for t in inputs])
    specs = [specs] if isinstance(specs, SymTensor) else list(specs)
    if len(specs) != type(p).num_outputs or not all(isinstance(s, SymTensor) for s in specs):
        raise PluginError(f"{type(p).__name__}.shape_dtype_inference must return {type(p).num_outputs} SymTensor(s) "
                          f"(num_outputs), got {specs!r}")
    return specs


def _allocate(specs: Sequence[SymTensor], inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    default = inputs[0].device if inputs else torch.device("cpu")
    return [torch.empty(s.shape, dtype=s.dtype, device=s.device if s.device is not None else default) for s in specs]


def _result(outs: List[torch.Tensor]):
    return outs[0] if len(outs) == 1 else tuple(outs)


def _define_op(name: str, n_out: int) -> None:
    ret = "Tensor" if n_out == 1 else "(" + ", ".join(["Tensor"] * n_out) + ")"
    _LIB.define(f"{name}(Tensor[] inputs, str attrs) -> {ret}")

    def run(inputs, attrs):
        p = _instance(name, attrs)
        inputs = list(inputs)
        outs = _allocate(_out_specs(p, inputs), inputs)
        p.forward(inputs, outs)
        return _result(outs)

    def fake(inputs, attrs):
        p = _instance(name, attrs)
        return _result(_allocate(_out_specs(p, list(inputs)), list(inputs)))

    _LIB.impl(name, run, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=_LIB)
    _DEFINED[name] = n_out


def parse_attributes(attrs: str) -> Dict[str, Any]:
    """The attribute dict of an op's ``attrs`` argument."""
    return json.loads(attrs) if attrs else {}

