"""Transform registry, YAML pipeline config, summary log, graph dumps and the built-in transforms."""

import logging

import pytest
import torch
from torch import fx, nn

from modelopt_lite.quantization.tensor_quantizer import TensorQuantizer
from modelopt_lite.transforms import (TRANSFORMS, Pattern, find_matches, Transform, TransformConfig, TransformConfigError, load_pipeline,
                                      optimize, register_transform, unregister_transform)

DEFAULT_KEYS = ["fold_fake_quant_disabled", "remove_identity", "horizontal_linear", "quantized_linear", "norm_quant",
                "swiglu_quant", "eliminate_dead_code"]
BUILTINS = {"defaults": False, "transforms": [{"key": "fold_fake_quant_disabled"}, {"key": "remove_identity"},
                                              {"key": "eliminate_dead_code"}]}


@pytest.fixture
def temp_transform():
    keys = []

    def make(key, reason=None):
        @register_transform(key)
        class Counting(Transform):
            class Config(TransformConfig):
                factor: int = 1

            def applicable(self, gm, ctx):
                return reason

            def apply(self, gm, ctx):
                return 2 * self.config.factor

        keys.append(key)
        return Counting

    yield make
    for k in keys:
        unregister_transform(k)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.idn = nn.Identity()
        self.drop = nn.Dropout(0.25)
        self.q_off = TensorQuantizer({"num_bits": 8, "enable": False})
        self.q_smooth = TensorQuantizer({"num_bits": 8, "enable": False})
        self.q_smooth.pre_quant_scale = torch.full((6,), 0.5)
        self.q_on = TensorQuantizer({"num_bits": 8, "type": "dynamic"})

    def forward(self, x):
        y = self.drop(self.idn(self.lin(x)))
        z = y.clone().detach()
        unused = torch.sin(x) * 3  # noqa: F841  (dead code)
        return torch.relu(self.q_off(z)) + self.q_smooth(y) + self.q_on(z)


def _summaries(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "modelopt_lite.transforms" and "[SUMMARY]" in r.getMessage()]


def test_register_and_duplicate(temp_transform):
    cls = temp_transform("t_dup")
    assert TRANSFORMS["t_dup"] is cls and cls.key == "t_dup"
    with pytest.raises(TransformConfigError, match="'t_dup' is already registered"):
        temp_transform("t_dup")
    with pytest.raises(TypeError, match="subclass of Transform"):
        register_transform("t_bad")(object)


def test_default_pipeline_order():
    assert [k for k, _ in load_pipeline()] == DEFAULT_KEYS


def test_yaml_override_enabled_and_options(tmp_path, temp_transform):
    temp_transform("t_opt")
    cfg = tmp_path / "p.yaml"
    cfg.write_text("transforms:\n  - key: remove_identity\n    enabled: false\n    remove_dropout: false\n"
                   "  - key: t_opt\n    factor: 5\n")
    pipe = dict(load_pipeline(cfg))
    assert list(pipe) == DEFAULT_KEYS + ["t_opt"]
    assert pipe["remove_identity"].config.enabled is False and pipe["remove_identity"].config.remove_dropout is False
    assert pipe["remove_identity"].config.remove_copies is True
    assert pipe["t_opt"].config.factor == 5
    assert pipe["eliminate_dead_code"].config.enabled is True
    as_list = dict(load_pipeline([{"key": "eliminate_dead_code", "enabled": False}]))
    assert as_list["eliminate_dead_code"].config.enabled is False and list(as_list) == DEFAULT_KEYS
    with pytest.raises(TransformConfigError, match="listed twice"):
        load_pipeline([{"key": "remove_identity"}, {"key": "remove_identity"}])
    with pytest.raises(TransformConfigError, match="does not exist"):
        load_pipeline(tmp_path / "missing.yaml")


def test_unknown_key_lists_known():
    with pytest.raises(TransformConfigError) as e:
        load_pipeline({"transforms": [{"key": "no_such_pass"}]})
    assert "no_such_pass" in str(e.value) and "remove_identity" in str(e.value) and "eliminate_dead_code" in str(e.value)


