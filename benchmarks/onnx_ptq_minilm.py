"""ONNX PTQ of the real all-MiniLM-L6-v2 in ONNX Runtime: sentence-embedding fidelity, file size, CPU latency.

    PYTHONPATH=. .venv/bin/python benchmarks/onnx_ptq_minilm.py [--out table.md] [--model DIR] [--threads 2]

The float model (input_ids, attention_mask -> last_hidden_state) is exported
with torch.onnx.export(dynamo=True); every row quantizes that file with
`modelopt_lite.onnx.quantize_onnx`, calibrated on the shipped calibration
sentences, and is evaluated on the shipped held-out sentences: the cosine
of each quantized sentence embedding (the last hidden state mean-pooled over
the attention mask) to the float one (mean and lowest over the sentences),
the file size, and the ONNX Runtime CPU latency of one batch (median of
`--repeats` passes over the held-out set, default optimizations,
`--threads` intra-op threads).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelopt_lite.data import calibration_sentences, heldout_sentences  # noqa: E402
from modelopt_lite.onnx import quantize_onnx  # noqa: E402
from modelopt_lite.utils.fs import write_text_atomic  # noqa: E402

ROWS = [("int8", "max"), ("int8", "percentile"), ("int8", "entropy"), ("fp8", "max"), ("fp8", "entropy"),
        ("int4", None)]


def export_float(model_dir, path: Path) -> None:
    import torch

    from modelopt_lite.models.hf import load_hf_model

    loaded = load_hf_model(model_dir)

    class LastHidden(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    enc = loaded.tokenizer(["a short example sentence", "and another one"], padding=True, return_tensors="pt")
    dims = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHidden(loaded.model).eval(), (enc["input_ids"], enc["attention_mask"]), str(path),
                          dynamo=True, input_names=["input_ids", "attention_mask"], verbose=False,
                          output_names=["last_hidden_state"],
                          dynamic_shapes={"input_ids": dims, "attention_mask": dims})
    return loaded.tokenizer


def encode(tokenizer, sentences, max_length: int):
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def embed(sess, data, batch: int):
    """Mean-pooled sentence embeddings, and the median seconds per batch over the passes made."""
    out, times = [], []
    n = data["input_ids"].shape[0]
    for s in range(0, n, batch):
        feed = {k: v[s:s + batch] for k, v in data.items()}
        t = time.perf_counter()
        hidden = sess.run(["last_hidden_state"], feed)[0]
        times.append(time.perf_counter() - t)
        mask = feed["attention_mask"][..., None].astype(np.float64)
        out.append((hidden * mask).sum(1) / mask.sum(1))
    return np.concatenate(out), times


def cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local Hugging Face model directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--out", help="write the Markdown table here (default: print it)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", help="keep the ONNX files here (default: a temporary directory)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        float_path = work / "minilm.onnx"
        t = time.perf_counter()
        tokenizer = export_float(args.model, float_path)
        print(f"exported {float_path} in {time.perf_counter() - t:.1f} s", flush=True)
        calib = encode(tokenizer, calibration_sentences(), args.max_length)
        held = encode(tokenizer, heldout_sentences(), args.max_length)
        ref_sess = session(float_path, args.threads)
        ref, _ = embed(ref_sess, held, args.batch_size)
        float_times = []
        for _ in range(args.repeats):
            float_times += embed(ref_sess, held, args.batch_size)[1]
        float_bytes = sum(f.stat().st_size for f in work.glob("minilm.onnx*"))  # the export may keep a .data file
        rows = [("float", "-", 1.0, 1.0, float_bytes, statistics.median(float_times), 0.0)]
        for mode, method in ROWS:
            out = work / f"minilm.{mode}{'.' + method if method else ''}.onnx"
            t = time.perf_counter()
            report = quantize_onnx(float_path, calib if mode != "int4" else None, mode, method or "max", out,
                                   eval_data=held, batch_size=args.batch_size)
            took = time.perf_counter() - t
            print(report, flush=True)
            sess = session(out, args.threads)
            emb, _ = embed(sess, held, args.batch_size)
            times = []
            for _ in range(args.repeats):
                times += embed(sess, held, args.batch_size)[1]
            cos = cosines(ref, emb)
            rows.append((mode, method or "- (weight-only)", float(cos.mean()), float(cos.min()), report.output_bytes,
                         statistics.median(times), took))

    seq = held["input_ids"].shape[1]
    lines = [
        f"all-MiniLM-L6-v2, ONNX Runtime CPU ({args.threads} threads), measured {datetime.date.today().isoformat()}, "
        f"CPU, {args.threads} cores. Calibration: {calib['input_ids'].shape[0]} shipped sentences; evaluation: "
        f"{held['input_ids'].shape[0]} held-out sentences (padded to {seq} tokens), batches of {args.batch_size}. "
        "Latency: median time per batch, default ONNX Runtime optimizations; PTQ time: calibration, "
        "insertion, writing and the fidelity report.",
        "",
        "| mode | calibration | embedding cosine (mean) | (min) | file size | latency / batch | PTQ time |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, method, mean, low, size, lat, took in rows:
        lines.append(f"| {mode} | {method} | {mean:.5f} | {low:.5f} | {size / 2**20:.1f} MiB | {lat * 1e3:.1f} ms "
                     f"| {took:.1f} s |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
