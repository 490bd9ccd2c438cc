"""Configs: presets end to end, exclusions, class filters, ordering, validation, YAML, helpers."""

import re
import textwrap

import pytest
import torch
from torch import nn

import modelopt_lite.quantization as mtq
from modelopt_lite.quantization import ConfigError, QuantizeConfig
from modelopt_lite.quantization.formats import E2M1, E4M3, IntFormat


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


# --------------------------------------------------------------------------- presets end to end

# Relative L2 error bound of the MLP output per format family, with margin over what the formats give
# on this seeded model (8-bit int ~0.5-1.5%, 8-bit float ~3-7%, 6-bit ~11%, 4-bit ~9-22%).
PRESET_BOUNDS = {
    "INT8_DEFAULT_CFG": 0.03, "INT8_WEIGHT_ONLY_CFG": 0.03, "MXINT8_DEFAULT_CFG": 0.03,  # 8-bit integer
    "FP8_DEFAULT_CFG": 0.1, "FP8_PER_CHANNEL_PER_TOKEN_CFG": 0.1, "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG": 0.1,
    "MXFP8_DEFAULT_CFG": 0.1,  # 8-bit float (3 mantissa bits: ~2^-4 relative step)
    "MXFP6_DEFAULT_CFG": 0.2,  # 6-bit float (2 mantissa bits)
    "NVFP4_DEFAULT_CFG": 0.35, "W4A16_NVFP4_CFG": 0.35, "W4A8_NVFP4_FP8_CFG": 0.35, "MXFP4_DEFAULT_CFG": 0.35,
    "INT4_BLOCKWISE_WEIGHT_ONLY_CFG": 0.35, "W4A8_AWQ_BETA_CFG": 0.35,  # 4-bit
    # Calibration algorithms and calibrators (measured 0.013-0.18). SmoothQuant (alpha 0.8) on this
    # outlier-free MLP moves error into the weights (0.082 against 0.013 for max); it pays off where
    # activations have outliers (MiniLM: docs/FIDELITY.md).
    "INT8_ENTROPY_CFG": 0.03, "INT8_PERCENTILE_CFG": 0.03, "INT8_SMOOTHQUANT_CFG": 0.12, "FP8_MSE_CFG": 0.1,
    "NVFP4_MSE_CFG": 0.35, "INT4_BLOCKWISE_MSE_CFG": 0.35, "INT4_AWQ_CFG": 0.35, "NVFP4_AWQ_LITE_CFG": 0.35,
    "NVFP4_AWQ_CLIP_CFG": 0.35, "NVFP4_AWQ_FULL_CFG": 0.35, "INT4_GPTQ_CFG": 0.35, "NVFP4_GPTQ_CFG": 0.35,
}
KV_PRESETS = {"FP8_KV_CFG", "NVFP4_KV_CFG"}  # KV-cache only, composed with a weight preset (test_kv_attention.py)


def test_there_are_28_presets_with_qformats():
    # one YAML file per preset under configs/quant (the _exclusions file is not a preset)
    assert len(mtq.PRESETS) == 28
    assert set(PRESET_BOUNDS) | KV_PRESETS == set(mtq.PRESETS)
    # each preset has a unique qformat short name and is exported as a module constant
    assert sorted(mtq.QFORMATS.values()) == sorted(mtq.PRESETS)
    for name in mtq.PRESETS:
        assert getattr(mtq, name) == mtq.PRESETS[name]


@pytest.mark.parametrize("name", sorted(PRESET_BOUNDS))
def test_preset_quantizes_mlp_end_to_end(name):
    model = mlp()
    x = randn(16, 64, seed=99)
    ref = model(x).detach()
    batches = [randn(8, 64, seed=i) for i in range(4)]
    preset = mtq.PRESETS[name]
    mtq.quantize(model, preset, forward_loop=mtq.create_forward_loop(batches, progress=False))
    out = model(x)
    assert torch.isfinite(out).all()
    # quantization happened (output changed) ...
    assert rel_err(out, ref) > 1e-4
    # ... and stays within the family's bound
    assert rel_err(out, ref) < PRESET_BOUNDS[name]
    # weight-only presets leave activations alone; the others quantize both linear inputs
    weight_only = preset["quant_cfg"]["*input_quantizer"] == {"enable": False}
    assert model[0].input_quantizer.is_enabled is (not weight_only)
    assert model[0].weight_quantizer.is_enabled and model[2].weight_quantizer.is_enabled
    # the preset dict is not mutated by quantize (it is deep-copied)
    assert mtq.PRESETS[name] is preset and mtq.get_config(name) == mtq.get_config(preset)


