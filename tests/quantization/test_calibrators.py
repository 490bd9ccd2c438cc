"""Histogram (percentile, entropy, MSE) and MSE-search calibrators: known answers, exact merging, data parallel."""

import pytest
import torch
from torch import nn

import modelopt_lite.quantization as mtq
from modelopt_lite.quantization import CalibrationError, ConfigError, TensorQuantizer
from modelopt_lite.quantization.calib import (
    CALIBRATORS, EntropyCalibrator, HistogramCalibrator, HistogramMseCalibrator, MaxCalibrator, MseCalibrator,
    PercentileCalibrator,
)
from modelopt_lite.quantization.calib.histogram import _entropy_scores, _mse_scores
from modelopt_lite.quantization.algorithms.max import run_calibration_passes
from modelopt_lite.quantization.calib.mse import DEFAULT_MULTIPLIERS
from modelopt_lite.quantization.formats import Blocking, fake_quant

from dist_harness import run_ranks

NVFP4 = {"num_bits": "e2m1", "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": "e4m3"}}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def with_outliers(n=100_000, seed=0):
    """Standard normal data with four huge values (|x| up to 50)."""
    x = randn(n, seed=seed)
    x[:4] = torch.tensor([50.0, -48.0, 45.0, -40.0])
    return x


def calibrate(q: TensorQuantizer, *batches: torch.Tensor) -> torch.Tensor:
    """Drive a lone quantizer through the calibration protocol the `max` algorithm uses."""
    q.calibrator.reset()
    run_calibration_passes(q, lambda m: [m(b) for b in batches], [q])
    assert q.load_calib_amax()
    return q.amax


def sq_err(x, fmt, amax, **kw):
    return ((fake_quant(x, fmt, amax, **kw) - x).double() ** 2).sum().item()


def weight_with_outliers(rows, cols, seed=0):
    w = randn(rows, cols, seed=seed) * 0.02
    w[::3, 5] = 0.1  # a 5-sigma value in every third row (and in its block)
    return w


# --------------------------------------------------------------------------- names and configs

@pytest.mark.parametrize("name,cls,method,percentile", [
    ("histogram", HistogramCalibrator, "percentile", 99.99),
    ("percentile", PercentileCalibrator, "percentile", 99.99),
    ("percentile_99.9", HistogramCalibrator, "percentile", 99.9),
    ("percentile_99.999", HistogramCalibrator, "percentile", 99.999),
    ("entropy", EntropyCalibrator, "entropy", None),
    ("histogram_mse", HistogramMseCalibrator, "mse", None),
])
def test_histogram_names(name, cls, method, percentile):
    q = TensorQuantizer({"num_bits": 8, "calibrator": name})
    assert isinstance(q.calibrator, cls) and q.calibrator.method == method
    assert q.calibrator.num_bins == 2048
    if percentile is not None:
        assert q.calibrator.percentile == percentile
    # changing the name through attributes swaps the calibrator, as CALIBRATORS.get(name)(quantizer)
    q.set_attributes({"calibrator": "mse"})
    assert type(q.calibrator) is MseCalibrator is CALIBRATORS.get("mse")


def test_config_validates_calibrator_names():
    cfg = mtq.get_config({"quant_cfg": {"*input_quantizer": {"num_bits": 8, "calibrator": "entropy"}}})
    assert cfg.quant_cfg["*input_quantizer"].calibrator == "entropy"
    with pytest.raises(ConfigError, match="entropyy.*registered:.*entropy.*histogram_mse.*mse.*percentile"):
        mtq.get_config({"quant_cfg": {"*input_quantizer": {"calibrator": "entropyy"}}})


def test_bad_options_are_refused():
    q = TensorQuantizer()
    with pytest.raises(ValueError, match="method must be one of"):
        HistogramCalibrator(q, method="kl")
    with pytest.raises(ValueError, match="percentile must be in"):
        HistogramCalibrator(q, percentile=0)
    with pytest.raises(ValueError, match="increasing, distinct"):
        MseCalibrator(q, multipliers=[1.0, 0.5])


