"""The registry of graph transforms: ``@register_transform("key")`` on a `Transform` subclass.

A transform has a pydantic ``Config`` (a `TransformConfig` subclass: ``enabled`` plus its own
options) and ``apply(gm, ctx) -> int`` that rewrites the GraphModule in place and returns how
many matches it rewrote. ``applicable(gm, ctx)`` may return a reason string to skip it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Type

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "TRANSFORMS",
    "Transform",
    "TransformConfig",
    "TransformConfigError",
    "TransformContext",
    "build_transform",
    "get_transform",
    "known_transforms",
    "register_transform",
    "unregister_transform",
]


class TransformConfigError(ValueError):
    """A transform key or option in a pipeline config is wrong."""


class TransformConfig(BaseModel):
    """Options shared by every transform; subclasses add their own fields."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True


@dataclass
class TransformContext:
    """What a transform may read besides the graph.

    ``example_inputs``: the positional inputs of the graph (or None); ``kwargs``: its keyword inputs;
    ``model``: the module the graph was made from (None when a GraphModule was given);
    ``capture``: ``"fx"``, ``"export"`` or ``"given"``; ``extra``: free room for transforms.
    """

    example_inputs: Optional[Tuple[Any, ...]] = None
    kwargs: Dict[str, Any] = field(default_factory=dict)
    model: Optional[torch.nn.Module] = None
    capture: str = "given"
    extra: Dict[str, Any] = field(default_factory=dict)


class Transform(abc.ABC):
    """Base class of graph transforms. Subclasses set ``Config`` and implement `apply`."""

    key: ClassVar[str] = ""
    Config: ClassVar[Type[TransformConfig]] = TransformConfig

    def __init__(self, config: Optional[TransformConfig] = None):
        self.config = config if config is not None else self.Config()

    def applicable(self, gm: torch.fx.GraphModule, ctx: TransformContext) -> Optional[str]:
        """None when the transform can run on `gm`, else the reason it is skipped."""
        return None

    @abc.abstractmethod
    def apply(self, gm: torch.fx.GraphModule, ctx: TransformContext) -> int:
        """Rewrite `gm` in place; return the number of matches rewritten."""


TRANSFORMS: Dict[str, Type[Transform]] = {}


def known_transforms() -> List[str]:
    return sorted(TRANSFORMS)


def register_transform(key: str) -> Callable[[Type[Transform]], Type[Transform]]:
    """Class decorator that registers a `Transform` subclass under `key`."""
    if not isinstance(key, str) or not key.strip():
        raise TransformConfigError(f"a transform key must be a non-empty string, got {key!r}")

    def deco(cls: Type[Transform]) -> Type[Transform]:
        if not (isinstance(cls, type) and issubclass(cls, Transform)):
            raise TypeError(f"@register_transform({key!r}) needs a subclass of Transform, got {cls!r}")
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, TransformConfig)):
            raise TypeError(f"{cls.__name__}.Config must subclass TransformConfig")
        if key in TRANSFORMS:
            old = TRANSFORMS[key]
            raise TransformConfigError(
                f"transform key {key!r} is already registered by {old.__module__}.{old.__qualname__}; "
                f"choose another key (or unregister_transform({key!r}) first)"
            )
        cls.key = key
        TRANSFORMS[key] = cls
        return cls

    return deco


def unregister_transform(key: str) -> None:
    TRANSFORMS.pop(key, None)


def get_transform(key: str) -> Type[Transform]:
    try:
        return TRANSFORMS[key]
    except KeyError:
        raise TransformConfigError(
            f"unknown transform {key!r}; known transforms: {', '.join(known_transforms()) or '(none)'}"
        ) from None


def build_transform(key: str, options: Optional[Mapping[str, Any]] = None) -> Transform:
    """An instance of the transform `key`, its config validated from `options` (without ``key``)."""
    cls = get_transform(key)
    try:
        config = cls.Config(**dict(options or {}))
    except ValidationError as e:
        raise TransformConfigError(f"bad options for transform {key!r}: {e}") from e
    return cls(config)
