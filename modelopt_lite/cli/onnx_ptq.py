"""`modelopt-lite onnx-ptq`: quantize an existing ONNX model (INT8, FP8 or weight-only INT4) with ONNX Runtime.

The calibration file is an .npz with one array per model input, named like
the input, samples along the first axis (np.savez("calib.npz",
input_ids=ids, attention_mask=mask)); it is run in batches of --batch-size
samples.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("onnx-ptq", help="post-training quantization of an ONNX model with ONNX Runtime",
                       description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1])
    p.add_argument("model", help="the float ONNX model")
    p.add_argument("--calib", metavar="NPZ", help="calibration data: .npz, one array per model input, samples on "
                   "axis 0 (needed for int8 and fp8)")
    p.add_argument("--mode", default="int8", help="int8 | fp8 | int4 (weight-only) (default int8)")
    p.add_argument("--method", default="max", help="activation calibration: max | entropy | percentile (default max)")
    p.add_argument("--percentile", type=float, default=99.99, help="for --method percentile (default 99.99)")
    p.add_argument("--output", "-o", help="output model (default: <model>.<mode>.onnx beside the model)")
    p.add_argument("--eval", metavar="NPZ", help="held-out data for the fidelity report (default: the calibration data)")
    p.add_argument("--batch-size", type=int, default=8, help="samples per ONNX Runtime run (default 8)")
    p.add_argument("--exclude-op-types", nargs="+", default=[], metavar="OP",
                   help="operator types to leave in float (MatMul, Gemm, Conv)")
    p.add_argument("--exclude-nodes", nargs="+", default=[], metavar="NAME", help="node names to leave in float")
    p.add_argument("--external-data", action="store_true",
                   help="store the weights in <output>.data beside the model (needed above 2 GB)")
    p.add_argument("--no-overwrite", action="store_true", help="refuse to replace an existing output file")


def run(args) -> int:
    from ..onnx import quantize_onnx

    report = quantize_onnx(args.model, calibration_data=args.calib, quantize_mode=args.mode,
                           calibration_method=args.method, output_path=args.output, eval_data=args.eval,
                           batch_size=args.batch_size, percentile=args.percentile,
                           op_types_to_exclude=args.exclude_op_types, nodes_to_exclude=args.exclude_nodes,
                           use_external_data=args.external_data, overwrite=not args.no_overwrite)
    print(report)
    return 0
