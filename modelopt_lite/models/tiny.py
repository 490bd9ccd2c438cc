"""Small randomly initialised Hugging Face models built from configs (no download), for tests and demos."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

__all__ = ["TINY_MODELS", "build_tiny_model"]

_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**_DECODER))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(**_DECODER))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**_DECODER))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def _bert():
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=128, max_position_embeddings=64))


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=128))


TINY_MODELS: Dict[str, Callable[[], nn.Module]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "gpt2": _gpt2,
    "bert": _bert,
    "t5-encoder": _t5_encoder,
}


def build_tiny_model(name: str, seed: int = 0) -> nn.Module:
    """A 2-layer, 64-wide model of the family `name` (see TINY_MODELS), in eval mode."""
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; choose from {', '.join(TINY_MODELS)}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ImportError("tiny models need the hf extra: pip install 'modelopt_lite[hf]'") from None
    torch.manual_seed(seed)
    return TINY_MODELS[name]().eval()
