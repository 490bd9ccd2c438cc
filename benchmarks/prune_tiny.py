"""Measure prune() on the tiny models: parameters before -> after, time, output cosine to the unpruned model.

    PYTHONPATH=. python benchmarks/prune_tiny.py

The residual CNN is the one the tests build (tests/prune/prune_models.py).
"""

import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "prune"))

from modelopt_lite.models.tiny import build_tiny_model  # noqa: E402
from modelopt_lite.prune import prune  # noqa: E402
from prune_models import build_cnn  # noqa: E402


def _case(name):
    g = torch.Generator().manual_seed(0)
    if name == "rescnn":
        calib = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(4)]
        held = torch.randn(16, 3, 16, 16, generator=g)
        return build_cnn(), calib, lambda m: m(held)
    calib = [{"input_ids": torch.randint(0, 128, (4, 32), generator=g)} for _ in range(4)]
    held = torch.randint(0, 128, (8, 32), generator=g)
    key = "logits" if name == "llama" else "last_hidden_state"
    return build_tiny_model(name), calib, lambda m: getattr(m(input_ids=held), key)


def main():
    print("| model | importance | target | params before -> after | time (s) | output cosine |")
    print("|---|---|---|---|---|---|")
    for name in ("llama", "bert", "rescnn"):
        for imp in ("activation", "weight"):
            for pct in ("70%", "50%"):
                ref, calib, run = _case(name)
                with torch.no_grad():
                    want = run(ref)
                start = time.perf_counter()
                model, report = prune(copy.deepcopy(ref), {"params": pct}, calib, imp, return_report=True)
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    got = run(model)
                cos = torch.nn.functional.cosine_similarity(got.flatten().double(), want.flatten().double(), dim=0)
                print(f"| {name} | {imp} | {pct} | {report.params_before:,} -> {report.params_after:,} | "
                      f"{seconds:.2f} | {cos.item():.4f} |")


if __name__ == "__main__":
    main()