# --------------------------------------------------------------------------- histogram: percentile

@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_percentile_known_answers_on_arange(sign):
    # |x| = 0..1023: range R = 1024 (smallest power of two above the max), 2048 bins of width 0.5,
    # value v in bin 2v; the amax is the upper edge of the bin where the cdf reaches the percentile
    x = sign * torch.arange(1024.0)
    cases = {"percentile": 1023.5, "percentile_99.9": 1022.5, "percentile_99.999": 1023.5}
    for name, expected in cases.items():
        assert float(calibrate(TensorQuantizer({"calibrator": name}), x)) == expected
    q = TensorQuantizer()
    q.calibrator = HistogramCalibrator(q, percentile=50)
    assert float(calibrate(q, x)) == 511.5  # 512 of 1024 values are <= 511
    q.calibrator = HistogramCalibrator(q, percentile=100, num_bins=1024)
    assert float(calibrate(q, x)) == 1024.0  # bin width 1: the max 1023 is in the last bin


def test_zeros_then_data_and_all_zero():
    q = TensorQuantizer()
    q.calibrator = HistogramCalibrator(q, percentile=50)
    # 100 zeros then 0..1023: the histogram of the zeros (no range yet) merges exactly; 562 of 1124 <= 461
    assert float(calibrate(q, torch.zeros(100), torch.arange(1024.0))) == 461.5
    for name in ("percentile", "entropy", "histogram_mse"):
        assert float(calibrate(TensorQuantizer({"calibrator": name}), torch.zeros(4, 8))) == 0.0


@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_are_rejected(name, bad):
    q = TensorQuantizer({"calibrator": name}, name="blk.input_quantizer")
    x = randn(64)
    x[3] = bad
    with pytest.raises(CalibrationError, match="NaN or Inf.*blk.input_quantizer"):
        calibrate(q, x)


# --------------------------------------------------------------------------- histogram: exact power-of-two bins

def test_histogram_is_independent_of_order_and_split():
    data = torch.cat([randn(1000, seed=1) * 0.01, randn(1000, seed=2), randn(1000, seed=3) * 300])
    perm = torch.randperm(data.numel(), generator=torch.Generator().manual_seed(4))
    splits = {
        "one batch": [data],
        "growing range": [data[:1000], data[1000:2000], data[2000:]],
        "shrinking range": [data[2000:], data[1000:2000], data[:1000]],
        "shuffled chunks": list(data[perm].split(437)),
    }
    results = {}
    for key, batches in splits.items():
        q = TensorQuantizer({"calibrator": "entropy"})
        for b in batches:
            q.calibrator.collect(b)
        results[key] = q.calibrator.histogram()
    # the known answer: R = 2^e > max|x|, bin floor(|x| * 2048 / R)
    _, e = torch.frexp(data.abs().max().double())
    width = 2.0 ** int(e) / 2048
    expected = torch.bincount(torch.floor(data.double().abs() / width).long(), minlength=2048)
    for key, (counts, w) in results.items():
        assert w == width, key
        assert torch.equal(counts, expected), key


# --------------------------------------------------------------------------- histogram: entropy and MSE

def reference_kl(counts, width, fmt, i):
    """KL(P || Q) for a threshold of i bins, written out bin by bin (TensorRT's algorithm)."""
    counts = counts.double()
    p = counts[:i].clone()
    p[i - 1] += counts[i:].sum()
    centres = ((torch.arange(i, dtype=torch.float64) + 0.5) * width).float()
    levels = fake_quant(centres, fmt, torch.tensor(i * width, dtype=torch.float32))
    q = torch.zeros(i, dtype=torch.float64)
    for level in torch.unique(levels):
        group = levels == level
        support = group & (p > 0)
        if support.any():
            q[support] = counts[:i][group].sum() / support.sum()
    p, q = p / p.sum(), q / q.sum()
    if ((p > 0) & (q == 0)).any():
        return float("inf")
    m = p > 0
    return float((p[m] * torch.log(p[m] / q[m])).sum())


