"""Loading local Hugging Face models (no hub access)."""

from .hf import LoadedModel, default_model_dir, load_hf_model

__all__ = ["LoadedModel", "default_model_dir", "load_hf_model"]
