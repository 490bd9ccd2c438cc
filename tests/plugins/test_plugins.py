"""Plugins: registry, attributes, shape/dtype inference, numerics, tracing, compile, ONNX, save/load."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import torch
import torch.nn.functional as F

from modelopt_lite.plugins import PluginBase, PluginError, SymTensor, get_plugin, plugin, plugin_op, register_plugin
from modelopt_lite.plugins import onnx as plugin_onnx
from modelopt_lite.plugins.examples import TritonLookUp, lookup_torch, lookup_triton

ROOT = Path(__file__).resolve().parents[2]


@plugin("CatScale")
class CatScale(PluginBase):
    """Two outputs: cat([x, y]) * scale along dim 0 (size x0 + y0) and, per mode, the row sums or maxima."""

    num_outputs = 2
    domain = "test.plugins"

    def __init__(self, scale: float = 1.0, mode: str = "sum", offset: int = 0):
        super().__init__()
        self.scale, self.mode, self.offset = scale, mode, offset

    def shape_dtype_inference(self, inputs):
        x, y = inputs
        rows = x.shape[0] + y.shape[0]
        return [SymTensor(x.dtype, [rows] + x.shape[1:]), SymTensor(torch.float32, [rows])]

    def forward(self, inputs, outputs):
        cat = torch.cat(list(inputs)) * self.scale
        outputs[0].copy_(cat)
        red = cat.float().sum(-1) if self.mode == "sum" else cat.float().amax(-1)
        outputs[1].copy_(red + self.offset)


def _lookup_ref(ids, table, fp32=False):
    out = F.embedding(ids.long(), table)
    return out.float() if fp32 else out


# ---------------------------------------------------------------- registry
def _make(name_attr="A", n_out=1):
    cls = type(name_attr, (PluginBase,), {
        "num_outputs": n_out,
        "__init__": lambda self, k: PluginBase.__init__(self),
        "shape_dtype_inference": lambda self, inputs: [SymTensor(inputs[0].dtype, inputs[0].shape)] * n_out,
        "forward": lambda self, inputs, outputs: [o.copy_(inputs[0] + 1) for o in outputs],
    })
    cls.__module__ = "tests.plugins.fake_module"
    return cls


def test_register_same_class_again_is_a_noop_and_other_class_needs_overwrite():
    a = register_plugin(_make("A"), "RegTest")
    assert register_plugin(a, "RegTest") is a and get_plugin("RegTest") is a
    a2 = register_plugin(_make("A"), "RegTest")  # same module and qualified name: a reload of the same class
    assert get_plugin("RegTest") is a2
    with pytest.raises(PluginError, match="already registered.*overwrite=True"):
        register_plugin(_make("B"), "RegTest")
    b = register_plugin(_make("B"), "RegTest", overwrite=True)
    assert get_plugin("RegTest") is b
    x = torch.arange(4.0)
    assert torch.equal(b(k=3)(x), x + 1)
    with pytest.raises(PluginError, match="not registered"):
        a2(k=1)(x)  # replaced: its instances no longer name an op
    with pytest.raises(PluginError, match="1 output"):
        register_plugin(_make("C", n_out=2), "RegTest", overwrite=True)


def test_registration_errors():
    with pytest.raises(PluginError, match="PluginBase subclasses"):
        register_plugin(int, "Nope")
    with pytest.raises(PluginError, match="identifier"):
        register_plugin(_make("D"), "bad name")
    no_forward = type("NoFwd", (PluginBase,), {"shape_dtype_inference": lambda self, i: i[0]})
    with pytest.raises(PluginError, match="must define forward"):
        register_plugin(no_forward, "NoFwd")
    star = type("Star", (PluginBase,), {"__init__": lambda self, *a: None, "forward": lambda s, i, o: None,
                                         "shape_dtype_inference": lambda self, i: i[0]})
    with pytest.raises(PluginError, match=r"\*args/\*\*kwargs"):
        register_plugin(star, "Star")
    with pytest.raises(PluginError, match="no plugin named 'Missing'"):
        get_plugin("Missing")
    assert plugin_op("TritonLookUp") is torch.ops.modelopt_lite_plugins.TritonLookUp.default


# ---------------------------------------------------------------- attributes
def test_attributes_are_typed_and_validated():
    p = CatScale(2, mode="max")
    assert p.plugin_attributes == {"scale": 2.0, "mode": "max", "offset": 0}
    assert type(p.plugin_attributes["scale"]) is float
    assert p.attributes_json == '{"mode": "max", "offset": 0, "scale": 2.0}'
    with pytest.raises(PluginError, match="'scale' is a list.*bool, int, float or str"):
        CatScale([1.0])
    with pytest.raises(PluginError, match="'offset' is annotated int but got float"):
        CatScale(offset=1.5)
    with pytest.raises(PluginError, match="'fp32_output' is annotated bool but got int"):
        TritonLookUp(1)
    with pytest.raises(PluginError, match="unexpected keyword"):
        TritonLookUp(fp32=True)
    with pytest.raises(PluginError, match="'k' is a Tensor"):
        _make("E")(torch.ones(1))


# ---------------------------------------------------------------- shape / dtype inference
def test_shape_dtype_inference_concrete_and_errors():
    ids, table = SymTensor(torch.int32, [4, 5]), SymTensor(torch.bfloat16, [100, 7])
    out = TritonLookUp().shape_dtype_inference([ids, table])
    assert out.dtype == torch.bfloat16 and out.shape == [4, 5, 7]
    assert TritonLookUp(True).shape_dtype_inference([ids, table]).dtype == torch.float32
    with pytest.raises(PluginError, match="int32 or int64"):
        TritonLookUp().shape_dtype_inference([SymTensor(torch.float32, [4]), table])
    with pytest.raises(PluginError, match="2-D"):
        TritonLookUp()(torch.zeros(3, dtype=torch.int64), torch.zeros(4, 5, 6))


def test_symbolic_shapes_under_export():
    class M(torch.nn.Module):
        def forward(self, x, y, ids, table):
            a, b = CatScale(0.5)(x, y)
            return a, b, TritonLookUp()(ids, table)

    batch, other = torch.export.Dim("batch", max=512), torch.export.Dim("other", max=512)
    args = (torch.randn(3, 4), torch.randn(5, 4), torch.randint(0, 9, (3, 2)), torch.randn(9, 6))
    ep = torch.export.export(M(), args, dynamic_shapes=({0: batch}, {0: other}, {0: batch}, None))
    def expr(d):
        return d.node.expr if isinstance(d, torch.SymInt) else d

    place = [n.meta["val"] for n in ep.graph.nodes if n.op == "placeholder"]
    outs = [n.meta["val"] for n in next(n for n in ep.graph.nodes if n.op == "output").args[0]]
    sx, sy = expr(place[0].shape[0]), expr(place[1].shape[0])
    assert isinstance(place[0].shape[0], torch.SymInt) and sx != sy
    assert [expr(d) for d in outs[0].shape] == [sx + sy, 4] and [expr(d) for d in outs[1].shape] == [sx + sy]
    assert outs[0].dtype == torch.float32 and outs[1].dtype == torch.float32
    assert [expr(d) for d in outs[2].shape] == [sx, 2, 6]
    new = (torch.randn(7, 4), torch.randn(2, 4), torch.randint(0, 9, (7, 2)), torch.randn(9, 6))
    a, b, c = ep.module()(*new)
    cat = torch.cat(new[:2]) * 0.5
    assert torch.equal(a, cat) and torch.equal(b, cat.sum(-1)) and torch.equal(c, F.embedding(new[2], new[3]))


# ---------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_lookup_matches_embedding(dtype, id_dtype):
    g = torch.Generator().manual_seed(hash((str(dtype), str(id_dtype))) % 1000)
    for shape, v, d, fp32 in [((7,), 13, 19, False), ((3, 5), 101, 130, True), ((2, 1, 3), 5, 1, False)]:
        ids = torch.randint(0, v, shape, generator=g).to(id_dtype)
        table = torch.randn(v, d, generator=g).to(dtype)
        want = _lookup_ref(ids, table, fp32)
        out_dtype = torch.float32 if fp32 else dtype
        got = TritonLookUp(fp32)(ids, table)
        assert got.dtype == out_dtype and torch.equal(got, want)
        for block in (0, 64):  # one column tile, and several with a ragged last one
            out = torch.full(want.shape, float("nan"), dtype=out_dtype)
            assert torch.equal(lookup_triton(ids, table, out, block_d=block), want)


def test_lookup_out_of_range_and_empty():
    table = torch.randn(6, 3)
    with pytest.raises(IndexError, match="id 6 is out of range for a table of 6 rows"):
        TritonLookUp()(torch.tensor([0, 6]), table)
    with pytest.raises(IndexError, match="id -1 is out of range"):
        lookup_torch(torch.tensor([-1, 2]), table, torch.empty(2, 3))
    out = lookup_triton(torch.tensor([1, 6, -2, 5]), table, torch.full((4, 3), 7.0))
    assert torch.equal(out[0], table[1]) and torch.equal(out[3], table[5])
    assert torch.equal(out[1:3], torch.zeros(2, 3))  # masked in the kernel
    assert TritonLookUp()(torch.zeros(0, 2, dtype=torch.int64), table).shape == (0, 2, 3)
    assert lookup_triton(torch.zeros(0, dtype=torch.int32), table, torch.empty(0, 3)).shape == (0, 3)


def test_catscale_forward():
    x, y = torch.randn(2, 3), torch.randn(4, 3)
    a, b = CatScale(2.0, "max", 1)(x, y)
    cat = torch.cat([x, y]) * 2.0
    assert torch.equal(a, cat) and torch.equal(b, cat.amax(-1) + 1)


# ---------------------------------------------------------------- fx / compile
class _Model(torch.nn.Module):
    def __init__(self, fp32=True):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(37, 11, dtype=torch.bfloat16), requires_grad=False)
        self.lookup = TritonLookUp(fp32)

    def forward(self, ids):
        return self.lookup(ids, self.table) * 2


def test_fx_trace():
    gm = torch.fx.symbolic_trace(_Model())
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == plugin_op("TritonLookUp")]
    assert len(calls) == 1 and calls[0].args[1] == '{"fp32_output": true}'
    ids = torch.randint(0, 37, (4, 3))
    assert torch.equal(gm(ids), _lookup_ref(ids, gm.table, True) * 2)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    table = torch.randn(37, 11)

    def f(ids, scale):
        a, b = CatScale(3.0)(table[:2], table[2:5] * scale)
        return TritonLookUp(True)(ids, table) + 1, a, b

    compiled = torch.compile(f, fullgraph=True, backend=backend, dynamic=True)
    for n in (5, 9):
        ids = torch.randint(0, 37, (n, 2))
        got, want = compiled(ids, 2.0), f(ids, 2.0)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert torch.equal(got[0], F.embedding(ids, table) + 1)


# ---------------------------------------------------------------- ONNX
def _attr(node, name):
    a = next(a for a in node.attribute if a.name == name)
    return a.type, onnx.helper.get_attribute_value(a)


def _value_type(model, name):
    for v in list(model.graph.value_info) + list(model.graph.output):
        if v.name == name:
            t = v.type.tensor_type
            return t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim]
    raise AssertionError(f"no type for {name}")


class _Two(torch.nn.Module):
    def forward(self, ids, table, x, y):
        a, b = CatScale(1.5, "max", 2)(x, y)
        return TritonLookUp()(ids, table) * 2, a + 1, b


def test_onnx_export_nodes_attributes_and_types(tmp_path):
    args = (torch.randint(0, 9, (3, 2), dtype=torch.int32), torch.randn(9, 6, dtype=torch.float16),
            torch.randn(3, 4), torch.randn(5, 4))
    batch = torch.export.Dim("batch", max=512)
    shapes = ({0: batch}, None, {0: batch}, None)
    path = tmp_path / "m.onnx"
    plugin_onnx.export_onnx(_Two().eval(), args, path, dynamic_shapes=shapes)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    domains = {o.domain: o.version for o in model.opset_import}
    assert domains["modelopt_lite.plugins"] == 1 and domains["test.plugins"] == 1
    look = next(n for n in model.graph.node if n.op_type == "TritonLookUp")
    assert look.domain == "modelopt_lite.plugins" and len(look.input) == 2
    assert _attr(look, "fp32_output") == (onnx.AttributeProto.INT, 0)
    assert _value_type(model, look.output[0]) == (onnx.TensorProto.FLOAT16, ["batch", 2, 6])
    cat = next(n for n in model.graph.node if n.op_type == "CatScale")
    assert cat.domain == "test.plugins" and len(cat.output) == 2
    assert _attr(cat, "scale") == (onnx.AttributeProto.FLOAT, 1.5)
    assert _attr(cat, "mode") == (onnx.AttributeProto.STRING, b"max")
    assert _attr(cat, "offset") == (onnx.AttributeProto.INT, 2)
    assert sorted(a.name for a in cat.attribute) == ["mode", "offset", "scale"]
    assert _value_type(model, cat.output[1]) == (onnx.TensorProto.FLOAT, ["batch + 5"])
    # the schema's inference runs shape_dtype_inference on symbols: plain torch.onnx.export keeps the types
    plain = torch.onnx.export(_Two().eval(), args, dynamo=True, dynamic_shapes=shapes, verbose=False,
                              custom_translation_table=plugin_onnx.translation_table()).model_proto
    onnx.checker.check_model(plain, full_check=True)
    look = next(n for n in plain.graph.node if n.op_type == "TritonLookUp")
    assert _value_type(plain, look.output[0]) == (onnx.TensorProto.FLOAT16, ["batch", 2, 6])


# ---------------------------------------------------------------- save / load across processes
def _run(code):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=120)


def test_export_save_load_in_another_process(tmp_path):
    model = _Model(fp32=False)
    ids = torch.randint(0, 37, (4, 3))
    ep = torch.export.export(model, (ids,), dynamic_shapes=({0: torch.export.Dim("batch", max=512)},))
    path = tmp_path / "lookup.pt2"
    torch.export.save(ep, path)
    torch.save({"ids": torch.randint(0, 37, (6, 3)), "table": model.table.detach()}, tmp_path / "in.pt")
    ok = _run(f"""
        import torch, torch.nn.functional as F
        import modelopt_lite.plugins.examples  # registers TritonLookUp
        ep = torch.export.load({str(path)!r})
        d = torch.load({str(tmp_path / 'in.pt')!r})
        out = ep.module()(d["ids"])
        assert torch.equal(out, F.embedding(d["ids"], d["table"]) * 2), "mismatch"
        print("OK", tuple(out.shape))
    """)
    assert ok.returncode == 0 and "OK (6, 3, 11)" in ok.stdout, ok.stderr[-2000:]
    bad = _run(f"import torch; torch.export.load({str(path)!r})")
    assert bad.returncode != 0
    assert "modelopt_lite_plugins.TritonLookUp" in bad.stderr and "not registered" in bad.stderr


def test_reimporting_the_package_is_safe():
    ok = _run("""
        import importlib
        import modelopt_lite.plugins.examples.lookup as lk
        import modelopt_lite.plugins.examples
        importlib.reload(lk)  # runs @plugin("TritonLookUp") again with a re-created class
        import torch
        from modelopt_lite.plugins import get_plugin
        assert get_plugin("TritonLookUp") is lk.TritonLookUp
        print("OK", lk.TritonLookUp()(torch.tensor([1]), torch.eye(3)).tolist())
    """)
    assert ok.returncode == 0 and "OK [[0.0, 1.0, 0.0]]" in ok.stdout, ok.stderr[-2000:]


# ---------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lookup_cuda(dtype):
    g = torch.Generator(device="cuda").manual_seed(3)
    for n, v, d in [(1, 7, 3), (1000, 50257, 769), (4097, 128, 4096)]:
        ids = torch.randint(0, v, (n,), device="cuda", generator=g)
        table = torch.randn(v, d, device="cuda", generator=g).to(dtype)
        for fp32 in (False, True):
            assert torch.equal(TritonLookUp(fp32)(ids, table), _lookup_ref(ids, table, fp32))
    ids = torch.tensor([0, 7, -1], device="cuda")
    out = TritonLookUp()(ids, torch.ones(7, 5, device="cuda", dtype=dtype))
    assert out[0].eq(1).all() and out[1:].eq(0).all()
