"""Shared fixtures: tiny Hugging Face models saved as local directories (with the demo model's tokenizer)."""

import os
import shutil
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run in Triton's CPU interpreter (the tests call them directly);
    # it must be chosen before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]


def _save_tiny(model, path: Path) -> Path:
    model.save_pretrained(path)
    from modelopt_lite.models import default_model_dir

    src = default_model_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, path / name)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("tiny_models")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128))
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=64, max_position_embeddings=128))
    return {"bert": _save_tiny(bert, root / "bert"), "llama": _save_tiny(llama, root / "llama")}
