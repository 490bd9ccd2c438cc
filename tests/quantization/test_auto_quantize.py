"""auto_quantize: budgets met exactly, a sensitive layer kept precise, groups, report, replay, save/restore, export."""

import copy
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import modelopt_lite.quantization as mtq
from modelopt_lite.opt import get_modes
from modelopt_lite.quantization.auto_quantize import (NONE, AutoQuantizeReport, BudgetError, auto_quantize,
                                                      replay_auto_quantize)
from modelopt_lite.quantization.auto_quantize_search import solve_budget
from modelopt_lite.quantization.auto_quantize_score import layer_quantizers

NV, F8 = "NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"
FORMATS = [mtq.NVFP4_DEFAULT_CFG, mtq.FP8_DEFAULT_CFG]
BITS = {NV: 4.0, F8: 8.0, NONE: 16.0}


# --------------------------------------------------------------------------- search

def _brute(costs, scores, budget):
    best = None
    for pick in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(c[k] for c, k in zip(costs, pick))
        if cost > budget:
            continue
        score = sum(s[k] for s, k in zip(scores, pick))
        key = (round(score, 9), -cost)
        if best is None or key < best[0]:
            best = (key, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_search_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    costs, scores = [], []
    for _ in range(6):
        params = int(torch.randint(1, 9, (1,), generator=g)) * 256
        costs.append([params * 4, params * 8, params * 16])
        s = sorted(torch.rand(3, generator=g).tolist(), reverse=True)
        scores.append([s[0], s[1], 0.0])
    total = sum(c[0] for c in costs) / 4
    for bits in (4.0, 5.3, 7.9, 11.0, 16.0):
        res = solve_budget(costs, scores, bits * total)
        (score, neg_cost), cost = _brute(costs, scores, bits * total)
        assert res.exact
        assert res.cost <= bits * total
        assert res.cost == cost and round(res.score, 9) == score


def test_search_coarse_grid_still_meets_budget():
    costs = [[1000 * 4 + 1, 1000 * 8 + 3, 1000 * 16 + 7]] * 3 + [[997 * 4, 997 * 8, 997 * 16]]
    scores = [[3.0, 1.0, 0.0]] * 4
    budget = 0.5 * sum(c[1] + c[0] for c in costs)
    res = solve_budget(costs, scores, budget, max_bins=50)
    assert not res.exact and res.cost <= budget
    exact = solve_budget(costs, scores, budget, max_bins=10**5)  # gcd 1: one cell per bit
    assert exact.exact and exact.cost <= budget and exact.score <= res.score
    (score, _), cost = _brute(costs, scores, budget)
    assert exact.score == score and exact.cost == cost


def test_search_budget_below_lowest():
    with pytest.raises(BudgetError, match="below the cheapest"):
        solve_budget([[400, 800, 1600]], [[1.0, 0.5, 0.0]], 399)


# --------------------------------------------------------------------------- an MLP with one sensitive layer

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 128), nn.Linear(128, 16)
        self.fc3, self.fc4 = nn.Linear(16, 128), nn.Linear(128, 8)

    def forward(self, x):
        return self.fc4(F.relu(self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))))


PARAMS = {"fc1": 8192, "fc2": 2048, "fc3": 2048, "fc4": 1024}


def _net(sensitive=True):
    torch.manual_seed(0)
    net = Net().eval()
    if sensitive:  # fc2 reads a channel that is always 0 through huge weights: no effect in float, but they
        with torch.no_grad():  # set fc2's scales, so quantizing fc2 crushes its other weights
            net.fc1.weight[0] = 0.0
            net.fc1.bias[0] = -1.0
            net.fc2.weight[:, 0] = 1e5
    return net


_G = torch.Generator().manual_seed(1)
BATCHES = [(torch.randn(32, 64, generator=_G), torch.randint(0, 8, (32,), generator=_G)) for _ in range(4)]
TEST_X = torch.randn(256, 64, generator=_G)


def _step(model, batch):
    return model(batch[0])


def _loss(out, batch):
    return F.cross_entropy(out, batch[1])


def _run(net, bits, method="gradient", formats=FORMATS):
    return auto_quantize(net, {"effective_bits": bits}, formats, BATCHES, loss_func=_loss, forward_step=_step,
                         method=method, num_calib_steps=4, num_score_steps=4)


