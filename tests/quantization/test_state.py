"""Quantization state: save/restore without pickle, exact round trips, mismatches, atomic writes."""

import copy
import json
import pickle
import struct

import pytest
import torch
from torch import nn

import modelopt_lite.quantization as mtq
from modelopt_lite.quantization import QuantModule
from modelopt_lite.quantization.state import (
    JSON_FILE,
    STATE_FORMAT,
    STATE_VERSION,
    TENSORS_FILE,
    QuantStateError,
    QuantStateMismatch,
    apply_quant_state,
    atomic_directory,
    quant_state_dict,
    restore,
    save,
)

safetensors_torch = pytest.importorskip("safetensors.torch")

PRESETS = ["fp8", "int8", "nvfp4", "int4_wo", "fp8_pc_pt", "mxfp8"]
MODEL_ATTRS = ("_modelopt_lite_quant_config", "_modelopt_lite_shared_inputs", "_modelopt_lite_residual_writers")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def mlp(seed=0, hidden=32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 8))


def cnn(seed=0, kernel2=3):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, kernel2), nn.Flatten(), nn.Linear(288, 10)
    )


# name: (factory, input shape, first layer, layer that gets the hand-made changes)
SMALL = {"mlp": (mlp, (4, 16), "0", "2"), "cnn": (cnn, (2, 3, 8, 8), "0", "4")}


def loop_over(batches):
    def loop(model):
        for b in batches:
            model(b)

    return loop


def customize(model, first, layer):
    """Changes after quantize that the state must carry: a pre_quant_scale, an output quantizer, a dynamic input."""
    module = model.get_submodule(layer)
    # a float16 pre_quant_scale set by hand (kept in its dtype)
    module.input_quantizer.pre_quant_scale = torch.linspace(0.5, 1.5, module.in_features, dtype=torch.float16)
    # a static int8 output quantizer with a hand-set amax
    assert mtq.set_quantizer_attribute(model, f"{layer}.output_quantizer", {"num_bits": 8, "axis": None}) == 1
    module.output_quantizer.amax = torch.tensor(0.75)
    # the first layer's input quantizer switched to dynamic (which drops its amax)
    assert mtq.set_quantizer_attribute(model, f"{first}.input_quantizer", {"type": "dynamic"}) == 1


def assert_same_state(a, b):
    """Same converted layers, quantizers (repr, attributes, amax, pre_quant_scale) and model attributes."""
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    qa, qb = dict(mtq.named_quantizers(a)), dict(mtq.named_quantizers(b))
    assert list(qa) == list(qb)
    for name, x in qa.items():
        y = qb[name]
        assert repr(x) == repr(y), name
        assert x._attrs == y._attrs, name
        assert y.name == name
        for attr in ("_amax", "_pre_quant_scale"):
            tx, ty = getattr(x, attr), getattr(y, attr)
            assert (tx is None) == (ty is None), f"{name}.{attr}"
            if tx is not None:
                assert tx.dtype == ty.dtype and torch.equal(tx, ty), f"{name}.{attr}"
        assert not y._calibrating and y._quantizing
    for attr in MODEL_ATTRS:
        assert getattr(a, attr, None) == getattr(b, attr, None), attr


def snapshot(model):
    """Everything a restore may change, to check that a failed one changed nothing."""
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, dict(q._attrs), q._amax, q._pre_quant_scale) for n, q in mtq.named_quantizers(model)],
        {k: copy.deepcopy(v) for k, v in vars(model).items() if k.startswith("_modelopt_lite")},
    )


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0]
    assert list(after[1]) == list(before[1])
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert len(after[2]) == len(before[2])
    for (n, attrs, amax, pqs), (n0, attrs0, amax0, pqs0) in zip(after[2], before[2]):
        assert (n, attrs) == (n0, attrs0)
        assert amax is amax0 and pqs is pqs0  # the very same tensors: nothing was reassigned
    assert after[3] == before[3]


def quantized_small(kind, preset):
    """A small model quantized with `preset` and customized; share_input_amax (a trace) is left to its own test."""
    factory, shape, first, layer = SMALL[kind]
    model = factory()
    batches = [randn(*shape, seed=i) for i in range(3)]
    mtq.quantize(model, preset, forward_loop=loop_over(batches), share_input_amax=False)
    customize(model, first, layer)
    return model, randn(*shape, seed=99)


def assert_refused(model, meta, tensors, pattern):
    """The state is refused with a QuantStateMismatch matching `pattern`, and `model` is left as it was."""
    before = snapshot(model)
    with pytest.raises(QuantStateMismatch, match=pattern):
        apply_quant_state(model, meta, tensors)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- exact round trips

