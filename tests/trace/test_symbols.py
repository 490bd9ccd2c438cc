"""analyze_symbols on small models with exact expected groups and states."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelopt_lite.trace import CLType, SymInfo, Symbol, SymMap, analyze_symbols, recursive_trace


class ResConcatCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.conv4 = nn.Conv2d(16, 8, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.conv5 = nn.Conv2d(16, 32, 1)
        self.grouped = nn.Conv2d(32, 32, 1, groups=4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        x = F.relu(x + y)  # residual: conv1 and conv2 outputs must match
        z = torch.cat([self.conv3(x), self.conv4(x)], dim=1)
        z = self.conv5(self.dw(z))
        z = self.grouped(z)
        return self.fc(self.pool(z).flatten(1))


def _states(sm):
    return {name: s.state for name, s in sm.named_symbols()}


def test_cnn_residual_and_concat():
    model = ResConcatCNN()
    sm = analyze_symbols(model)
    st = _states(sm)
    # The residual links conv1 and conv2 outputs, both batch norms and every reader of x.
    assert set(sm.dependents("conv1.out_channels")) == {
        "bn1.num_features", "conv2.in_channels", "conv2.out_channels", "bn2.num_features",
        "conv3.in_channels", "conv4.in_channels"}
    assert st["conv1.out_channels"] == "searchable"
    assert st["conv2.out_channels"] == "dynamic" and sm.symbol("conv2.out_channels").parent.name == "conv1.out_channels"
    # The concat: dw and conv5 inputs are the sum conv3 + conv4, and change when either part does.
    assert st["conv3.out_channels"] == "searchable" and st["conv4.out_channels"] == "searchable"
    assert set(sm.dependents("conv3.out_channels")) == {"dw.channels", "conv5.in_channels"}
    assert set(sm.dependents("conv4.out_channels")) == {"dw.channels", "conv5.in_channels"}
    assert st["dw.channels"] == "dynamic" and st["conv5.in_channels"] == "dynamic"
    # A grouped convolution (not depthwise) keeps its channels, and so fixes conv5's output.
    assert st["grouped.in_channels"] == "constant" and st["grouped.out_channels"] == "constant"
    assert st["conv5.out_channels"] == "constant"
    # Model input and output are boundaries.
    assert st["conv1.in_channels"] == "constant" and sm.symbol("conv1.in_channels").reason == "model input"
    assert st["fc.out_features"] == "constant" and sm.symbol("fc.out_features").reason == "model output"
    assert st["fc.in_features"] == "constant"  # reads the grouped conv's fixed output
    assert sm.symbol("conv1.out_channels").cl_type is CLType.OUTGOING
    assert sm.symbol("conv1.in_channels").cl_type is CLType.INCOMING


def test_cnn_without_grouped_conv_frees_the_pooled_linear():
    model = ResConcatCNN()
    model.grouped = nn.Identity()
    sm = analyze_symbols(model)
    assert sm.symbol("conv5.out_channels").is_searchable
    assert sm.dependents("conv5.out_channels") == ["fc.in_features"]  # flatten of a 1x1 map


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 16), nn.GELU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


def test_mlp():
    sm = analyze_symbols(MLP())
    st = _states(sm)
    assert st == {
        "net.depth": "constant",
        "net.0.in_features": "constant",
        "net.0.out_features": "searchable",
        "net.3.in_features": "dynamic",
        "net.3.out_features": "searchable",
        "net.5.in_features": "dynamic",
        "net.5.out_features": "constant",
    }
    assert sm.dependents("net.0.out_features") == ["net.3.in_features"]
    assert sm.dependents("net.3.out_features") == ["net.5.in_features"]


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + F.relu(self.fc(x))


def test_sequential_depth_of_residual_blocks():
    model = nn.Sequential(nn.Linear(8, 32), Block(), Block(), Block())
    sm = analyze_symbols(model)
    depth = sm.symbol("depth")
    assert depth.is_searchable and depth.size == 4 and depth.min_size == 1
    assert set(sm.dependents("0.out_features")) == {"1.fc.in_features", "1.fc.out_features", "2.fc.in_features",
                                                    "2.fc.out_features", "3.fc.in_features", "3.fc.out_features"}


class GQAAttention(nn.Module):
    def __init__(self, d=32, heads=4, kv_heads=2):
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = heads, kv_heads, d // heads
        self.q_proj = nn.Linear(d, heads * self.head_dim)
        self.k_proj = nn.Linear(d, kv_heads * self.head_dim)
        self.v_proj = nn.Linear(d, kv_heads * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, d)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.embed = nn.Embedding(100, d)
        self.norm1 = nn.RMSNorm(d)
        self.attn = GQAAttention(d)
        self.norm2 = nn.RMSNorm(d)
        self.gate = nn.Linear(d, hidden, bias=False)
        self.up = nn.Linear(d, hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.head = nn.Linear(d, 100)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.attn(self.norm1(h))
        x = self.norm2(h)
        h = h + self.down(F.silu(self.gate(x)) * self.up(x))
        return self.head(h)


@pytest.mark.parametrize("with_inputs", [False, True], ids=["no-inputs", "example-inputs"])
def test_transformer_block_with_gqa(with_inputs):
    model = TransformerBlock()
    kwargs = {"example_inputs": (torch.randint(0, 100, (2, 5)),)} if with_inputs else {}
    sm = analyze_symbols(model, **kwargs)
    st = _states(sm)
    # Residual stream: embedding width, both norms, every reader and writer of h.
    assert st["embed.embedding_dim"] == "searchable"
    assert set(sm.dependents("embed.embedding_dim")) == {
        "norm1.num_features", "attn.q_proj.in_features", "attn.k_proj.in_features", "attn.v_proj.in_features",
        "attn.o_proj.out_features", "norm2.num_features", "gate.in_features", "up.in_features",
        "down.out_features", "head.in_features"}
    # SwiGLU: gate and up outputs are multiplied, so they move together with down's input.
    assert set(sm.dependents("gate.out_features")) == {"up.out_features", "down.in_features"}
    # Heads: q, k, v projections, o_proj's input, and heads / kv heads (whole GQA groups) together.
    heads = set(sm.dependents("attn.num_heads")) | {"attn.num_heads"}
    assert heads == {"attn.q_proj.out_features", "attn.num_heads", "attn.num_kv_heads", "attn.k_proj.out_features",
                     "attn.v_proj.out_features", "attn.o_proj.in_features"}
    assert st["attn.num_heads"] in ("searchable", "dynamic")
    assert all(st[n] != "constant" for n in heads)
    assert st["head.out_features"] == "constant" and st["embed.num_embeddings"] == "constant"


def test_failed_module_is_a_boundary():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.b = Branchy()
            self.c = nn.Linear(16, 16)
            self.d = nn.Linear(16, 4)

        def forward(self, x):
            return self.d(self.c(self.b(self.a(x))))

    sm = analyze_symbols(Net())
    st = _states(sm)
    assert st["a.out_features"] == "constant" and "could not be traced" in sm.symbol("a.out_features").reason
    assert st["c.in_features"] == "constant"
    assert st["c.out_features"] == "searchable" and sm.dependents("c.out_features") == ["d.in_features"]
    assert st["b.fc.in_features"] == "constant" and st["b.fc.out_features"] == "constant"


def test_user_registered_symbols():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n
            self.w = nn.Parameter(torch.ones(n))

        def forward(self, x):
            return x * self.w

    @SymMap.register(Scale)
    def _scale_rule(m):
        return SymInfo(is_shape_preserving=True, features=Symbol(m.n, cl_type=CLType.INCOMING, elastic_dims=(-1,)))

    model = nn.Sequential(nn.Linear(4, 8), Scale(8), nn.Linear(8, 2))
    graphs = recursive_trace(model)
    assert [n.target for n in graphs[model].nodes if n.op == "call_module"] == ["0", "1", "2"]  # a leaf now
    sm = analyze_symbols(model, graphs=graphs)
    assert sm.dependents("0.out_features") == ["1.features", "2.in_features"]
    assert sm.symbol("0.out_features").is_searchable
    # Without the rule, the raw parameter multiply fixes the width.
    from modelopt_lite.trace import symbols as symbols_mod
    from modelopt_lite.trace import unregister_leaf

    symbols_mod._BY_TYPE.unregister(Scale)
    unregister_leaf(Scale)
    sm = analyze_symbols(model)
    assert sm.symbol("0.out_features").is_constant


def test_symbol_states():
    s = Symbol(8, is_searchable=True, cl_type=CLType.OUTGOING, elastic_dims=(-1,))
    assert s.is_searchable and s.state == "searchable" and s.is_cross_layer and s.is_outgoing
    t = Symbol(8, cl_type=CLType.INCOMING)
    assert t.is_free and t.state == "free"
    t.link_to(s)
    assert t.is_dynamic and t.parent is s
    s.disable("fixed")
    assert s.is_constant and s.reason == "fixed" and not s.is_searchable
    with pytest.raises(ValueError):
        s.link_to(s)