def test_bad_option_names_the_transform():
    with pytest.raises(TransformConfigError, match="remove_identity") as e:
        load_pipeline({"transforms": [{"key": "remove_identity", "remove_dropout": "maybe"}]})
    assert "remove_dropout" in str(e.value)
    with pytest.raises(TransformConfigError, match="(?s)eliminate_dead_code.*typo_option"):
        load_pipeline({"transforms": [{"key": "eliminate_dead_code", "typo_option": 1}]})


def test_builtins_counts_log_and_numerics(caplog):
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(3, 8)
    ref = model(x)
    with caplog.at_level(logging.INFO, logger="modelopt_lite.transforms"):
        gm = optimize(model, (x,))
    assert _summaries(caplog) == [
        "[SUMMARY] fold_fake_quant_disabled: matches=1",
        "[SUMMARY] remove_identity: matches=4",
        "[SUMMARY] horizontal_linear: skipped (no 2+ fusable linear layers read the same input)",
        "[SUMMARY] quantized_linear: skipped (no QuantLinear or CompressedLinear call_module nodes of the configured "
        "kinds in the graph)",
        "[SUMMARY] norm_quant: skipped (no modelopt_lite.fake_quant or rsqrt/rms_norm/layer_norm nodes in the graph)",
        "[SUMMARY] swiglu_quant: skipped (no modelopt_lite.fake_quant or silu nodes in the graph)",
        "[SUMMARY] eliminate_dead_code: matches=2"]
    assert [(r.key, r.status, r.matches) for r in gm.meta["transform_report"]] == [
        ("fold_fake_quant_disabled", "applied", 1), ("remove_identity", "applied", 4)] + [
        (k, "skipped", 0) for k in DEFAULT_KEYS[2:6]] + [("eliminate_dead_code", "applied", 2)]
    called = sorted(n.target for n in gm.graph.nodes if n.op == "call_module")
    assert called == ["lin", "q_on", "q_smooth"]
    assert not hasattr(gm, "q_off") and not hasattr(gm, "idn")
    assert not any(n.op in ("call_function", "call_method") and "sin" in str(n.target) for n in gm.graph.nodes)
    assert torch.equal(gm(x), ref)
    assert all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op == "call_module")


def test_copies_kept_when_graph_writes_in_place():
    class InPlace(nn.Module):
        def forward(self, x):
            y = x.clone()
            y.add_(1)
            return y + x.detach()

    x = torch.randn(4)
    gm = optimize(InPlace(), (x,))
    assert [r.matches for r in gm.meta["transform_report"][1:]] == [0] * 6
    assert [n.target for n in gm.graph.nodes if n.op == "call_method"] == ["clone", "add_", "detach"]
    assert torch.equal(gm(x), 2 * x + 1)


def test_disabled_and_skipped_lines(caplog, temp_transform):
    temp_transform("t_skip", reason="needs fp16 weights")
    model = nn.Sequential(nn.Linear(4, 4), nn.Identity()).eval()
    cfg = {"transforms": [{"key": "remove_identity", "enabled": False}, {"key": "t_skip"}]}
    with caplog.at_level(logging.INFO, logger="modelopt_lite.transforms"):
        gm = optimize(model, (torch.randn(2, 4),), config=cfg)
    assert _summaries(caplog) == ["[SUMMARY] fold_fake_quant_disabled: skipped (no quantizer modules in the graph)",
                                  "[SUMMARY] remove_identity: disabled"] + [
        f"[SUMMARY] {k}: skipped ({r})" for k, r in zip(DEFAULT_KEYS[2:6], (
            "no 2+ fusable linear layers read the same input",
            "no QuantLinear or CompressedLinear call_module nodes of the configured kinds in the graph",
            "no modelopt_lite.fake_quant or rsqrt/rms_norm/layer_norm nodes in the graph",
            "no modelopt_lite.fake_quant or silu nodes in the graph"))] + [
        "[SUMMARY] eliminate_dead_code: matches=0", "[SUMMARY] t_skip: skipped (needs fp16 weights)"]
    assert [r.status for r in gm.meta["transform_report"]] == ["skipped", "disabled"] + ["skipped"] * 4 + ["applied", "skipped"]
    only = dict(load_pipeline({"defaults": False, "transforms": [{"key": "t_skip"}, {"key": "remove_identity"}]}))
    assert list(only) == ["t_skip", "remove_identity"]
    with pytest.raises(TransformConfigError, match="'defaults' must be true or false"):
        load_pipeline({"defaults": "no", "transforms": []})
    with pytest.raises(TransformConfigError, match=r"unknown top-level keys \['transform'\]"):
        load_pipeline({"transform": []})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="modelopt_lite.transforms"):
        optimize(model, (torch.randn(2, 4),), config=cfg, log=False)
    assert _summaries(caplog) == []