@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", sorted(SMALL))
def test_round_trip_small_models_is_bit_identical(kind, preset, tmp_path):
    model, x = quantized_small(kind, preset)
    with torch.no_grad():
        ref = model(x)
    save(model, tmp_path / "q")

    fresh = SMALL[kind][0]()  # a float model built with the same seed
    assert not any(isinstance(m, QuantModule) for m in fresh.modules())
    assert restore(fresh, tmp_path / "q") is fresh
    with torch.no_grad():
        out = fresh(x)
    # the restored model computes exactly what the quantized one did
    assert torch.equal(out, ref)
    assert_same_state(model, fresh)
    # the hand-made changes came back as they were
    layer = SMALL[kind][3]
    pqs = fresh.get_submodule(layer).input_quantizer.pre_quant_scale
    assert pqs.dtype == torch.float16 and pqs[0].item() == 0.5 and pqs[-1].item() == 1.5
    assert fresh.get_submodule(layer).output_quantizer.amax.item() == 0.75
    assert fresh.get_submodule(SMALL[kind][2]).input_quantizer.is_dynamic


def _hf_loop(model):
    for i in range(2):
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(i))
        model(input_ids=ids, use_cache=False)


HF_CASES = [("llama", p) for p in PRESETS] + [("gpt2", "int8")]  # gpt2: Conv1D stores its weight [in, out]