def _error(model, ref):
    """The quantization loss: mean squared difference of the outputs to the float model's."""
    with torch.no_grad():
        return float(F.mse_loss(model(TEST_X), ref(TEST_X)))


def _effective(decisions):
    return sum(PARAMS[n] * BITS[c] for n, c in decisions.items()) / sum(PARAMS.values())


@pytest.mark.parametrize("method", ["gradient", "kl_div"])
def test_budgets_met_exactly(method):
    for bits in (4.0, 5.0, 6.0, 8.0, 11.0, 16.0, 20.0):
        model, report = _run(_net(), bits, method)
        assert report.effective_bits <= bits
        assert report.effective_bits == pytest.approx(_effective(report.decisions))
        # the least total score among all 81 assignments within the budget, the most bits among ties
        scores = {n: {**r.scores, NONE: 0.0} for n, r in ((r.layer, r) for r in report.rows)}
        names = list(PARAMS)
        best = min((sum(scores[n][c] for n, c in zip(names, pick)), -_effective(dict(zip(names, pick))))
                   for pick in itertools.product([NV, F8, NONE], repeat=4)
                   if _effective(dict(zip(names, pick))) <= bits)
        assert report.total_score == pytest.approx(best[0], rel=1e-9, abs=1e-15)
        assert report.effective_bits == pytest.approx(-best[1])
        # close to the budget: no layer could move to more bits at no higher score and still fit
        for n, c in report.decisions.items():
            for up in [f for f in (F8, NONE) if BITS[f] > BITS[c] and scores[n][f] <= scores[n][c]]:
                assert _effective({**report.decisions, n: up}) > bits
        if bits == 4.0:
            assert set(report.decisions.values()) == {NV}
        if bits >= 16.0:
            assert set(report.decisions.values()) == {NONE}
            assert not any(q.is_enabled for _, q in mtq.named_quantizers(model))
        expected = {4.0: 4.0, 5.0: 65536 / 13312, 6.0: 77824 / 13312, 8.0: 98304 / 13312, 11.0: 131072 / 13312}
        if bits in expected:
            assert report.effective_bits == pytest.approx(expected[bits])


def test_budget_below_the_lowest_format():
    with pytest.raises(BudgetError, match=r"effective_bits=3\.9 cannot be met: the lowest achievable is 4\.0000"):
        _run(_net(), 3.9)
    with pytest.raises(ValueError, match="constraints must be"):
        auto_quantize(_net(), {"bits": 5}, FORMATS, BATCHES, loss_func=_loss, forward_step=_step)
    with pytest.raises(ValueError, match="method must be one of"):
        _run(_net(), 5.0, method="hessian")
    with pytest.raises(ValueError, match="needs loss_func"):
        auto_quantize(_net(), {"effective_bits": 5}, FORMATS, BATCHES, forward_step=_step, num_calib_steps=1)


@pytest.mark.parametrize("method", ["gradient", "kl_div"])
def test_sensitive_layer_kept_precise_and_beats_uniform(method):
    ref = _net()
    model, report = _run(_net(), 8.0, method)
    assert report.decisions == {"fc1": NV, "fc2": NONE, "fc3": F8, "fc4": NONE}
    assert report.effective_bits == pytest.approx(98304 / 13312)  # 7.385 <= 8
    rows = {r.layer: r for r in report.rows}
    for fmt in (NV, F8):  # fc2 is the most sensitive layer in both formats, per weight element too
        assert max(rows, key=lambda n: rows[n].scores[fmt] / PARAMS[n]) == "fc2"
    uniform_fp8 = mtq.quantize(_net(), F8, lambda m: [m(b[0]) for b in BATCHES])  # 8 bits
    auto_err, uniform_err = _error(model, ref), _error(uniform_fp8, ref)
    assert auto_err < 0.1 * uniform_err, (auto_err, uniform_err)
    assert 1e-7 < auto_err < 1e-4 and uniform_err > 1e-3


