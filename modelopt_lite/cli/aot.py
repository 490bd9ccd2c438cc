"""`modelopt-lite aot`: compile a Triton kernel ahead of time into C launcher sources and headers."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("aot", help="compile a Triton kernel into C sources and headers (Triton AoT, checked)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("file", nargs="?", help="Python file that defines the @triton.jit kernel (or use --plugin)")
    p.add_argument("--kernel", help="the kernel's name in that file")
    p.add_argument("--plugin", help="a registered plugin whose class names its kernel (aot_kernel) and default "
                   "specialisations (aot_variants), e.g. TritonLookUp")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import this plugin package first (repeatable; modelopt_lite.plugins.examples always is)")
    p.add_argument("--variant", action="append", metavar="SIGNATURE;GRID[;WARPS[;STAGES]]",
                   help="one specialisation, e.g. '*fp32:16, *fp32:16, i32, 1024;(n + 1023) / 1024, 1, 1;4;2' "
                        "(repeat for more)")
    p.add_argument("--name", required=True, help="C name of the dispatcher (and prefix of the files)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--target", default="cuda:90:32", help="cuda:<compute capability>:32 (default: Hopper)")
    p.add_argument("--smem-limit", type=int, default=None, help="bytes of dynamic shared memory allowed "
                   "(default: the target's opt-in limit)")
    p.add_argument("--overwrite", action="store_true")


def parse_variant(text: str):
    from ..aot import AotVariant

    parts = [s.strip() for s in text.split(";")]
    if len(parts) < 2 or len(parts) > 4 or not parts[0] or not parts[1]:
        raise ValueError(f"--variant {text!r}: expected 'SIGNATURE;GRID[;WARPS[;STAGES]]'")
    try:
        extra = [int(x) for x in parts[2:]]
    except ValueError:
        raise ValueError(f"--variant {text!r}: warps and stages must be integers") from None
    return AotVariant(parts[0], parts[1], *extra)


def plugin_kernel(name: str, imports):
    """(kernel file, kernel name, default variants) declared by a registered plugin class."""
    import importlib
    import sys
    from pathlib import Path

    from ..aot import AotVariant
    from ..plugins import get_plugin

    for module in ["modelopt_lite.plugins.examples", *imports]:
        importlib.import_module(module)
    cls = get_plugin(name)
    if cls.aot_kernel is None:
        raise ValueError(f"plugin {name!r} declares no aot_kernel (file, kernel name) to compile")
    rel, kernel = cls.aot_kernel
    root = Path(sys.modules[cls.__module__.split(".")[0]].__file__).resolve().parents[1]
    path = Path(rel) if Path(rel).is_absolute() else root / rel
    return path, kernel, {suffix: [AotVariant(*v) for v in group] for suffix, group in cls.aot_variants.items()}


def run(args) -> int:
    from ..aot import compile_aot

    from pathlib import Path

    variants = [parse_variant(v) for v in args.variant or []]
    groups = {"": variants}
    if args.plugin:
        if args.file or args.kernel:
            raise ValueError("give either --plugin or FILE --kernel, not both")
        args.file, args.kernel, defaults = plugin_kernel(args.plugin, args.imports)
        if not variants:
            groups = defaults  # one dispatcher per group: OUT/<group>/NAME_<group>.{c,h}
    elif not (args.file and args.kernel):
        raise ValueError("give FILE and --kernel NAME (or --plugin NAME)")
    if not any(groups.values()):
        raise ValueError("give at least one --variant 'SIGNATURE;GRID[;WARPS[;STAGES]]'")
    for suffix, group in groups.items():
        name = f"{args.name}_{suffix}" if suffix else args.name
        out = Path(args.out) / suffix if suffix else Path(args.out)
        try:
            result = compile_aot(args.file, args.kernel, group, out, name, target=args.target,
                                 smem_limit=args.smem_limit, overwrite=args.overwrite)
        except RuntimeError as e:  # Triton's tools failed in a way the checks above did not foresee
            raise ValueError(str(e)) from None
        for fn, nbytes in result.shared_bytes.items():
            print(f"{fn}: {nbytes} bytes of dynamic shared memory")
        print(f"wrote {len(result.sources)} sources and {len(result.headers)} headers to {result.out_dir}; "
              f"dispatcher {result.name}() in {result.dispatcher_header.name}")
    return 0
