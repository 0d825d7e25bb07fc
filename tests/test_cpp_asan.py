"""AddressSanitizer + LeakSanitizer over 1,000 load / sample / free cycles of the C API, error
paths included (`make asan`). Builds the library with -DFEWSTEP_ASAN=ON in a temp dir."""

import os
import subprocess

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from test_cpp_runtime import ROOT, _cmake, _gen, ort_headers_arg  # noqa: E402

from fewstep import _C  # noqa: E402

CYCLES = int(os.environ.get("FEWSTEP_ASAN_CYCLES", "1000"))


@pytest.mark.slow
def test_asan_lsan_cycles(tmp_path):
    from fewstep.export.onnx import export_onnx
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import build

    cmake = _cmake()
    g = load("gmm")
    engine = tmp_path / "tiny.onnx"  # a small graph keeps 1,000 session creations under ASan to ~30 s
    export_onnx(g.denoiser, build("ddim", 1, g.denoiser.sigma_min, g.denoiser.sigma_max), engine,
                sample_shape=g.shape, num_classes=g.num_classes, guidance_input=False)
    good = engine.read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(good[: len(good) // 3])
    (tmp_path / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(3000))
    b = tmp_path / "build"
    p = subprocess.run([cmake, "-S", ROOT, "-B", b, *_gen(), "-DCMAKE_BUILD_TYPE=Debug", "-DFEWSTEP_ASAN=ON",
                        "-DFEWSTEP_PYTHON=OFF", *ort_headers_arg()], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = subprocess.run([cmake, "--build", b, "--target", "fewstep_cycles"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    env = {**os.environ, "FEWSTEP_ORT_LIBRARY": _C.find_ort_library(),
           "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23"}
    env.pop("LD_PRELOAD", None)
    p = subprocess.run([b / "fewstep_cycles", engine, tmp_path / "missing.onnx", tmp_path / "trunc.onnx",
                        tmp_path / "garbage.onnx", "--", str(CYCLES)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-6000:]
    assert f"cycles: {CYCLES} ok" in p.stdout
    assert "ERROR: AddressSanitizer" not in p.stderr and "LeakSanitizer" not in p.stderr