def reference_mse(counts, width, fmt, i):
    centres = ((torch.arange(counts.numel(), dtype=torch.float64) + 0.5) * width).float()
    out = fake_quant(centres, fmt, torch.tensor(i * width, dtype=torch.float32))
    return float(((centres - out).double() ** 2 * counts.double()).sum())


@pytest.mark.parametrize("num_bits", [8, (4, 3)])
def test_entropy_and_mse_scores_match_bin_by_bin_reference(num_bits):
    q = TensorQuantizer({"num_bits": num_bits})
    q.calibrator = HistogramCalibrator(q, method="entropy", num_bins=256)
    q.calibrator.collect(with_outliers(5000, seed=7) * 0.3)
    counts, width = q.calibrator.histogram()
    assert counts[0] > 0 and counts[-1] == 0  # no exact zeros here, and the range is above the max
    bins = torch.arange(128, 200)
    got = _entropy_scores(counts.double(), width, q.fmt, bins)
    want = torch.tensor([reference_kl(counts, width, q.fmt, int(i)) for i in bins], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    got = _mse_scores(counts.double(), width, q.fmt, bins)
    want = torch.tensor([reference_mse(counts, width, q.fmt, int(i)) for i in bins], dtype=torch.float64)
    assert torch.allclose(got, want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name,num_bits", [("entropy", 8), ("histogram_mse", 4), ("mse", 4), ("percentile", 8)])
def test_outliers_are_clipped_and_the_bulk_error_drops(name, num_bits):
    x = with_outliers()
    bulk = x[4:]
    q = TensorQuantizer({"num_bits": num_bits, "calibrator": name})
    amax = calibrate(q, x[:50_000], x[50_000:])
    # well below the max of 50, and a lower error on the bulk of the data than max calibration
    assert float(amax) <= 12.5
    assert sq_err(bulk, q.fmt, amax) < 0.3 * sq_err(bulk, q.fmt, torch.tensor(50.0))
    if name == "mse":
        assert float(amax) == 12.5  # the smallest candidate (0.25 x max): the optimum is lower still
    if name == "percentile":
        # 99.99% of 100k normal values lie within 3.9; the histogram's bin width is 64/2048
        assert 3.7 < float(amax) < 4.3


def test_exact_zeros_do_not_drag_entropy_down():
    # post-ReLU data: half exact zeros. They quantize exactly, so the KL search leaves them out;
    # the same spike made of tiny nonzero values (bin 0) pulls the amax far down
    x = torch.relu(randn(200_000, seed=3))
    assert 3.0 < float(calibrate(TensorQuantizer({"calibrator": "entropy"}), x)) <= float(x.max())
    assert float(calibrate(TensorQuantizer({"calibrator": "entropy"}), x + 1e-30)) < 1.5


# --------------------------------------------------------------------------- refused formats

@pytest.mark.parametrize("attrs", [{"num_bits": 8, "axis": 0}, {"num_bits": 4, "block_sizes": {-1: 128}}, NVFP4])
def test_histogram_refuses_per_channel_and_block_formats(attrs):
    q = TensorQuantizer({**attrs, "calibrator": "entropy"}, name="fc.weight_quantizer")
    with pytest.raises(ValueError, match="'fc.weight_quantizer'.*per-tensor formats only.*calibrator: mse"):
        calibrate(q, randn(8, 256))


def test_mse_refuses_mx():
    mx = {"num_bits": "e2m1", "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": "e8m0"}, "calibrator": "mse"}
    q = TensorQuantizer(mx, name="fc.weight_quantizer")
    assert not q.needs_calibration  # MX needs none, and the search has nothing to choose
    with pytest.raises(ValueError, match="'fc.weight_quantizer'.*mxfp4.*no amax to search"):
        q.calibrator.collect(randn(4, 64))


# --------------------------------------------------------------------------- MSE search on weights

def calibrate_weight_once(q: TensorQuantizer, w: torch.Tensor) -> torch.Tensor:
    """What `calibrate_weight` does: one call, then load_calib_amax (no next_pass)."""
    q.disable_quant()
    q.enable_calib()
    q(w)
    q.disable_calib()
    q.enable_quant()
    assert q.load_calib_amax()
    return q.amax


def test_mse_per_channel_equals_brute_force_and_beats_max():
    w = weight_with_outliers(6, 64)
    q = TensorQuantizer({"num_bits": 4, "axis": 0, "calibrator": "mse"}, name="fc.weight_quantizer")
    amax = calibrate_weight_once(q, w)
    assert amax.shape == (6, 1)
    row_fmt = TensorQuantizer({"num_bits": 4}).fmt
    for r in range(6):
        rmax = w[r].abs().max()
        errs = [sq_err(w[r], row_fmt, (rmax.double() * m).float()) for m in DEFAULT_MULTIPLIERS]
        best = max(k for k, e in enumerate(errs) if e == min(errs))  # ties: the larger amax
        assert float(amax[r, 0]) == float((rmax.double() * DEFAULT_MULTIPLIERS[best]).float()), r
    max_amax = w.abs().amax(1, keepdim=True)
    assert sq_err(w, q.fmt, amax) < 0.9 * sq_err(w, q.fmt, max_amax)
    assert torch.equal(q(w), fake_quant(w, q.fmt, amax))


def per_block_errors(w, fmt, out):
    blocking = Blocking(w.shape, fmt.blocks)
    return blocking.to_blocks((out - w).double() ** 2).sum(dim=blocking.inner_dims)


def test_mse_int4_blocks_beat_max():
    w = weight_with_outliers(8, 256)
    q = TensorQuantizer({"num_bits": 4, "block_sizes": {-1: 128}, "calibrator": "mse"}, name="fc.weight_quantizer")
    amax = calibrate_weight_once(q, w)
    assert amax.shape == (8, 2)
    base = Blocking(w.shape, q.fmt.blocks)
    max_amax = base.block_amax(base.to_blocks(w))
    assert bool((amax <= max_amax).all()) and bool((amax >= 0.25 * max_amax - 1e-9).all())
    mse_err = per_block_errors(w, q.fmt, fake_quant(w, q.fmt, amax))
    max_err = per_block_errors(w, q.fmt, fake_quant(w, q.fmt, max_amax))
    assert bool((mse_err <= max_err).all()) and mse_err.sum() < 0.9 * max_err.sum()


def test_mse_nvfp4_weight_is_searched_per_block():
    w = weight_with_outliers(8, 64)
    q = TensorQuantizer({**NVFP4, "calibrator": "mse"}, name="fc.weight_quantizer")
    amax = calibrate_weight_once(q, w)
    gmax = w.abs().max()
    assert amax.shape == (8, 4)  # one amax per 16-element block
    assert float(q.global_amax) == float(gmax)  # the global scale stays at the weight's max
    out = q(w)
    assert torch.equal(out, fake_quant(w, q.fmt, amax, global_amax=gmax))
    dynamic = fake_quant(w, q.fmt, gmax)  # max calibration: block amaxes from the data
    mse_err, max_err = per_block_errors(w, q.fmt, out), per_block_errors(w, q.fmt, dynamic)
    assert bool((mse_err <= max_err).all()) and mse_err.sum() < 0.95 * max_err.sum()


def test_mse_nvfp4_activation_searches_the_global_amax():
    x = with_outliers(4096).reshape(64, 64)
    q = TensorQuantizer({**NVFP4, "calibrator": "mse"}, name="fc.input_quantizer")
    amax = calibrate(q, x[:32], x[32:])
    assert amax.shape == () and float(amax) <= 50.0
    assert sq_err(x, q.fmt, amax) <= sq_err(x, q.fmt, torch.tensor(50.0))


def test_mse_activation_without_second_pass_warns_and_uses_max():
    q = TensorQuantizer({"num_bits": 4, "calibrator": "mse"}, name="fc.input_quantizer")
    q.calibrator.collect(with_outliers(1000))
    with pytest.warns(UserWarning, match="second pass"):
        assert float(q.calibrator.compute_amax()) == 50.0


# --------------------------------------------------------------------------- through the algorithms

def test_activation_mse_runs_the_loop_twice():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16))
    batches = [with_outliers(8 * 16, seed=i).reshape(8, 16) for i in range(3)]
    calls = []

    def loop(m):
        for b in batches:
            calls.append(1)
            m(b)

    cfg = {"quant_cfg": {"default": {"enable": False}, "*input_quantizer": {"num_bits": 4, "calibrator": "mse"}}}
    mtq.quantize(model, cfg, forward_loop=loop, share_input_amax=False)
    assert len(calls) == 6  # max pass, then the search pass
    alone = calibrate(TensorQuantizer({"num_bits": 4, "calibrator": "mse"}, name="x"), *batches)
    assert torch.equal(model[0].input_quantizer.amax, alone)
    assert float(alone) < 50.0


