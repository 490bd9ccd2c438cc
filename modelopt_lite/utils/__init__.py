"""Small shared helpers."""

from .registry import Registry

__all__ = ["Registry"]
