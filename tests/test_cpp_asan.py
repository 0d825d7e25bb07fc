"""AddressSanitizer + LeakSanitizer over 1,000 load / sample / free cycles of the C API, error
paths included, and over fewstep-run reading mutated .npy / .safetensors input files (`make asan`). Builds the
library and the CLI with -DFEWSTEP_ASAN=ON in a temp dir, once for the module."""

import os
import subprocess

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from test_cpp_runtime import ROOT, _cmake, _gen, ort_headers_arg  # noqa: E402

from fewstep import _C  # noqa: E402

CYCLES = int(os.environ.get("FEWSTEP_ASAN_CYCLES", "1000"))


@pytest.fixture(scope="module")
def asan_build(tmp_path_factory):
    cmake = _cmake()
    b = tmp_path_factory.mktemp("asan") / "build"
    p = subprocess.run([cmake, "-S", ROOT, "-B", b, *_gen(), "-DCMAKE_BUILD_TYPE=Debug", "-DFEWSTEP_ASAN=ON",
                        "-DFEWSTEP_PYTHON=OFF", *ort_headers_arg()], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = subprocess.run([cmake, "--build", b, "--target", "fewstep_cycles", "fewstep-run"], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return b


def _asan_env():
    env = {**os.environ, "FEWSTEP_ORT_LIBRARY": _C.find_ort_library(),
           "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23"}
    env.pop("LD_PRELOAD", None)
    return env


@pytest.mark.slow
def test_asan_lsan_cycles(tmp_path, asan_build):
    from fewstep.export.onnx import export_onnx
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import build

    g = load("gmm")
    engine = tmp_path / "tiny.onnx"  # a small graph keeps 1,000 session creations under ASan to ~30 s
    export_onnx(g.denoiser, build("ddim", 1, g.denoiser.sigma_min, g.denoiser.sigma_max), engine,
                sample_shape=g.shape, num_classes=g.num_classes, guidance_input=False)
    good = engine.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(good[: len(good) // 3])
    (tmp_path / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(3000))
    p = subprocess.run([asan_build / "fewstep_cycles", engine, tmp_path / "missing.onnx", tmp_path / "trunc.onnx",
                        tmp_path / "garbage.onnx", "--", str(CYCLES)], env=_asan_env(), capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    assert f"cycles: {CYCLES} ok" in p.stdout
    assert "ERROR: AddressSanitizer" not in p.stderr and "LeakSanitizer" not in p.stderr


def _mutants(good: bytes, header_end: int, rng, n: int, length_field: tuple[int, int]):
    """``n`` damaged copies of a file: cut short, a header byte or the length field replaced, digits spliced into
    the header with its length field kept right (shapes and offsets grow), bytes appended. ``length_field``:
    (offset, size) of the header's little-endian byte count."""
    out = []
    for i in range(n):
        b = bytearray(good)
        kind = i % 5
        if kind == 0:
            b = b[: int(rng.integers(0, len(b)))]
        elif kind == 1:
            for _ in range(int(rng.integers(1, 4))):
                b[int(rng.integers(0, header_end))] = int(rng.integers(0, 256))
        elif kind == 2:
            at = int(rng.integers(0, 12))
            b[at] = int(rng.integers(0, 256))
        elif kind == 3:
            at = int(rng.integers(10, header_end))
            digits = str(int(rng.integers(0, 10**12))).encode()
            b[at:at] = digits
            off, size = length_field
            n_header = int.from_bytes(b[off:off + size], "little") + len(digits)
            b[off:off + size] = n_header.to_bytes(size, "little")
        else:
            b += rng.bytes(int(rng.integers(1, 64)))
        out.append(bytes(b))
    return out


@pytest.mark.slow
def test_asan_fewstep_run_reads_damaged_input_files(tmp_path, asan_build):
    """fewstep-run parses .npy and .safetensors itself (every size checked against the file before it allocates):
    each damaged file ends in exit 0 or one error line with exit 2, and AddressSanitizer reports nothing."""
    import onnx
    from safetensors.numpy import save_file
    from test_cpp_inputs import _conditioned_model, _feeds

    cond = tmp_path / "cond.onnx"
    onnx.save(_conditioned_model(), cond)
    given = _feeds(3, 2)
    rng = np.random.default_rng(0)
    save_file({k: v for k, v in given.items() if k != "time_ids"}, str(tmp_path / "e.safetensors"))
    np.save(tmp_path / "time_ids.npy", given["time_ids"])
    st, npy = (tmp_path / "e.safetensors").read_bytes(), (tmp_path / "time_ids.npy").read_bytes()
    runs = []
    for i, data in enumerate(_mutants(st, 8 + int.from_bytes(st[:8], "little"), rng, 20, (0, 8))):
        (tmp_path / f"m{i}.safetensors").write_bytes(data)
        runs.append(["--embeddings", tmp_path / f"m{i}.safetensors", "--input", f"time_ids={tmp_path}/time_ids.npy"])
    for i, data in enumerate(_mutants(npy, npy.index(b"\n") + 1, rng, 20, (8, 2))):
        (tmp_path / f"m{i}.npy").write_bytes(data)
        runs.append(["--embeddings", tmp_path / "e.safetensors", "--input", f"time_ids={tmp_path}/m{i}.npy"])
    rcs = []
    for args in runs:
        out = tmp_path / "out.npy"
        p = subprocess.run([asan_build / "fewstep-run", cond, *map(str, args), "--out", out, "--threads", "1"],
                           env=_asan_env(), capture_output=True, text=True, timeout=120)
        assert "AddressSanitizer" not in p.stderr and "LeakSanitizer" not in p.stderr, p.stderr[-6000:]
        assert p.returncode in (0, 2), (args, p.returncode, p.stderr[-3000:])
        if p.returncode == 2:
            assert p.stderr.count("\n") == 1 and not out.exists(), (args, p.stderr)
        out.unlink(missing_ok=True)
        rcs.append(p.returncode)
    assert rcs.count(2) >= len(runs) // 2  # the damage was mostly seen (an appended byte or a changed value is not)
