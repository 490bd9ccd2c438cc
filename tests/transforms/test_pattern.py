"""FX pattern matching and replacement on symbolic_trace and torch.export graphs."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import modelopt_lite.quantization.ops  # noqa: F401  (registers torch.ops.modelopt_lite)

from modelopt_lite.transforms import (ModuleSlot, Pattern, canonical_target, find_matches, has_dtype, has_rank,
                                      replace_match)


@Pattern
def relu_add(x, y):
    return torch.relu(x + y)


class ThreeReluAdds(nn.Module):
    def forward(self, a, b):
        p = torch.relu(a + b)
        q = F.relu(p + a)
        r = (q + b).relu()
        return r * 2


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)


def _export(model, args):
    return torch.export.export(model, args).module()


def test_canonical_targets():
    names = {canonical_target(t) for t in (torch.relu, F.relu, torch.ops.aten.relu.default, torch.ops.aten.relu)}
    assert names == {"relu"}
    assert canonical_target("relu", "call_method") == "relu"
    assert canonical_target(torch.ops.aten.add.Tensor) == "add"
    assert canonical_target(torch.ops.modelopt_lite.fake_quant.default) == "modelopt_lite::fake_quant"
    assert canonical_target(torch.ops.modelopt_lite.fake_quant) == "modelopt_lite::fake_quant"


def test_matches_function_method_and_functional_forms():
    gm = fx.symbolic_trace(ThreeReluAdds())
    ms = find_matches(gm, relu_add)
    assert [m.anchor.name for m in ms] == ["relu", "relu_1", "relu_2"]
    assert [m.anchor.op for m in ms] == ["call_function", "call_function", "call_method"]
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    assert ms[0]["x"] is placeholders["a"] and ms[0]["y"] is placeholders["b"]
    assert ms[1]["x"] is ms[0].anchor and ms[1]["y"] is placeholders["a"]
    assert ms[0]["add"].name == "add"


def test_matches_aten_graph_and_export_pattern():
    args = _inputs()
    gm = _export(ThreeReluAdds(), args)
    ms = find_matches(gm, relu_add)
    assert len(ms) == 3
    assert all(m.anchor.target is torch.ops.aten.relu.default for m in ms)
    aten_pattern = Pattern(lambda x, y: torch.relu(x + y), example_args=_inputs(1))
    assert {n.target for n in aten_pattern.nodes} == {torch.ops.aten.add.Tensor, torch.ops.aten.relu.default}
    assert [m.anchor for m in find_matches(gm, aten_pattern)] == [m.anchor for m in ms]
    assert len(find_matches(fx.symbolic_trace(ThreeReluAdds()), aten_pattern)) == 3


def test_literal_args_and_repeated_placeholder():
    class M(nn.Module):
        def forward(self, a, b):
            return torch.clamp(a, 0, 6) + torch.clamp(b, 0, 5) + a * a + a * b

    gm = fx.symbolic_trace(M())
    clamp06 = find_matches(gm, lambda x: torch.clamp(x, 0, 6))
    assert len(clamp06) == 1 and clamp06[0]["x"].name == "a"
    any_clamp = find_matches(gm, lambda x, lo, hi: torch.clamp(x, lo, hi))
    assert [(m["lo"], m["hi"]) for m in any_clamp] == [(0, 6), (0, 5)]
    square = find_matches(gm, lambda x: x * x)
    assert len(square) == 1 and square[0]["x"].name == "a"
    assert len(find_matches(gm, lambda x, y: x * y)) == 2
    egm = _export(M(), _inputs())
    assert len(find_matches(egm, lambda x: torch.clamp(x, 0, 6))) == 1
    assert len(find_matches(egm, lambda x: x * x)) == 1


def test_metadata_predicate_fp16_only():
    class M(nn.Module):
        def forward(self, a, b):
            return torch.relu(a.half() + 1).float() + torch.relu(b + 1) + torch.relu(b[0] + 1).sum()

    gm = fx.symbolic_trace(M())
    args = _inputs()
    pat = Pattern(lambda x, c: torch.relu(x + c))
    assert len(find_matches(gm, pat, constraints={"x": has_dtype(torch.float16)})) == 0  # no metadata yet
    ShapeProp(gm).propagate(*args)
    assert len(find_matches(gm, pat)) == 3
    ms = find_matches(gm, pat, constraints={"x": has_dtype(torch.float16)})
    assert len(ms) == 1 and ms[0]["x"].target == "half" and ms[0]["c"] == 1
    assert len(find_matches(gm, pat, constraints={"relu": has_rank(1)})) == 1
    egm = _export(M(), args)  # export graphs carry meta["val"]
    ms = find_matches(egm, pat, constraints={"x": has_dtype(torch.float16)})
    assert len(ms) == 1 and ms[0].anchor.meta["val"].dtype == torch.float16
    with pytest.raises(ValueError, match="not in pattern"):
        find_matches(gm, pat, constraints={"nope": has_rank(1)})


def test_outside_consumer_blocks_match():
    class M(nn.Module):
        def forward(self, a, b):
            s = a + b
            return torch.relu(s), s * 2

    for gm in (fx.symbolic_trace(M()), _export(M(), _inputs())):
        assert find_matches(gm, relu_add) == []
        ms = find_matches(gm, relu_add, allow_outside_users=True)
        assert len(ms) == 1
        replace_match(gm, ms[0], lambda x, y: torch.clamp_min(x + y, 0.0))
        gm.graph.lint()
        gm.recompile()
        a, b = _inputs(2)
        r, s2 = gm(a, b)
        assert torch.equal(r, torch.relu(a + b)) and torch.equal(s2, (a + b) * 2)


def test_non_overlapping_chain():
    class Chain(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.n = n

        def forward(self, x):
            for _ in range(self.n):
                x = torch.relu(x)
            return x

    double = Pattern(lambda x: torch.relu(torch.relu(x)))
    assert len(find_matches(fx.symbolic_trace(Chain(4)), double)) == 2
    ms = find_matches(fx.symbolic_trace(Chain(3)), double)
    assert len(ms) == 1 and ms[0].anchor.name == "relu_1"
    assert len(find_matches(_export(Chain(5), (torch.randn(4),)), double)) == 2


def test_replace_preserves_meta_and_numerics():
    args = _inputs(3)
    model = ThreeReluAdds()
    ref = model(*args)
    gm = _export(model, args)
    ms = find_matches(gm, relu_add)
    olds = [(m.anchor.meta["val"], m.anchor.meta.get("stack_trace"), m.anchor.meta.get("nn_module_stack")) for m in ms]
    news = [replace_match(gm, m, lambda x, y: torch.clamp_min(x + y, 0.0)) for m in ms]
    gm.graph.lint()
    gm.recompile()
    assert not any(n.target is torch.ops.aten.relu.default for n in gm.graph.nodes)
    assert sum(n.target is torch.clamp_min for n in gm.graph.nodes) == 3
    for new, (val, st, nms) in zip(news, olds):
        assert new.meta["val"] is val and new.meta.get("stack_trace") == st and new.meta.get("nn_module_stack") == nms
        assert st is not None
    assert torch.equal(gm(*args), ref)

    sgm = fx.symbolic_trace(model)
    ShapeProp(sgm).propagate(*args)
    m0 = find_matches(sgm, relu_add)[0]
    meta = m0.anchor.meta["tensor_meta"]

    def build(g, m):
        total = g.graph.call_function(torch.add, (m["x"], m["y"]))
        return g.graph.call_function(torch.clamp_min, (total, 0.0))

    new = replace_match(sgm, m0, builder=build)
    assert new.meta["tensor_meta"] is meta and new.target is torch.clamp_min
    sgm.graph.lint()
    sgm.recompile()
    assert torch.equal(sgm(*args), ref)
    assert len(find_matches(sgm, relu_add)) == 2
    with pytest.raises(ValueError, match="not a parameter of pattern"):
        replace_match(sgm, find_matches(sgm, relu_add)[0], lambda z: z)
    with pytest.raises(ValueError, match="exactly one"):
        replace_match(sgm, find_matches(sgm, relu_add)[0])


def test_module_slot_by_type_and_predicate():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide = nn.Linear(5, 8)
            self.narrow = nn.Linear(5, 4)
            self.conv = nn.Conv1d(3, 3, 1)

        def forward(self, x):
            return F.relu(self.wide(x)).sum() + F.relu(self.narrow(x)).sum() + F.relu(self.conv(x)).sum()

    gm = fx.symbolic_trace(M())
    lin = ModuleSlot(nn.Linear)
    ms = find_matches(gm, Pattern(lambda x: torch.relu(lin(x))))
    assert [m.anchor.args[0].target for m in ms] == ["wide", "narrow"]
    small = ModuleSlot(nn.Linear, predicate=lambda m: m.out_features == 4)
    ms = find_matches(gm, Pattern(lambda x: torch.relu(small(x))))
    assert [m.anchor.args[0].target for m in ms] == ["narrow"]
    anything = ModuleSlot(predicate=lambda m: True)
    assert len(find_matches(gm, Pattern(lambda x: torch.relu(anything(x))))) == 3
    with pytest.raises(RuntimeError, match="cannot be run"):
        lin(torch.randn(2))


def test_pattern_errors():
    with pytest.raises(ValueError, match="must compute something"):
        Pattern(lambda x: x)
    with pytest.raises(ValueError, match="one value"):
        Pattern(lambda x: (x + 1, x * 2))