def test_mse_algorithm_with_and_without_forward_loop():
    def build():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(32, 24))
        with torch.no_grad():
            m[0].weight[::4, 3] = 2.0
        return m

    cfg = {"quant_cfg": {"default": {"enable": False}, "*weight_quantizer": {"num_bits": 4, "axis": 0},
                         "*input_quantizer": {"num_bits": 4}}, "algorithm": "mse"}
    batches = [with_outliers(4 * 32, seed=i).reshape(4, 32) for i in range(2)]
    model = mtq.quantize(build(), cfg, forward_loop=lambda m: [m(b) for b in batches], share_input_amax=False)
    wq, iq = model[0].weight_quantizer, model[0].input_quantizer
    expected = calibrate_weight_once(TensorQuantizer({"num_bits": 4, "axis": 0, "calibrator": "mse"},
                                                     name="w.weight_quantizer"), model[0].weight)
    assert torch.equal(wq.amax, expected)
    assert not torch.equal(wq.amax, model[0].weight.abs().amax(1, keepdim=True))
    assert torch.equal(iq.amax, calibrate(TensorQuantizer({"num_bits": 4, "calibrator": "mse"}, name="x"), *batches))
    # the configured calibrators are back afterwards
    assert type(wq.calibrator) is MaxCalibrator and type(iq.calibrator) is MaxCalibrator

    with pytest.warns(UserWarning, match="without a forward_loop"):
        no_loop = mtq.quantize(build(), cfg, share_input_amax=False)
    assert torch.equal(no_loop[0].weight_quantizer.amax, expected)  # weights still searched
    weights_only = mtq.quantize(build(), {**cfg, "algorithm": {"method": "mse", "activations": False}},
                                forward_loop=lambda m: [m(b) for b in batches], share_input_amax=False)
    assert float(weights_only[0].input_quantizer.amax) == 50.0


