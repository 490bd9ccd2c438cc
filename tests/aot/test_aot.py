"""Ahead-of-time kernels: generation without a GPU, the launcher fixes, the shared-memory check, nvcc, the CLI."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("triton")

from modelopt_lite.aot import AotVariant, compile_aot, shared_memory_limit  # noqa: E402
from modelopt_lite.aot.compile import fix_dispatcher_source  # noqa: E402
from modelopt_lite.cli import main  # noqa: E402

HERE = Path(__file__).parent
KERNELS = HERE / "add_kernel.py"
ALIGNED = AotVariant("*fp32:16, *fp32:16, *fp32:16, i32:16, 1024", "(n + 1023) / 1024, 1, 1", 4, 2)
ANY_N = AotVariant("*fp32:16, *fp32:16, *fp32:16, i32, 1024", "(n + 1023) / 1024, 1, 1", 4, 2)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "add"
    return compile_aot(KERNELS, "add_kernel", [ALIGNED, ANY_N], out, "add_f32")


def test_sources_headers_and_manifest(generated):
    names = sorted(p.name for p in generated.out_dir.iterdir())
    assert "add_f32.c" in names and "add_f32.h" in names and "manifest.json" in names
    assert len([n for n in names if n.endswith(".c")]) == 3 and len([n for n in names if n.endswith(".h")]) == 3
    manifest = json.loads((generated.out_dir / "manifest.json").read_text())
    assert manifest["target"] == "cuda:90:32" and manifest["smem_limit"] == 232448
    assert [v["signature"] for v in manifest["variants"]] == [ALIGNED.signature, ANY_N.signature]
    assert set(manifest["shared_bytes"].values()) == {0}
    header = generated.dispatcher_header.read_text()
    assert re.search(r"TT_ResultTy add_f32\(TT_StreamTy stream, CUdeviceptr x_ptr, CUdeviceptr y_ptr, "
                     r"CUdeviceptr out_ptr, int32_t n, int algo_id\);", header)


def test_kernel_sources_unload_safely_and_return_on_empty_grid(generated):
    for src in generated.sources[:-1]:
        text = src.read_text()
        fn = re.search(r"void unload_(\w+)\(void\) \{(.*?)\n\}", text, re.S)
        assert fn and f"if ({fn.group(1)}_mod != NULL)" in fn.group(2) and f"{fn.group(1)}_mod = NULL;" in fn.group(2)
        launch = text[text.index("if(gX * gY * gZ > 0)"):]
        assert re.match(r"if\(gX \* gY \* gZ > 0\)\s*\n\s*return cuLaunchKernel\([^;]*\);\s*\n\s*return CUDA_SUCCESS;",
                        launch)


def test_dispatcher_returns_an_error_when_nothing_matches(generated):
    text = generated.dispatcher_source.read_text()
    body = re.search(r"TT_ResultTy add_f32_1024_warps4xstages2\([^)]*\)\{(.*?)\n\}", text, re.S).group(1)
    lines = [ln.strip() for ln in body.strip().splitlines()]
    assert lines[-1] == "return TT_ERROR_INVALID_VALUE;"
    assert sum(ln.startswith("if (") for ln in lines) == 2


def test_fix_dispatcher_adds_the_missing_branch():
    old = ("\nTT_ResultTy k(TT_StreamTy stream, CUdeviceptr a){\n  if ((a % 16 == 0))\n    return k_0d(stream, a);\n}\n"
           "\nTT_ResultTy k2(TT_StreamTy stream, CUdeviceptr a){\n  return k(stream, a);\n}\n")
    fixed = fix_dispatcher_source(old)
    assert "return k_0d(stream, a);\n  return TT_ERROR_INVALID_VALUE;\n}" in fixed
    assert fixed.count("TT_ERROR_INVALID_VALUE") == 1  # k2 returns unconditionally: left as it was


def test_shared_memory_is_checked_against_the_limit(tmp_path):
    ok = compile_aot(KERNELS, "smem_kernel", [AotVariant("*fp32:16, *fp32:16, 64", "1, 1, 1", 4, 1)],
                     tmp_path / "t", "tr")
    (need,) = ok.shared_bytes.values()
    assert need == 64 * 64 * 4
    with pytest.raises(ValueError, match=r"variant 0 .* needs 16384 bytes of dynamic shared memory; cuda:90:32 "
                                         r"allows 8192: use fewer stages or smaller blocks"):
        compile_aot(KERNELS, "smem_kernel", [AotVariant("*fp32:16, *fp32:16, 64", "1, 1, 1", 4, 1)],
                    tmp_path / "t2", "tr", smem_limit=8192)
    assert not (tmp_path / "t2").exists()  # nothing half-written
    assert shared_memory_limit("cuda:80:32") == 166912 and shared_memory_limit("cuda:89:32") == 101376
    with pytest.raises(ValueError, match="expected 'cuda:<compute capability>:32'"):
        shared_memory_limit("sm90")


def test_variants_a_dispatcher_cannot_tell_apart_are_refused(tmp_path):
    f16 = AotVariant("*fp16:16, *fp16:16, *fp16:16, i32, 1024", ALIGNED.grid)
    f32 = AotVariant("*fp32:16, *fp32:16, *fp32:16, i32, 1024", ALIGNED.grid)
    with pytest.raises(ValueError, match="variants 0 and 1 differ only in pointer element types"):
        compile_aot(KERNELS, "add_kernel", [f16, f32], tmp_path / "o", "add")


def test_bad_input_is_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        compile_aot(tmp_path / "nope.py", "k", [ALIGNED], tmp_path / "o", "k")
    with pytest.raises(ValueError, match="C identifier"):
        compile_aot(KERNELS, "add_kernel", [ALIGNED], tmp_path / "o", "add-f32")
    with pytest.raises(ValueError, match="at least one AotVariant"):
        compile_aot(KERNELS, "add_kernel", [], tmp_path / "o", "k")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_sources_compile_with_nvcc(generated, tmp_path):
    for src in generated.sources:
        obj = tmp_path / (src.stem + ".o")
        r = subprocess.run(["nvcc", "-c", str(src), "-I", str(generated.out_dir), "-o", str(obj)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert obj.stat().st_size > 1000
    r = subprocess.run(["nvcc", "-c", str(HERE / "harness_add.c"), "-I", str(generated.out_dir), "-o",
                        str(tmp_path / "harness.o")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["aot", str(KERNELS), "--kernel", "add_kernel", "--name", "add_f32", "--out", str(out),
               "--variant", f"{ALIGNED.signature};{ALIGNED.grid};4;2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "bytes of dynamic shared memory" in text and "dispatcher add_f32()" in text
    assert (out / "add_f32.c").is_file()
    rc = main(["aot", str(KERNELS), "--kernel", "add_kernel", "--name", "add_f32", "--out", str(out),
               "--variant", "*fp32:16"])
    assert rc == 2
    assert "expected 'SIGNATURE;GRID" in capsys.readouterr().err


def test_cli_compiles_a_registered_plugins_kernel(tmp_path, capsys):
    out = tmp_path / "lookup"
    rc = main(["aot", "--plugin", "TritonLookUp", "--name", "lookup", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    for dtype in ("fp16", "fp32"):
        manifest = json.loads((out / dtype / "manifest.json").read_text())
        assert manifest["kernel"] == "lookup_kernel" and len(manifest["variants"]) == 1
        assert f"*{dtype}:16" in manifest["variants"][0]["signature"]
        header = (out / dtype / f"lookup_{dtype}.h").read_text()
        assert ("CUdeviceptr ids_ptr, CUdeviceptr table_ptr, CUdeviceptr out_ptr, int32_t N, int32_t V, int32_t D"
                in header)
    rc = main(["aot", "--plugin", "NoSuchPlugin", "--name", "x", "--out", str(tmp_path / "x")])
    assert rc == 2 and "NoSuchPlugin" in capsys.readouterr().err
