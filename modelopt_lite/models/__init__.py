"""Loading local Hugging Face models (no hub access)."""

from .hf import CausalLMLogits, LoadedModel, default_model_dir, load_hf_model

__all__ = ["CausalLMLogits", "LoadedModel", "default_model_dir", "load_hf_model"]
