"""Example plugin package: importing it registers its plugins (``TritonLookUp``)."""

from .lookup import TritonLookUp, lookup_torch, lookup_triton

__all__ = ["TritonLookUp", "lookup_torch", "lookup_triton"]