def test_preset_formats_are_what_the_names_say():
    expect = {
        "fp8": ("fp8_e4m3", "per-tensor"),
        "int8": ("int8", "per-channel(axis=0)"),
        "int4_wo": ("int4", "block(-1:128)"),
        "nvfp4": ("nvfp4", "block(-1:16)"),
        "mxfp4": ("mxfp4", "block(-1:32)"),
        "mxfp8": ("mxfp8", "block(-1:32)"),
        "mxfp6": ("mxfp6", "block(-1:32)"),
        "mxint8": ("mxint8", "block(-1:32)"),
        "fp8_2d_blockwise_wo": ("fp8_e4m3", "block(-1:128,-2:128)"),
    }
    for qformat, (fmt_name, granularity) in expect.items():
        model = mlp()
        mtq.quantize(model, qformat, forward_loop=lambda m: m(randn(4, 64)))
        wq = model[0].weight_quantizer
        # weight quantizer format and granularity as described in the preset
        assert (wq.fmt.name, wq.fmt.granularity) == (fmt_name, granularity), qformat


# --------------------------------------------------------------------------- exclusions

class MoEish(nn.Module):
    """Modules named like the ones deployments keep in high precision."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.router = nn.Linear(8, 4)
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(8, 4)  # an MoE gate: excluded
        self.mlp.gate_proj = nn.Linear(8, 8)  # a SwiGLU projection: quantized
        self.lm_head = nn.Linear(8, 16)

    def forward(self, x):
        h = self.proj(x)
        return self.lm_head(self.mlp.gate_proj(h)) + self.router(h).sum() + self.mlp.gate(h).sum()


@pytest.mark.parametrize("name", sorted(PRESET_BOUNDS))
def test_default_exclusions(name):
    model = MoEish()
    x = randn(3, 8)
    mtq.quantize(model, name, forward_loop=lambda m: m(x))
    enabled = {n for n, q in mtq.named_quantizers(model) if q.is_enabled}
    # lm_head, *router* and *mlp.gate.* stay in high precision in every preset
    for excluded in ("lm_head", "router", "mlp.gate"):
        assert not any(n.startswith(excluded + ".") for n in enabled), (excluded, enabled)
    # ordinary projections (including mlp.gate_proj, which *mlp.gate.* must not catch) are quantized
    assert "proj.weight_quantizer" in enabled and "mlp.gate_proj.weight_quantizer" in enabled


# --------------------------------------------------------------------------- class filters, order, default

class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


CLASS_FILTER_CFG = {
    "quant_cfg": {
        "*weight_quantizer": {"num_bits": 8, "axis": 0},
        "*input_quantizer": {"enable": False},
        "nn.Conv2d": {"*weight_quantizer": {"num_bits": 4, "axis": 0}},
    },
    "algorithm": "max",
}


def _check_class_filter(model):
    # the class filter changed only the Conv2d's weight quantizer to INT4 ...
    assert model.conv.weight_quantizer.fmt.element == IntFormat(4)
    # ... the Linear keeps the INT8 of the general entry
    assert model.fc.weight_quantizer.fmt.element == IntFormat(8)
    assert not model.conv.input_quantizer.is_enabled and not model.fc.input_quantizer.is_enabled


def test_class_filter_via_quantize_config_object():
    model = ConvNet()
    # a QuantizeConfig validates its entries once; the class filter applies to Conv2d only
    mtq.quantize(model, QuantizeConfig(**CLASS_FILTER_CFG), forward_loop=lambda m: m(randn(2, 3, 6, 6)))
    _check_class_filter(model)


def test_class_filter_matches_counts():
    model = ConvNet()
    mtq.replace_quant_modules(model)
    matches = mtq.set_quantizer_by_cfg(model, QuantizeConfig(**CLASS_FILTER_CFG))
    # 2 weight quantizers, 2 input quantizers, 1 weight quantizer inside a Conv2d
    assert matches == {"*weight_quantizer": 2, "*input_quantizer": 2, "nn.Conv2d": 1}


def test_class_filter_by_short_name_and_transformers_class():
    from transformers.pytorch_utils import Conv1D

    model = nn.Sequential(Conv1D(8, 8), nn.Linear(8, 8))
    mtq.replace_quant_modules(model)
    cfg = QuantizeConfig(quant_cfg={"Conv1D": {"*weight_quantizer": {"num_bits": "e4m3"}},
                                    "Linear": {"*weight_quantizer": {"num_bits": 4}}})
    # transformers classes by name; torch classes both as "Linear" and "nn.Linear"
    assert mtq.set_quantizer_by_cfg(model, cfg) == {"Conv1D": 1, "Linear": 1}
    assert model[0].weight_quantizer.fmt.element is E4M3
    assert model[1].weight_quantizer.fmt.element == IntFormat(4)


@pytest.mark.parametrize("form", ["dict", "yaml"])
def test_class_filter_via_dict_or_yaml_config(form, tmp_path):
    model = ConvNet()
    config = CLASS_FILTER_CFG
    if form == "yaml":
        config = tmp_path / "class_filter.yaml"
        config.write_text(textwrap.dedent("""\
            algorithm: max
            quant_cfg:
              "*weight_quantizer": {num_bits: 8, axis: 0}
              "*input_quantizer": {enable: false}
              nn.Conv2d:
                "*weight_quantizer": {num_bits: 4, axis: 0}
            """))
        config = str(config)
    # the documented dict / YAML form {"nn.Conv2d": {"*weight_quantizer": {...}}} works like the object form
    mtq.quantize(model, config, forward_loop=lambda m: m(randn(2, 3, 6, 6)))
    _check_class_filter(model)


def test_partial_entry_with_only_block_sizes():
    model = nn.Sequential(nn.Linear(16, 4))
    cfg = {"quant_cfg": {"*input_quantizer": {"block_sizes": {-1: 8}}}}
    mtq.quantize(model, cfg, forward_loop=lambda m: m(randn(3, 16)))
    # an entry without num_bits changes only what it names: the INT8 input quantizer gets 8-element blocks
    iq = model[0].input_quantizer
    assert iq.fmt.element == IntFormat(8) and iq.fmt.granularity == "block(-1:8)"


def test_later_entries_override_earlier_ones():
    model = mlp()
    cfg = {"quant_cfg": {
        "*": {"num_bits": 8},
        "*weight_quantizer": {"num_bits": 4, "axis": 0},
        "0.*": {"num_bits": "e4m3"},
        "2.input_quantizer": {"enable": False},
    }}
    mtq.quantize(model, cfg, forward_loop=lambda m: m(randn(4, 64)))
    # layer 0: "0.*" came last, so everything there is E4M3 per tensor (num_bits resets the format)
    assert model[0].weight_quantizer.fmt.element is E4M3 and model[0].weight_quantizer.axis is None
    assert model[0].input_quantizer.fmt.element is E4M3
    # "0.*" also re-enabled layer 0's output quantizer (an entry with num_bits enables)
    assert model[0].output_quantizer.is_enabled
    # layer 2: weight INT4 from the second entry, input turned off by the last
    assert model[2].weight_quantizer.fmt.element == IntFormat(4)
    assert not model[2].input_quantizer.is_enabled
    assert model[2].output_quantizer.fmt.element == IntFormat(8)


def test_default_applies_first_wherever_it_is_written():
    model = mlp()
    # "default" written last still applies before the others
    cfg = {"quant_cfg": {"*weight_quantizer": {"num_bits": "e4m3"}, "default": {"enable": False}}}
    mtq.replace_quant_modules(model)
    matches = mtq.set_quantizer_by_cfg(model, mtq.get_config(cfg))
    # default matched all 6 quantizers, then the weight entry 2
    assert matches == {"default": 6, "*weight_quantizer": 2}
    enabled = sorted(n for n, q in mtq.named_quantizers(model) if q.is_enabled)
    assert enabled == ["0.weight_quantizer", "2.weight_quantizer"]


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize(
    "config,expected",
    [
        ({"quant_cfg": {"*weight_quantizer": {"num_bits": [3, 3]}}},
         ["*weight_quantizer", "num_bits", "[3, 3]"]),
        ({"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "block_sizes": {-1: 0}}}},
         ["*weight_quantizer", "block_sizes", "{-1: 0}"]),
        ({"quant_cfg": {"*input_quantizer": {"num_bits": 8, "calibartor": "max"}}},
         ["*input_quantizer", "calibartor", "'max'"]),
        ({"quant_cfg": {"*weight_quantizer": {"num_bits": 4, "axis": 0, "block_sizes": {-1: 16}}}},
         ["*weight_quantizer", "axis", "block_sizes", "'axis': 0", "{-1: 16}"]),
        ({"quant_cfg": {}, "algo": "max"}, ["algo"]),
        ({"quant_cfg": {"*": {"num_bits": 9}}}, ["'*'", "num_bits", "9"]),
        ({"quant_cfg": {"*": {"num_bits": "e8m0"}}}, ["num_bits", "'e8m0'"]),
        ({"quant_cfg": {"*": {"num_bits": 4, "block_sizes": {-1: 16, "scale_bits": [5, 2]}}}},
         ["block_sizes", "scale_bits", "[5, 2]"]),
        ({"quant_cfg": {"*": 8}}, ["'*'", "8"]),
        ({"quant_cfg": {"nn.Conv2d": {"*weight_quantizer": {"num_bits": [3, 3]}}}},
         ["nn.Conv2d", "*weight_quantizer", "[3, 3]"]),
    ],
    ids=["num_bits_3_3", "block_size_0", "unknown_attr", "axis_and_blocks", "top_level_key", "num_bits_9",
         "e8m0_elements", "scale_bits", "not_a_mapping", "inside_class_filter"],
)
def test_invalid_config_raises_config_error_naming_key_and_value(config, expected):
    with pytest.raises(ConfigError) as info:
        mtq.get_config(config)
    msg = str(info.value)
    # the message names the offending key and value
    for part in expected:
        assert part in msg, (part, msg)
    # and quantize fails the same way before touching the model
    model = mlp()
    with pytest.raises(ConfigError):
        mtq.quantize(model, config)
    assert not any(True for _ in mtq.named_quantizers(model))


@pytest.mark.parametrize(
    "config,expected",
    [
        ({"quant_cfg": {}, "algorithm": "smoothquantz"}, ["algorithm", "smoothquantz"]),
        ({"quant_cfg": {}, "algorithm": {"method": "smoothquantz"}}, ["algorithm", "smoothquantz"]),
        ({"quant_cfg": {"*": {"calibrator": "histogramz"}}}, ["calibrator", "histogramz"]),
    ],
    ids=["algorithm", "algorithm_dict", "calibrator"],
)
def test_unknown_algorithm_or_calibrator_raises_config_error(config, expected):
    with pytest.raises(ConfigError) as info:
        mtq.get_config(config)
    for part in expected:
        assert part in str(info.value)


def test_unknown_algorithm_is_rejected_before_quantizing():
    # whatever the exception type, an unknown algorithm is refused up front and lists the known ones
    with pytest.raises((ConfigError, KeyError), match="smoothquantz.*registered:.*max"):
        mtq.get_config({"quant_cfg": {}, "algorithm": "smoothquantz"})


def test_axis_with_block_sizes_in_partial_entry_raises_config_error():
    with pytest.raises(ConfigError, match=r"\*weight_quantizer"):
        mtq.quantize(mlp(), {"quant_cfg": {"*weight_quantizer": {"axis": 0, "block_sizes": {-1: 16}}}})


def test_unknown_config_name_lists_presets():
    with pytest.raises(ConfigError, match="unknown quantization config 'fp9'.*FP8_DEFAULT_CFG.*nvfp4"):
        mtq.get_config("fp9")


# --------------------------------------------------------------------------- YAML, preset names, qformats

def test_user_yaml_file(tmp_path):
    path = tmp_path / "my_w4a8.yaml"
    path.write_text(textwrap.dedent("""\
        name: MY_CFG
        description: INT4 weights in blocks of 32, FP8 inputs, with the deployment exclusions.
        exclusions: deployment
        algorithm: max
        quant_cfg:
          default: {enable: false}
          "*weight_quantizer": {num_bits: 4, block_sizes: {-1: 32}}
          "*input_quantizer": {num_bits: [4, 3]}
        """))
    model = MoEish()
    x = randn(3, 8)
    mtq.quantize(model, str(path), forward_loop=lambda m: m(x))
    wq, iq = model.proj.weight_quantizer, model.proj.input_quantizer
    # YAML int keys (-1) and [E, M] lists parse like Python ones
    assert wq.fmt.element == IntFormat(4) and wq.fmt.granularity == "block(-1:32)"
    assert iq.fmt.element is E4M3
    # the input amax was calibrated from the data
    assert torch.equal(iq.amax, x.abs().amax())
    # "exclusions: deployment" appended the exclusion list after the user's entries
    assert not model.lm_head.weight_quantizer.is_enabled and not model.router.input_quantizer.is_enabled
    # the file loads to the same config as a dict
    assert mtq.load_config_file(path)["quant_cfg"]["*input_quantizer"] == {"num_bits": [4, 3]}


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('quant_cfg:\n  "*weight_quantizer": {num_bits: [3, 3]}\n')
    # the message names the file, the key and the value
    with pytest.raises(ConfigError, match=re.escape(str(bad)) + r".*\*weight_quantizer.*num_bits.*\[3, 3\]"):
        mtq.quantize(mlp(), str(bad))
    extra = tmp_path / "extra.yaml"
    extra.write_text("quant_cfg: {}\nalgoritm: max\n")
    with pytest.raises(ConfigError, match="unknown key.*algoritm"):
        mtq.get_config(str(extra))
    with pytest.raises(ConfigError, match="does not exist"):
        mtq.get_config(str(tmp_path / "missing.yaml"))
    excl = tmp_path / "excl.yaml"
    excl.write_text("exclusions: nope\nquant_cfg: {}\n")
    with pytest.raises(ConfigError, match="exclusions = 'nope'"):
        mtq.get_config(str(excl))


def test_preset_name_string_and_qformat():
    a = mtq.quantize(mlp(), "FP8_DEFAULT_CFG", forward_loop=lambda m: m(randn(4, 64)))
    # the preset name gives FP8 E4M3 per tensor for weights and inputs
    assert a[0].weight_quantizer.fmt.element is E4M3 and a[0].input_quantizer.fmt.element is E4M3
    b = mtq.quantize(mlp(), "nvfp4", forward_loop=lambda m: m(randn(4, 64)))
    # the qformat "nvfp4" gives E2M1 elements with E4M3 block scales
    assert b[0].weight_quantizer.fmt.element is E2M1 and b[0].weight_quantizer.fmt.name == "nvfp4"
    # qformats are case-insensitive and resolve to the same config as the constant
    assert mtq.get_config("NVFP4") == mtq.get_config("NVFP4_DEFAULT_CFG") == mtq.get_config(mtq.NVFP4_DEFAULT_CFG)
    # the applied config is recorded on the model
    assert b._modelopt_lite_quant_config["algorithm"] == "max"


# --------------------------------------------------------------------------- quantizer helpers

def _converted():
    model = mlp()
    mtq.replace_quant_modules(model)
    return model


def test_enable_disable_with_wildcard():
    model = _converted()
    # 2 weight quantizers match
    assert mtq.disable_quantizer(model, "*weight_quantizer") == 2
    assert [n for n, q in mtq.named_quantizers(model) if not q.is_enabled] == [
        "0.output_quantizer", "0.weight_quantizer", "2.output_quantizer", "2.weight_quantizer"]
    # "2.*" matches layer 2's three quantizers
    assert mtq.enable_quantizer(model, "2.*") == 3
    assert model[2].output_quantizer.is_enabled and model[2].weight_quantizer.is_enabled
    assert not model[0].weight_quantizer.is_enabled
    # a pattern that matches nothing counts 0
    assert mtq.enable_quantizer(model, "*lm_head*") == 0


def test_enable_disable_with_callable():
    model = _converted()
    seen = []

    def first_layer(name):
        seen.append(name)
        return name.startswith("0.")

    # the callable is asked about every quantizer name and 3 of the 6 match
    assert mtq.disable_quantizer(model, first_layer) == 3
    assert sorted(seen) == sorted(n for n, _ in mtq.named_quantizers(model))
    assert not any(q.is_enabled for n, q in mtq.named_quantizers(model) if n.startswith("0."))
    assert model[2].input_quantizer.is_enabled
    with pytest.raises(TypeError, match="wildcard string or a callable"):
        mtq.enable_quantizer(model, 3)


def test_set_quantizer_attribute():
    model = _converted()
    n = mtq.set_quantizer_attribute(model, "*weight_quantizer", {"num_bits": 4, "block_sizes": {-1: 32}})
    # two weight quantizers changed to INT4 blocks of 32
    assert n == 2
    for i in (0, 2):
        assert model[i].weight_quantizer.fmt.element == IntFormat(4)
        assert model[i].weight_quantizer.fmt.granularity == "block(-1:32)"
    # a partial update changes only what it names
    assert mtq.set_quantizer_attribute(model, lambda s: s == "2.input_quantizer", {"type": "dynamic"}) == 1
    assert model[2].input_quantizer.is_dynamic and model[2].input_quantizer.fmt.element == IntFormat(8)
    # with parent_class, only quantizers of that class of module
    assert mtq.set_quantizer_attribute(model, "*", {"enable": False}, parent_class="nn.Conv2d") == 0


def test_print_quant_summary(capsys):
    model = mlp()
    mtq.quantize(model, "FP8_DEFAULT_CFG", forward_loop=lambda m: m(randn(4, 64)))
    mtq.print_quant_summary(model)
    lines = capsys.readouterr().out.splitlines()
    # header, rule, 6 quantizer rows, count line, weight bytes
    assert len(lines) == 10
    assert lines[0].split() == ["quantizer", "format", "granularity", "amax", "enabled"]
    assert set(lines[1]) == {"-"}
    assert lines[-2] == "6 quantizers, 4 enabled, 2 disabled"
    weights = sum(m.weight.numel() * 4 for m in model if isinstance(m, nn.Linear))
    assert lines[-1] == (f"weights of quantized layers: {weights / 2**20:.2f} MiB, stored in float "
                         "(compress(model) stores them quantized)")
    row = dict(zip(["quantizer", "format", "granularity", "amax", "enabled"], lines[2].split()))
    amax = model[0].input_quantizer.amax.item()
    assert row == {"quantizer": "0.input_quantizer", "format": "fp8_e4m3", "granularity": "per-tensor",
                   "amax": f"{amax:.4g}", "enabled": "yes"}
    assert lines[3].split() == ["0.output_quantizer", "-", "-", "-", "no"]
    assert mtq.quant_summary(model) == "\n".join(lines)


# --------------------------------------------------------------------------- create_forward_loop

class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.calls = []

    def forward(self, a, b=None):
        self.calls.append((a.clone(), None if b is None else b.clone()))
        return self.lin(a)


def test_forward_loop_dict_batches():
    model = Recorder()
    batches = [{"a": torch.full((1, 2), float(i)), "b": torch.full((1, 2), -float(i))} for i in range(3)]
    mtq.create_forward_loop(batches, progress=False)(model)
    # a dict batch is called as model(**batch): three calls with a=i, b=-i
    assert len(model.calls) == 3
    for i, (a, b) in enumerate(model.calls):
        assert torch.equal(a, torch.full((1, 2), float(i))) and torch.equal(b, torch.full((1, 2), -float(i)))


def test_forward_loop_tuple_and_list_batches():
    model = Recorder()
    batches = [(torch.ones(1, 2), torch.zeros(1, 2)), [torch.zeros(1, 2), torch.ones(1, 2)]]
    mtq.create_forward_loop(batches, progress=False)(model)
    # tuples and lists are unpacked as positional arguments
    assert [(float(a.sum()), float(b.sum())) for a, b in model.calls] == [(2.0, 0.0), (0.0, 2.0)]


def test_forward_loop_tensor_batches_and_num_batches():
    model = Recorder()
    batches = [torch.full((1, 2), float(i)) for i in range(5)]
    mtq.create_forward_loop(batches, num_batches=3, progress=False)(model)
    # a tensor is passed as the single argument; num_batches=3 stops after three
    assert [float(a[0, 0]) for a, _ in model.calls] == [0.0, 1.0, 2.0]
    assert all(b is None for _, b in model.calls)


def test_forward_loop_with_dataloader_calibrates():
    data = torch.utils.data.TensorDataset(randn(20, 64))
    loader = torch.utils.data.DataLoader(data, batch_size=8)  # yields [tensor] lists
    model = mlp()
    mtq.quantize(model, "INT8_DEFAULT_CFG", forward_loop=mtq.create_forward_loop(loader, progress=False))
    # the input amax is the max over all 20 rows (3 batches)
    assert torch.equal(model[0].input_quantizer.amax, data.tensors[0].abs().amax())
