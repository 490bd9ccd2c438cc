"""quantize() gives layers that read the same activation one input amax."""

import pytest
import torch
from torch import nn

import modelopt_lite.quantization as mtq
from modelopt_lite.quantization.api import share_input_amax_by_graph

pytest.importorskip("transformers")

from modelopt_lite.models.tiny import build_tiny_model  # noqa: E402


def _loop(model):
    torch.manual_seed(1)
    for _ in range(2):
        model(input_ids=torch.randint(0, 128, (2, 8)), use_cache=False)


def test_tiny_llama_qkv_and_gate_up_share_amax():
    model = mtq.quantize(build_tiny_model("llama"), "fp8", _loop)
    for layer in model.model.layers:
        a = layer.self_attn
        q, k, v = (a.q_proj.input_quantizer.amax, a.k_proj.input_quantizer.amax, a.v_proj.input_quantizer.amax)
        assert q is not None and torch.equal(q, k) and torch.equal(q, v)
        g, u = layer.mlp.gate_proj.input_quantizer.amax, layer.mlp.up_proj.input_quantizer.amax
        assert torch.equal(g, u)
    assert len(model._modelopt_lite_shared_inputs) == 4
    assert model._modelopt_lite_residual_writers[:2] == ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]


def test_sharing_takes_the_largest_amax():
    model = mtq.quantize(build_tiny_model("llama"), "fp8", _loop)
    a = model.model.layers[0].self_attn
    a.q_proj.input_quantizer.amax = torch.tensor(1.0)
    a.k_proj.input_quantizer.amax = torch.tensor(5.0)
    a.v_proj.input_quantizer.amax = torch.tensor(2.0)
    groups = share_input_amax_by_graph(model)
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"] in groups
    for p in (a.q_proj, a.k_proj, a.v_proj):
        assert p.input_quantizer.amax.item() == 5.0


class Fanout(nn.Module):
    """Two layers read x; a third reads x * 2 (a different activation)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x * 2)


def test_fanout_on_plain_module_and_opt_out():
    data = [torch.randn(8, 4) for _ in range(2)]

    def loop(m):
        for d in data:
            m(d)

    model = mtq.quantize(Fanout(), "int8", loop)
    amax = lambda n: getattr(model, n).input_quantizer.amax.item()  # noqa: E731
    assert model._modelopt_lite_shared_inputs == [["a", "b"]]
    assert amax("a") == amax("b")
    assert amax("c") == pytest.approx(2 * amax("a"))
    off = mtq.quantize(Fanout(), "int8", loop, share_input_amax=False)
    assert not hasattr(off, "_modelopt_lite_shared_inputs")