@pytest.mark.parametrize("family,preset", HF_CASES, ids=[f"{f}-{p}" for f, p in HF_CASES])
def test_round_trip_tiny_hf_model_is_bit_identical(family, preset, tmp_path):
    pytest.importorskip("transformers")
    from modelopt_lite.models.tiny import build_tiny_model

    model = build_tiny_model(family, seed=0)
    # share_input_amax traces the model (slow here); the groups it records are set by hand instead
    mtq.quantize(model, preset, forward_loop=_hf_loop, share_input_amax=False)
    if family == "llama":
        first, layer = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
        model._modelopt_lite_shared_inputs = [["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]]
        model._modelopt_lite_residual_writers = ["model.layers.0.self_attn.o_proj"]
        customize(model, first, layer)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    save(model, tmp_path / "q")

    fresh = build_tiny_model(family, seed=0)
    restore(fresh, tmp_path / "q")
    with torch.no_grad():
        out = fresh(input_ids=ids, use_cache=False).logits
    assert torch.equal(out, ref)
    assert_same_state(model, fresh)


class Fanout(nn.Module):
    """Two layers read x (one shared input amax); a third reads x * 2."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x * 2)


def test_shared_input_groups_round_trip(tmp_path):
    model = mtq.quantize(Fanout(), "int8", loop_over([randn(8, 4, seed=i) for i in range(2)]))
    assert model._modelopt_lite_shared_inputs == [["a", "b"]]
    save(model, tmp_path / "q")
    fresh = restore(Fanout(), tmp_path / "q")
    assert fresh._modelopt_lite_shared_inputs == [["a", "b"]]
    assert fresh._modelopt_lite_residual_writers == model._modelopt_lite_residual_writers
    assert torch.equal(fresh.a.input_quantizer.amax, fresh.b.input_quantizer.amax)
    x = randn(5, 4, seed=7)
    assert torch.equal(fresh(x), model(x))
    assert_same_state(model, fresh)


def test_restore_into_a_quantized_model_replaces_its_state_and_is_idempotent(tmp_path):
    model, x = quantized_small("mlp", "nvfp4")
    save(model, tmp_path / "q")
    # the target was quantized differently (int8, with a pre_quant_scale the state does not have)
    other = mtq.quantize(mlp(), "int8", loop_over([randn(4, 16, seed=5)]), share_input_amax=False)
    other[0].input_quantizer.pre_quant_scale = torch.full((16,), 2.0)
    other._modelopt_lite_residual_writers = ["0"]
    layers = [other[0], other[2]]
    for _ in range(2):  # restoring the same state again changes nothing
        restore(other, tmp_path / "q")
        assert [other[0], other[2]] == layers  # converted in place, not replaced
        assert_same_state(model, other)
        assert torch.equal(other(x), model(x))
    assert other[0].input_quantizer.pre_quant_scale is None
    assert not hasattr(other, "_modelopt_lite_residual_writers")


def test_quant_state_dict_contents():
    model, _ = quantized_small("mlp", "int8")
    meta, tensors = quant_state_dict(model)
    assert json.loads(json.dumps(meta)) == meta  # plain JSON
    assert (meta["format"], meta["version"], meta["weight_amax"]) == (STATE_FORMAT, STATE_VERSION, True)
    assert meta["modules"] == {
        "0": {"class": "torch.nn.modules.linear.Linear", "weight_shape": [32, 16]},
        "2": {"class": "torch.nn.modules.linear.Linear", "weight_shape": [8, 32]},
    }
    assert meta["unquantized_layers"] == []
    assert list(meta["quantizers"]) == [
        "0.input_quantizer", "0.output_quantizer", "0.weight_quantizer",
        "2.input_quantizer", "2.output_quantizer", "2.weight_quantizer",
    ]
    assert meta["quantizers"]["0.weight_quantizer"] == {
        "attributes": {"enable": True, "num_bits": 8, "axis": 0, "block_sizes": None, "unsigned": False,
                       "narrow_range": False, "type": "static", "calibrator": "max"},
        "tensors": {"_amax": {"shape": [32, 1], "dtype": "float32"}},
    }
    assert meta["quantizers"]["2.input_quantizer"]["tensors"] == {
        "_amax": {"shape": [], "dtype": "float32"}, "_pre_quant_scale": {"shape": [32], "dtype": "float16"}}
    assert sorted(tensors) == [
        "0.weight_quantizer._amax", "2.input_quantizer._amax",
        "2.input_quantizer._pre_quant_scale", "2.output_quantizer._amax", "2.weight_quantizer._amax",
    ]
    assert torch.equal(tensors["0.weight_quantizer._amax"], model[0].weight_quantizer.amax)
    # copies: changing them does not touch the model
    assert tensors["0.weight_quantizer._amax"].data_ptr() != model[0].weight_quantizer.amax.data_ptr()
    # block_sizes axes are stored as strings and come back as ints
    nv, _ = quant_state_dict(mtq.quantize(mlp(), "nvfp4", loop_over([randn(4, 16)]), share_input_amax=False))
    assert nv["quantizers"]["0.weight_quantizer"]["attributes"]["block_sizes"] == {
        "-1": 16, "type": "dynamic", "scale_bits": "e4m3"}


def test_weight_amax_can_be_left_out(tmp_path):
    model, x = quantized_small("mlp", "int8")
    meta, tensors = quant_state_dict(model, include_weight_amax=False)
    assert meta["weight_amax"] is False
    assert not [k for k in tensors if "weight_quantizer" in k]
    assert "_amax" not in meta["quantizers"]["0.weight_quantizer"]["tensors"]
    save(model, tmp_path / "q", include_weight_amax=False)
    fresh = restore(mlp(), tmp_path / "q")
    assert fresh[0].weight_quantizer.amax is None and fresh[2].input_quantizer.amax is not None
    # the weight quantizer takes its amax from the weight, which is what max calibration stored
    with pytest.warns(UserWarning, match="is not calibrated"):
        assert torch.equal(fresh(x), model(x))


def test_partly_quantized_model_restores_strictly():
    torch.manual_seed(0)
    model = mlp()
    mtq.quantize(model[0], "int8", loop_over([randn(4, 16)]), share_input_amax=False)  # only the first layer
    meta, tensors = quant_state_dict(model)
    assert list(meta["modules"]) == ["0"] and meta["unquantized_layers"] == ["2"]
    fresh = apply_quant_state(mlp(), meta, tensors)
    assert isinstance(fresh[0], QuantModule) and type(fresh[2]) is nn.Linear
    x = randn(3, 16, seed=1)
    assert torch.equal(fresh(x), model(x))


# --------------------------------------------------------------------------- mismatches

def _state(model):
    return quant_state_dict(model)


def test_layer_of_another_size_is_named_with_both_shapes():
    model, _ = quantized_small("cnn", "int8")
    meta, tensors = _state(model)
    fresh = cnn(kernel2=5)  # conv "2" has a 5x5 kernel
    before = snapshot(fresh)
    with pytest.raises(QuantStateMismatch) as e:
        apply_quant_state(fresh, meta, tensors)
    assert e.value.layer == "2"
    assert str(e.value) == ("quantization state does not match the model at '2': "
                            "weight shape [8, 8, 3, 3] in the saved state vs [8, 8, 5, 5] in the model")
    assert isinstance(e.value, ValueError)
    assert_unchanged(fresh, before)


def test_first_mismatching_layer_in_module_order_is_named():
    meta, tensors = _state(quantized_small("mlp", "fp8")[0])
    fresh = mlp(hidden=24)  # both layers differ; "0" comes first
    with pytest.raises(QuantStateMismatch, match=r"at '0': weight shape \[32, 16\] in the saved state vs "
                                                 r"\[24, 16\] in the model \(and 1 more mismatch\)$"):
        apply_quant_state(fresh, meta, tensors)


def test_hf_model_with_one_layer_of_another_size():
    pytest.importorskip("transformers")
    from modelopt_lite.models.tiny import build_tiny_model

    model = mtq.quantize(build_tiny_model("llama"), "fp8", _hf_loop, share_input_amax=False)
    meta, tensors = _state(model)
    fresh = build_tiny_model("llama")
    fresh.model.layers[1].self_attn.o_proj = nn.Linear(64, 32, bias=False)
    assert_refused(fresh, meta, tensors, r"at 'model\.layers\.1\.self_attn\.o_proj': weight shape "
                                                 r"\[64, 64\] in the saved state vs \[32, 64\] in the model$")


def test_missing_layer():
    meta, tensors = _state(quantized_small("mlp", "int8")[0])
    fresh = mlp()[:2]  # no layer "2"
    assert_refused(fresh, meta, tensors, "at '2': the layer is missing from the model$")


def test_layer_of_another_class():
    meta, tensors = _state(quantized_small("mlp", "int8")[0])
    fresh = mlp()
    fresh[2] = nn.Conv1d(32, 8, 1)
    assert_refused(fresh, meta, tensors, r"at '2': class torch\.nn\.modules\.linear\.Linear in the saved "
                                                 r"state vs torch\.nn\.modules\.conv\.Conv1d in the model$")


def test_extra_layer_fails_strict_and_is_left_alone_otherwise():
    model, x = quantized_small("mlp", "int8")
    meta, tensors = _state(model)
    fresh = nn.Sequential(*mlp(), nn.Linear(8, 8))
    assert_refused(fresh, meta, tensors, "at '3': the model has this Linear layer but the saved state does not")
    apply_quant_state(fresh, meta, tensors, strict=False)
    assert type(fresh[3]) is nn.Linear
    assert torch.equal(fresh[:3](x), model(x))


def test_unknown_quantizer():
    meta, tensors = _state(quantized_small("mlp", "int8")[0])
    meta["quantizers"]["2.bias_quantizer"] = {"attributes": {"num_bits": 8}, "tensors": {}}
    fresh = mlp()
    assert_refused(fresh, meta, tensors, "at '2': unknown quantizer '2.bias_quantizer'")


def test_model_quantizer_without_saved_state_fails_strict():
    meta, tensors = _state(quantized_small("mlp", "int8")[0])
    del meta["quantizers"]["0.output_quantizer"]
    with pytest.raises(QuantStateMismatch, match="at '0': quantizer '0.output_quantizer' of the model has no saved state"):
        apply_quant_state(mlp(), meta, tensors)


def test_amax_that_does_not_fit_the_weight():
    meta, tensors = _state(quantized_small("mlp", "int8")[0])
    tensors["0.weight_quantizer._amax"] = torch.ones(5)
    meta["quantizers"]["0.weight_quantizer"]["tensors"]["_amax"]["shape"] = [5]
    target = mtq.quantize(mlp(), "fp8", loop_over([randn(4, 16)]), share_input_amax=False)  # must stay as it is
    assert_refused(target, meta, tensors, r"at '0': amax shape \[5\] of '0.weight_quantizer' in the saved "
                                                 r"state vs \[32, 1\] for the model's weight")


def test_inconsistent_state_is_refused():
    meta, tensors = _state(quantized_small("mlp", "int8")[0])
    bad = dict(tensors, **{"0.weight_quantizer._amax": torch.ones(32)})
    with pytest.raises(QuantStateError, match=r"'0.weight_quantizer._amax' is float32 \[32\] in the tensor file "
                                              r"but float32 \[32, 1\] in the description"):
        apply_quant_state(mlp(), meta, bad)
    with pytest.raises(QuantStateError, match="tensors the description does not name"):
        apply_quant_state(mlp(), meta, dict(tensors, stray=torch.ones(1)))
    negative = dict(tensors, **{"2.input_quantizer._amax": torch.tensor(-1.0)})
    with pytest.raises(QuantStateError, match="negative or non-finite"):
        apply_quant_state(mlp(), meta, negative)
    broken = copy.deepcopy(meta)
    broken["quantizers"]["0.input_quantizer"]["attributes"]["num_bits"] = "e9m9"
    with pytest.raises(QuantStateError, match="'0.input_quantizer' has invalid attributes"):
        apply_quant_state(mlp(), broken, tensors)


# --------------------------------------------------------------------------- files

def test_saved_files_hold_no_pickle(tmp_path, monkeypatch):
    model, x = quantized_small("mlp", "fp8")

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used")

    for mod, name in [(torch, "save"), (torch, "load"), (pickle, "dump"), (pickle, "dumps"), (pickle, "load"),
                      (pickle, "loads"), (pickle, "Pickler"), (pickle, "Unpickler")]:
        monkeypatch.setattr(mod, name, forbidden)
    out = save(model, tmp_path / "q")
    assert sorted(p.name for p in out.iterdir()) == [JSON_FILE, TENSORS_FILE]
    meta = json.loads((out / JSON_FILE).read_text())
    assert meta["format"] == STATE_FORMAT and meta["version"] == STATE_VERSION
    # a safetensors file: 8-byte header length, a JSON header, raw tensor bytes
    raw = (out / TENSORS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    loaded = safetensors_torch.load_file(out / TENSORS_FILE)
    assert set(loaded) == set(header) - {"__metadata__"} == {
        "0.weight_quantizer._amax", "2.input_quantizer._amax",
        "2.input_quantizer._pre_quant_scale", "2.output_quantizer._amax", "2.weight_quantizer._amax"}
    fresh = restore(mlp(), out)
    assert torch.equal(fresh(x), model(x))


def test_save_refuses_a_non_empty_directory_and_overwrites_on_request(tmp_path):
    int8, x = quantized_small("mlp", "int8")
    fp8, _ = quantized_small("mlp", "fp8")
    target = tmp_path / "q"
    target.mkdir()
    save(int8, target)  # an empty directory is fine
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        save(fp8, target)
    assert torch.equal(restore(mlp(), target)(x), int8(x))  # still the first state
    (target / "notes.txt").write_text("old")
    save(fp8, target, overwrite=True)
    # the directory was replaced whole; nothing is left beside it
    assert sorted(p.name for p in target.iterdir()) == [JSON_FILE, TENSORS_FILE]
    assert [p.name for p in tmp_path.iterdir()] == ["q"]
    assert torch.equal(restore(mlp(), target)(x), fp8(x))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is not a directory"):
        save(fp8, tmp_path / "file", overwrite=True)
    # parent directories are created
    save(fp8, tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b" / JSON_FILE).is_file()


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    model, _ = quantized_small("mlp", "int8")
    target = tmp_path / "q"
    if existing:
        save(model, target)
        old = {p.name: p.read_bytes() for p in target.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_torch, "save_file", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save(quantized_small("mlp", "fp8")[0], target, overwrite=True)
    if existing:  # the old state is untouched
        assert {p.name: p.read_bytes() for p in target.iterdir()} == old
        assert [p.name for p in tmp_path.iterdir()] == ["q"]
    else:  # neither the target nor a temporary directory
        assert list(tmp_path.iterdir()) == []


def test_atomic_directory_directly(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
            (tmp / "part").write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f").write_text("done")
        assert not target.exists()  # nothing visible until the block ends
    assert (target / "sub" / "f").read_text() == "done"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_restore_errors(tmp_path):
    model, _ = quantized_small("mlp", "int8")
    with pytest.raises(FileNotFoundError, match="quant_state.json is missing"):
        restore(mlp(), tmp_path / "nowhere")
    out = save(model, tmp_path / "q")
    meta = json.loads((out / JSON_FILE).read_text())

    def write(m):
        (out / JSON_FILE).write_text(json.dumps(m))

    write(dict(meta, format="something.else"))
    with pytest.raises(QuantStateError, match="not a modelopt_lite quantization state"):
        restore(mlp(), out)
    write(dict(meta, version=99))
    with pytest.raises(QuantStateError, match="unsupported quantization state version 99; this modelopt_lite reads version 1"):
        restore(mlp(), out)
    (out / JSON_FILE).write_text("{not json")
    with pytest.raises(QuantStateError, match="is not valid JSON"):
        restore(mlp(), out)
    (out / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="quant_state.safetensors is missing"):
        restore(mlp(), out)


def test_exported_from_mtq(tmp_path):
    assert (mtq.save, mtq.restore, mtq.quant_state_dict, mtq.apply_quant_state) == (
        save, restore, quant_state_dict, apply_quant_state)
    model, x = quantized_small("mlp", "int4_wo")
    mtq.save(model, tmp_path / "q")
    assert torch.equal(mtq.restore(mlp(), tmp_path / "q")(x), model(x))
