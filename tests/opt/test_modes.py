"""Modes: recording, save/restore of the whole history onto a fresh model (no pickle)."""

import json

import pytest
import torch
from torch import nn

import modelopt_lite.opt as mto
import modelopt_lite.quantization as mtq
from modelopt_lite.opt import ModeError, get_modes, record_mode


def _ids(seed=0, batch=2, seq=7):
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _llama():
    pytest.importorskip("transformers")
    from modelopt_lite.models.tiny import build_tiny_model

    return build_tiny_model("llama", seed=0)


@pytest.mark.parametrize("qformat", ["fp8", "nvfp4"])
def test_quantize_and_calibrate_restore_equal(tmp_path, qformat):
    model = _llama()
    batches = [_ids(s) for s in range(2)]
    mtq.quantize(model, qformat, lambda m: [m(b) for b in batches])
    mtq.calibrate(model, "max", lambda m: m(_ids(5)))
    assert [e.mode for e in get_modes(model)] == ["quantize", "calibrate"]
    x = _ids(9)
    ref = model(x).logits
    mto.save(model, tmp_path / "ckpt")
    doc = json.loads((tmp_path / "ckpt" / "modelopt_state.json").read_text())
    assert [e["mode"] for e in doc["modes"]] == ["quantize", "calibrate"] and doc["quantized"] is True
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "model.safetensors", "modelopt_state.json", "quant_state.json", "quant_state.safetensors"]
    fresh = _llama()
    with torch.no_grad():  # other weights than the saved model's: restore must load them
        for p in fresh.parameters():
            p.add_(0.01)
    mto.restore(fresh, tmp_path / "ckpt")
    assert torch.equal(fresh(x).logits, ref)
    assert [e.mode for e in get_modes(fresh)] == ["quantize", "calibrate"]
    sd, fsd = model.state_dict(), fresh.state_dict()
    assert sd.keys() == fsd.keys() and all(torch.equal(sd[k], fsd[k]) for k in sd)


def test_weight_changing_algorithm_restored(tmp_path):
    """SmoothQuant folds scales into the norms: the weights change, and restore brings them back."""
    model = _llama()
    mtq.quantize(model, {"quant_cfg": {"*weight_quantizer": {"num_bits": 8, "axis": 0},
                                       "*input_quantizer": {"num_bits": 8, "axis": None}},
                         "algorithm": "smoothquant"}, lambda m: m(_ids(1)))
    x = _ids(3)
    ref = model(x).logits
    mto.save(model, tmp_path / "sq")
    fresh = mto.restore(_llama(), tmp_path / "sq")
    assert torch.equal(fresh(x).logits, ref)


def test_float_model_and_errors(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    mto.save(model, tmp_path / "f")
    assert not (tmp_path / "f" / "quant_state.json").exists()
    fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    mto.restore(fresh, tmp_path / "f")
    assert torch.equal(fresh[0].weight, model[0].weight)
    with pytest.raises(FileExistsError):
        mto.save(model, tmp_path / "f")
    mto.save(model, tmp_path / "f", overwrite=True)
    with pytest.raises(FileNotFoundError, match="modelopt_state.json is missing"):
        mto.restore(fresh, tmp_path)
    with pytest.raises(ModeError, match="already has modes applied"):
        q = nn.Sequential(nn.Linear(4, 3))
        mtq.quantize(q, "int8", lambda m: m(torch.randn(2, 4)))
        mto.restore(q, tmp_path / "f")
    with pytest.raises(ModeError, match="other architecture|does not match the saved tensors"):
        mto.restore(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 3)), tmp_path / "f")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "modelopt_state.json").write_text(json.dumps({"format": "modelopt_lite.modelopt_state", "version": 99,
                                                         "modes": []}))
    with pytest.raises(ModeError, match="version 99"):
        mto.restore(fresh, bad)
    with pytest.raises(ModeError, match="not registered"):
        record_mode(model, "no_such_mode", {})
    with pytest.raises(ModeError, match="is not a JSON value"):
        record_mode(model, "calibrate", {"algorithm": torch.ones(1)})
    mtq.compress(q)
    with pytest.raises(ValueError, match="save it before compressing"):
        mto.save(q, tmp_path / "c")


def test_prune_then_quantize_history_restored(tmp_path):
    """prune -> quantize -> calibrate replayed in order onto the original architecture."""
    from modelopt_lite.prune import prune

    model = _llama()
    calib = [{"input_ids": _ids(s, batch=4, seq=16)} for s in range(3)]
    prune(model, {"params": "60%"}, calib)
    mtq.quantize(model, "fp8", lambda m: [m(**b) for b in calib])
    mtq.calibrate(model, "max", lambda m: m(**calib[0]))
    assert [e.mode for e in get_modes(model)] == ["prune", "quantize", "calibrate"]
    x = _ids(9)
    ref = model(x).logits
    mto.save(model, tmp_path / "pq")
    fresh = mto.restore(_llama(), tmp_path / "pq")
    assert torch.equal(fresh(x).logits, ref)
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in model.parameters())


def test_auto_quantize_restored(tmp_path):
    model = _llama()
    batches = [_ids(s, batch=2, seq=8) for s in range(2)]
    model, report = mtq.auto_quantize(model, constraints={"effective_bits": 6.0},
                                      quantization_formats=[mtq.NVFP4_DEFAULT_CFG, mtq.FP8_DEFAULT_CFG],
                                      data_loader=batches, loss_func=lambda out, b: out.logits.float().pow(2).mean(),
                                      num_calib_steps=2, num_score_steps=2)
    assert report.effective_bits <= 6.0 and get_modes(model)[-1].mode == "auto_quantize"
    x = _ids(4)
    ref = model(x).logits
    mto.save(model, tmp_path / "aq")
    fresh = mto.restore(_llama(), tmp_path / "aq")
    assert torch.equal(fresh(x).logits, ref)
    assert get_modes(fresh)[-1].state == get_modes(model)[-1].state