# --------------------------------------------------------------------------- presets end to end

MLP_BOUNDS = {"INT8_ENTROPY_CFG": 0.03, "INT8_PERCENTILE_CFG": 0.03, "FP8_MSE_CFG": 0.1,
              "NVFP4_MSE_CFG": 0.35, "INT4_BLOCKWISE_MSE_CFG": 0.35}


@pytest.mark.parametrize("name", sorted(MLP_BOUNDS))
def test_presets_on_mlp(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    x = randn(16, 64, seed=99)
    ref = model(x).detach()
    batches = [randn(8, 64, seed=i) for i in range(4)]
    mtq.quantize(model, name, forward_loop=mtq.create_forward_loop(batches, progress=False), share_input_amax=False)
    err = ((model(x) - ref).norm() / ref.norm()).item()
    assert 1e-4 < err < MLP_BOUNDS[name]
    for layer in (model[0], model[2]):
        for q in (layer.weight_quantizer, layer.input_quantizer):
            assert not q.is_enabled or q.amax is not None


def test_nvfp4_mse_preset_on_tiny_llama_saves_and_restores(tmp_path):
    from modelopt_lite.models.tiny import build_tiny_model

    ids = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = mtq.quantize(build_tiny_model("llama"), "nvfp4_mse", forward_loop=lambda m: [m(i) for i in ids],
                         share_input_amax=False)
    proj = model.model.layers[0].self_attn.q_proj
    assert proj.weight_quantizer.amax.shape == (64, 4) and proj.weight_quantizer.global_amax is not None
    assert proj.input_quantizer.amax.shape == ()
    out = model(ids[0]).logits
    assert torch.isfinite(out).all()
    mtq.save(model, tmp_path / "state")
    fresh = mtq.restore(build_tiny_model("llama"), tmp_path / "state")
    assert torch.equal(fresh(ids[0]).logits, out)


@pytest.mark.parametrize("name", ["int8_entropy", "int8_percentile", "int4_mse", "fp8_mse"])
def test_presets_on_tiny_llama(name):
    from modelopt_lite.models.tiny import build_tiny_model

    ids = [torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    model = mtq.quantize(build_tiny_model("llama"), name, forward_loop=lambda m: [m(i) for i in ids],
                         share_input_amax=False)
    quantizers = [q for _, q in mtq.named_quantizers(model) if q.needs_calibration]
    assert quantizers and all(q.amax is not None for q in quantizers)
    assert torch.isfinite(model(ids[0]).logits).all()


# --------------------------------------------------------------------------- data parallel (2 processes, gloo)

CASES = {  # name: (attributes, quantizer name); the batches of each rank come from rank_data()
    "entropy": ({"calibrator": "entropy"}, "a.input_quantizer"),
    "percentile": ({"calibrator": "percentile"}, "b.input_quantizer"),
    "histogram_mse": ({"num_bits": 4, "calibrator": "histogram_mse"}, "c.input_quantizer"),
    "mse_act": ({"num_bits": 4, "axis": -1, "calibrator": "mse"}, "d.input_quantizer"),
    "mse_nvfp4_weight": ({**NVFP4, "calibrator": "mse"}, "e.weight_quantizer"),
    "only_rank0": ({"calibrator": "entropy"}, "f.input_quantizer"),
}


def rank_data():
    """Per case, the batches of rank 0 and rank 1 (rank 1's range is far larger, so histograms coarsen)."""
    small = [randn(4, 64, seed=1) * 0.05, randn(4, 64, seed=2)]
    large = [with_outliers(256, seed=3).reshape(4, 64) * 3]
    w = weight_with_outliers(8, 64)
    data = {name: (small, large) for name in CASES}
    data["mse_act"] = ([torch.cat(small)], large)  # one batch per rank: float64 error sums in the same order
    data["mse_nvfp4_weight"] = ([w], [w])
    data["only_rank0"] = (small, [])
    return data


def _calibrate_rank(rank, world):
    """One rank of the data-parallel test: every case calibrated on this rank's batches."""
    data = rank_data()
    result = {}
    for name, (attrs, qname) in CASES.items():
        q = TensorQuantizer(attrs, name=qname)
        result[name] = (calibrate(q, *data[name][rank]), q.global_amax)
    return result


def test_data_parallel_sync_equals_one_process():
    data = rank_data()
    results = run_ranks(_calibrate_rank)
    for name, (attrs, qname) in CASES.items():
        q = TensorQuantizer(attrs, name=qname)
        single = calibrate(q, *data[name][0], *data[name][1])
        for r in range(2):
            amax, glob = results[r][name]
            assert torch.equal(amax, single), (name, r)
            assert (glob is None) == (q.global_amax is None) and (glob is None or torch.equal(glob, q.global_amax))
    # the histogram merged ranks of different ranges: the amax is not rank 0's alone
    assert float(results[0]["percentile"][0]) > 10
