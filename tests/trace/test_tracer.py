"""RobustTracer and recursive_trace on modules FX cannot fully trace."""

import pytest
import torch
from torch import nn

from modelopt_lite.trace import GraphCollection, RobustTracer, TraceFailure, recursive_trace, register_leaf, unregister_leaf


class Branchy(nn.Module):
    """Data-dependent control flow: untraceable symbolically and by torch.export."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = Branchy()
        self.c = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


def _calls(graph):
    return [n.target for n in graph.nodes if n.op == "call_module"]


def test_robust_tracer_makes_failed_submodule_a_leaf():
    net = Net()
    tracer = RobustTracer()
    graph = tracer.trace(net)
    assert _calls(graph) == ["a", "b", "c"]
    assert list(tracer.failures) == ["b"]
    assert "control flow" in tracer.failures["b"]
    gm = torch.fx.GraphModule(net, graph)
    x = torch.randn(3, 4)
    torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)


def test_recursive_trace_collection():
    net = Net()
    graphs = recursive_trace(net)
    assert isinstance(graphs, GraphCollection)
    assert [m for m in graphs] == [net, net.b.fc]  # root, then the children of the failed module
    assert graphs.is_failed(net.b) and "control flow" in graphs.failure_msg(net.b)
    assert not graphs.is_failed(net.a) and graphs.failure_msg(net.a) is None
    assert graphs.is_unvisited(net.unused) and not graphs.is_unvisited(net.a) and not graphs.is_unvisited(net.b.fc)
    assert graphs.coverage() == (4, 6)  # net, a, c, b.fc of net, a, b, b.fc, c, unused
    assert graphs.coverage((nn.Linear,)) == (3, 4)
    assert graphs.failures() == {"b": graphs.failure_msg(net.b)}
    text = repr(graphs)
    assert "4/6 modules covered" in text and "failed (1)" in text and "b [Branchy]" in text and "unvisited (1): unused" in text
    assert [type(m).__name__ for m, g in graphs.items()] == ["Net", "Linear"]


def test_export_route_also_fails_on_data_dependent_flow():
    net = Net()
    graphs = recursive_trace(net, example_inputs=(torch.randn(2, 4),))
    assert graphs.is_failed(net.b)
    assert "torch.export" in graphs.failure_msg(net.b)


def test_root_failure_falls_back_to_children():
    root = Branchy()
    graphs = recursive_trace(root)
    assert graphs.is_failed(root) and [m for m in graphs] == [root.fc]
    with pytest.raises(TraceFailure):
        RobustTracer().trace(root)


def test_export_route_when_root_code_is_untraceable_by_fx():
    class Tuple(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.out = nn.Linear(3, 2)

        def forward(self, x):
            if x.dim() == 3:  # a Proxy in a condition fails in FX; torch.export knows the rank
                x = x * 2
            a, b = self.fc(x).chunk(2, dim=-1)
            return self.out(a * torch.sigmoid(b))

    m = Tuple()
    assert recursive_trace(m).is_failed(m)
    x = torch.randn(2, 5, 4)
    graphs = recursive_trace(m, example_inputs=(x,))
    entry = graphs.entry(m)
    assert entry.method == "export" and not graphs.is_failed(m)
    assert _calls(graphs[m]) == ["fc", "out"]
    assert "FX failed" in entry.note
    torch.testing.assert_close(graphs.graph_module(m)(x), m(x), rtol=0, atol=0)
    y = torch.randn(7, 3, 4)  # batch and sequence are dynamic
    torch.testing.assert_close(graphs.graph_module(m)(y), m(y), rtol=0, atol=0)


def test_registered_leaf():
    net = Net()
    register_leaf(Branchy)
    try:
        tracer = RobustTracer()
        tracer.trace(net)
        assert tracer.failures == {}
        assert recursive_trace(net).failures() == {}
    finally:
        unregister_leaf(Branchy)
    with pytest.raises(TypeError):
        register_leaf(int)


def test_extra_leaves_argument():
    net = Net()
    graphs = recursive_trace(net, leaves=(Branchy,))
    assert graphs.failures() == {} and len(graphs) == 1
