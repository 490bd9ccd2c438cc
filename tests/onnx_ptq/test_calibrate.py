"""Calibration statistics: max, percentile and entropy amaxes, histogram merging, and the ORT collection."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelopt_lite.onnx import HistogramStatistic, MaxStatistic, collect_statistics, entropy_amax


def _outlier_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(200_000).astype(np.float32)
    x[:8] = [60.0, -55.0, 48.0, -40.0, 33.0, 30.0, -25.0, 20.0]
    return rng.permutation(x)


def _amax(stat, batches):
    for b in batches:
        stat.collect(b)
    return stat.compute_amax()


def test_methods_on_outliers():
    x = _outlier_data()
    batches = np.array_split(x, 4)
    top = _amax(MaxStatistic(), batches)
    pct = _amax(HistogramStatistic("percentile"), batches)
    ent8 = _amax(HistogramStatistic("entropy", fmt="int8"), batches)
    ent_fp8 = _amax(HistogramStatistic("entropy", fmt="fp8"), batches)
    assert top == 60.0
    # the 99.99th percentile of |N(0, 1)| is 3.9; the bins are 64 / 2048 wide
    assert 3.8 < pct < 4.2
    assert np.isclose(pct, np.quantile(np.abs(x), 0.9999), atol=64 / 2048 + 1e-6)
    assert 3.0 < ent8 < 20.0 and ent8 < top / 3
    # the FP8 grid is fine near zero, so its search keeps more of the range than INT8's
    assert ent8 < ent_fp8 <= top


def test_without_outliers_entropy_and_percentile_stay_near_max():
    x = np.random.default_rng(1).uniform(-1, 1, 100_000).astype(np.float32)
    top = _amax(MaxStatistic(), [x])
    assert 0.99 < _amax(HistogramStatistic("percentile"), [x]) <= top
    assert 0.9 < _amax(HistogramStatistic("entropy"), [x]) <= top


def test_histogram_merges_across_batches_in_any_order():
    x = _outlier_data(2)
    small, large = np.abs(x[np.abs(x) < 1])[:1000], x
    a, b, c = HistogramStatistic(), HistogramStatistic(), HistogramStatistic()
    for part in (small, large):  # the range grows from 1 to 64: bins merge
        a.collect(part)
    for part in (large, small):
        b.collect(part)
    c.collect(np.concatenate([small, large]))
    assert a.exp == b.exp == c.exp == 6
    np.testing.assert_array_equal(a.counts, c.counts)
    np.testing.assert_array_equal(b.counts, c.counts)
    assert a.zeros == c.zeros and a.compute_amax() == c.compute_amax()


def test_entropy_search_on_a_known_histogram():
    centres = (np.arange(2048) + 0.5) / 2048
    counts = np.round(1e6 * np.exp(-centres**2 / (2 * 0.05**2))).astype(np.int64)  # |N(0, 0.05)|, ends at 0.27
    counts[2000] = 1  # one outlier near 1
    amax = entropy_amax(counts, 1 / 2048, "int8")
    assert 0.2 < amax < 0.26  # 4 to 5 standard deviations: the outlier and the sparse tail are clipped
    assert amax < entropy_amax(counts, 1 / 2048, "fp8") < 0.3


def test_bad_inputs():
    with pytest.raises(ValueError, match="percentile must be in"):
        HistogramStatistic("percentile", percentile=120)
    with pytest.raises(ValueError, match="NaN or Inf"):
        HistogramStatistic().collect(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="'percentile' or 'entropy'"):
        HistogramStatistic("mse")


def _matmul_model():
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "w")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_collect_statistics_through_onnxruntime():
    model = _matmul_model()
    x = np.concatenate([_outlier_data(3)[:40_000], [60.0, -2.0, 1.0, 0.5]]).astype(np.float32).reshape(-1, 4)
    batches = [{"x": b} for b in np.array_split(x, 5)]
    top = collect_statistics(model, ["x", "h"], batches, "max")
    assert top == {"x": 60.0, "h": 120.0}  # h = 2 x, an intermediate made a graph output
    pct = collect_statistics(model, ["x", "h"], batches, "percentile", percentile=99.0)
    assert pct["x"] < 3.0 and np.isclose(pct["h"], 2 * pct["x"], rtol=0.02)
    with pytest.raises(ValueError, match="unknown calibration method 'kl'"):
        collect_statistics(model, ["x"], batches, "kl")
    assert [o.name for o in model.graph.output] == ["y"]  # the caller's model is left alone
    onnx.checker.check_model(model)
