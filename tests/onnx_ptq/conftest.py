"""Float ONNX models for the PTQ tests: a tiny BERT (dynamo exporter) and a small CNN (TorchScript exporter)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

SEQ = 16


class BertLastHidden(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class SmallCNN(nn.Module):
    """Conv + BatchNorm + Relu, a residual block, pooling and a Linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.conv2(y))
        return self.head(torch.flatten(self.pool(x), 1))


def export_bert(path: Path) -> Path:
    from modelopt_lite.models.tiny import build_tiny_model

    model = BertLastHidden(build_tiny_model("bert")).eval()
    ids = torch.randint(0, 128, (2, SEQ))
    mask = torch.ones(2, SEQ, dtype=torch.long)
    dims = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, mask), str(path), dynamo=True, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], verbose=False,
                          dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    return path


def export_cnn(path: Path) -> Path:
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for bn in (model.stem[1], model.bn1):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def bert_data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 128, (n, SEQ)).astype(np.int64)
    mask = np.ones((n, SEQ), np.int64)
    mask[n // 2:, SEQ - 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def cnn_data(n: int, seed: int):
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(scope="session")
def bert_onnx(tmp_path_factory) -> Path:
    return export_bert(tmp_path_factory.mktemp("bert") / "bert.onnx")


@pytest.fixture(scope="session")
def cnn_onnx(tmp_path_factory) -> Path:
    return export_cnn(tmp_path_factory.mktemp("cnn") / "cnn.onnx")