def test_custom_format_and_weight_only_bits():
    int4 = mtq.get_config("INT4_BLOCKWISE_WEIGHT_ONLY_CFG").model_dump(exclude_unset=True)
    custom = {"quant_cfg": {"default": {"enable": False}, "fc[13].weight_quantizer": {"num_bits": 8, "axis": 0}},
              "algorithm": "max"}
    model, report = _run(_net(sensitive=False), 6.0, formats=[int4, custom])
    assert report.formats == ["INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "format_1"]
    rows = {r.layer: r for r in report.rows}
    assert set(rows["fc2"].scores) == {"INT4_BLOCKWISE_WEIGHT_ONLY_CFG"}  # the custom format covers fc1, fc3 only
    assert set(rows["fc1"].scores) == {"INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "format_1"}
    assert report.effective_bits <= 6.0
    for n, r in rows.items():
        m = model.get_submodule(n)
        assert m.weight_quantizer.is_enabled == (r.choice != NONE)
        assert not m.input_quantizer.is_enabled  # both formats are weight-only


def test_weight_changing_algorithm_keeps_its_weights_per_layer():
    ref = _net(sensitive=False)
    model, report = _run(_net(sensitive=False), 6.0, formats=[mtq.INT4_AWQ_CFG, mtq.FP8_DEFAULT_CFG])
    assert report.formats == ["INT4_AWQ_CFG", F8]
    awq = mtq.quantize(_net(sensitive=False), "INT4_AWQ_CFG", lambda m: [m(b[0]) for b in BATCHES])
    chosen = set(report.decisions.values())
    assert "INT4_AWQ_CFG" in chosen and len(chosen) > 1
    for n, c in report.decisions.items():
        m = model.get_submodule(n)
        if c == "INT4_AWQ_CFG":  # the smoothed weight and the scale of the whole-model AWQ run
            assert torch.allclose(m.weight, awq.get_submodule(n).weight)
            assert torch.equal(layer_quantizers(m)["input_quantizer"].pre_quant_scale,
                               awq.get_submodule(n).input_quantizer.pre_quant_scale)
        else:  # other layers keep the float weight
            assert torch.equal(m.weight, ref.get_submodule(n).weight)
            assert m.input_quantizer.pre_quant_scale is None


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc, self.out = nn.LayerNorm(64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.out(F.relu(self.fc(self.norm(x))))


def test_smoothing_folded_outside_the_layers_is_refused():
    torch.manual_seed(0)
    net = Normed().eval()
    before = {n: p.clone() for n, p in net.named_parameters()}
    with pytest.raises(ValueError, match=r"INT8_SMOOTHQUANT_CFG changed parameters outside the quantized layers "
                                         r"\(norm.weight"):
        _run(net, 8.0, formats=["INT8_SMOOTHQUANT_CFG", F8])
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())  # left as it was
    unfolded = mtq.get_config("INT8_SMOOTHQUANT_CFG").model_dump(exclude_unset=True)
    unfolded["algorithm"] = {"method": "smoothquant", "fold": False}
    model, report = _run(net, 8.0, formats=[unfolded, F8])
    assert report.formats == ["format_0", F8] and report.effective_bits <= 8.0
    assert torch.equal(model.norm.weight, before["norm.weight"])


# --------------------------------------------------------------------------- tiny Llama

def _ids(seed):
    return {"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(seed))}


def _lm_loss(out, batch):
    logits = out.logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["input_ids"][:, 1:].reshape(-1))


def _llama():
    from modelopt_lite.models.tiny import build_tiny_model

    return build_tiny_model("llama").eval()


@pytest.fixture(scope="module")
def llama_result():
    pytest.importorskip("transformers")
    model = _llama()
    model, report = auto_quantize(model, {"effective_bits": 6.0}, FORMATS, [_ids(i) for i in range(2)],
                                  loss_func=_lm_loss, num_calib_steps=2, num_score_steps=2)
    return model, report


def test_llama_groups_share_one_format(llama_result):
    model, report = llama_result
    assert len(report.rows) == 14 and report.excluded == ["lm_head"]
    fused = [g for g in report.groups if len(g) > 1]
    assert sorted(len(g) for g in fused) == [2, 2, 3, 3]  # q/k/v and gate/up of both decoder layers
    decisions = report.decisions
    for g in fused:
        assert len({decisions[n] for n in g}) == 1
    assert 5.5 < report.effective_bits <= 6.0
    assert {NV, F8} <= set(decisions.values())
    # one input amax per group, as quantize() gives
    for g in fused:
        amaxes = [model.get_submodule(n).input_quantizer.amax for n in g if decisions[n] != NONE]
        assert all(torch.equal(a, amaxes[0]) for a in amaxes)


def test_report_table(llama_result):
    _, report = llama_result
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == "auto_quantize (gradient): 14 layers in 8 groups"
    assert lines[1].split() == ["layer", "params", "group", "choice", "bits", f"score[{NV}]", f"score[{F8}]"]
    body = lines[3:17]
    assert len({len(line) for line in body}) == 1  # fixed-width columns
    first = body[0].split()
    assert first[:3] == ["model.layers.0.self_attn.q_proj", "4096", "0"]
    assert first[3] == report.rows[0].choice and float(first[4]) == report.rows[0].bits
    assert f"effective bits {report.effective_bits:.4f} (budget 6)" in text
    assert "not quantizable by any format (left unquantized, not counted): lm_head" in text
    assert isinstance(report, AutoQuantizeReport)


def _formats(model):
    return {n: (q.fmt.name if q.is_enabled else None) for n, q in mtq.named_quantizers(model)}


def test_mode_recorded_and_replayed(llama_result, tmp_path):
    model, report = llama_result
    (entry,) = [e for e in get_modes(model) if e.mode == "auto_quantize"]
    assert entry.state == report.decisions
    assert entry.config["quantization_formats"] == [NV, F8] and entry.config["method"] == "gradient"
    assert entry.config["constraints"] == {"effective_bits": 6.0}
    json.dumps(entry.config)
    fresh = _llama()
    replay_auto_quantize(fresh, entry.config, entry.state)
    assert _formats(fresh) == _formats(model)
    # amaxes come with the saved quantizer state: then the outputs match
    mtq.save(model, tmp_path / "q")
    mtq.restore(fresh, tmp_path / "q")
    x = _ids(7)["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="not quantizable layers"):
        replay_auto_quantize(nn.Sequential(nn.Linear(4, 4)), entry.config, entry.state)


def test_mixed_precision_hf_export(llama_result, tmp_path):
    from modelopt_lite.export import export_hf_checkpoint, load_hf_checkpoint

    model, report = llama_result
    mtq.print_quant_summary(model)
    out = export_hf_checkpoint(model, tmp_path / "ckpt")
    q = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "MIXED_PRECISION"
    algo = {NV: "NVFP4", F8: "FP8"}
    expected = {n: algo[c] for n, c in report.decisions.items() if c != NONE}
    assert {n: v["quant_algo"] for n, v in q["quantized_layers"].items()} == expected
    assert all(v.get("group_size") == 16 for n, v in q["quantized_layers"].items() if expected[n] == "NVFP4")
    unquantized = {"lm_head", "model.embed_tokens"} | {n for n, c in report.decisions.items() if c == NONE}
    assert set(q["exclude_modules"]) == unquantized
    loaded = load_hf_checkpoint(out)
    x = _ids(8)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
    compressed = mtq.compress(copy.deepcopy(model))
    assert sum(isinstance(m, mtq.CompressedLinear) for m in compressed.modules()) == len(expected)


class Gated(nn.Module):
    """Two layers read one activation (a, b: found by tracing, not by name), then a third."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.c(F.silu(self.a(x)) * self.b(x))


@pytest.mark.parametrize("method", ["gradient", "kl_div"])
def test_traced_shared_input_group_gets_one_format(method):
    torch.manual_seed(0)
    net = Gated().eval()
    with torch.no_grad():  # a is far more sensitive than b and c
        net.a.weight[:, 0] *= 300.0
    model, report = auto_quantize(net, {"effective_bits": 7.9}, FORMATS, BATCHES, loss_func=_loss,
                                  forward_step=_step, method=method, num_calib_steps=2, num_score_steps=2)
    assert report.groups == [["a", "b"], ["c"]]
    d = report.decisions
    assert d == {"a": F8, "b": F8, "c": NV}
    assert report.effective_bits == pytest.approx((2 * 4096 * 8 + 512 * 4) / 8704)  # 7.76 <= 7.9
    rows = {r.layer: r for r in report.rows}
    if method == "kl_div":  # a group is scored as one
        assert rows["a"].scores == rows["b"].scores
    assert model.a.input_quantizer.amax is not None
    assert torch.equal(model.a.input_quantizer.amax, model.b.input_quantizer.amax)