def test_dumps(tmp_path):
    model = nn.Sequential(nn.Linear(5, 3), nn.Identity(), nn.ReLU()).eval()
    out = tmp_path / "dumps" / "nested"
    optimize(model, (torch.randn(2, 5),), dump_dir=out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["01_remove_identity_after.txt", "01_remove_identity_before.txt",
                     "06_eliminate_dead_code_after.txt", "06_eliminate_dead_code_before.txt"]
    before = (out / "01_remove_identity_before.txt").read_text()
    after = (out / "01_remove_identity_after.txt").read_text()
    assert "call_module 1(" in before and "call_module 1(" not in after
    assert "_0 = call_module 0(input_1)  :: (2, 3) float32" in before
    assert after.splitlines() == ["input_1 = placeholder input()  :: (2, 5) float32",
                                  "_0 = call_module 0(input_1)  :: (2, 3) float32",
                                  "_2 = call_module 2(_0)  :: (2, 3) float32",
                                  "output = output output(_2)  :: (2, 3) float32"]


def test_graph_module_input_and_fx_failure_message():
    gm = fx.symbolic_trace(nn.Sequential(nn.Identity(), nn.Tanh()))
    x = torch.randn(4)
    out = optimize(gm, x)
    assert out is gm and [n.op for n in gm.graph.nodes] == ["placeholder", "call_module", "output"]
    assert torch.equal(gm(x), torch.tanh(x))

    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.shape[0] > 2 else x.clone()

    with pytest.raises(Exception, match="pass example_inputs"):
        optimize(Branchy())
    g2 = optimize(Branchy(), (torch.ones(3),))
    assert g2.meta["transform_capture"] == "export"
    assert g2.meta["transform_report"][1].matches == 0 and torch.equal(g2(torch.ones(3)), torch.full((3,), 2.0))


def test_quantized_tiny_llama_export_path(caplog):
    pytest.importorskip("transformers")
    import modelopt_lite.quantization as mtq
    from modelopt_lite.models.tiny import build_tiny_model

    model = build_tiny_model("llama")
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mtq.quantize(model, "fp8", lambda m: m(ids))

    from modelopt_lite.models import CausalLMLogits

    wrapped = CausalLMLogits(model).eval()
    ref = wrapped(ids)
    with caplog.at_level(logging.INFO, logger="modelopt_lite.transforms"):
        gm = optimize(wrapped, (ids,), config={"transforms": [{"key": "norm_quant", "enabled": False},
                                                             {"key": "swiglu_quant", "enabled": False}]})
    assert gm.meta["transform_capture"] == "export"
    lines = _summaries(caplog)
    assert lines[0] == "[SUMMARY] fold_fake_quant_disabled: skipped (no quantizer modules in the graph)"
    assert lines[1].startswith("[SUMMARY] remove_identity: matches=")
    # the layers are opaque during the export, then lowered: 7 per layer and lm_head (quantizers off: F.linear)
    assert lines[3] == "[SUMMARY] quantized_linear: matches=15" and lines[-1].startswith("[SUMMARY] eliminate_dead_code")
    fq = [n for n in gm.graph.nodes if n.target is torch.ops.modelopt_lite.fake_quant.default]
    assert len(fq) == 28  # 7 linears x 2 layers x (input, weight)
    ms = find_matches(gm, Pattern(lambda x, amax, spec: torch.ops.modelopt_lite.fake_quant(x, amax, spec)))
    assert [m.anchor for m in ms] == fq and all(m["spec"] == fq[0].args[2] for m in ms)
    assert torch.equal(gm(ids), ref)
