"""FEWSTEP_CUDA=ON: Triton's AOT kernels for one Plan are compiled into libfewstep (sm_80 + sm_90).

On a machine without a GPU this checks what a CPU can: the generated C compiles and links into
the shared library with the kernel entry points exported. Loading and launching them needs a GPU
(tests/test_kernels.py, `-m gpu`).
"""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.runtime.solvers import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fewstep_cuda_build_links_fused_kernels(tmp_path):
    pytest.importorskip("triton")
    if not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/include/cuda.h")):
        pytest.skip("no CUDA toolkit")
    cmake = shutil.which("cmake") or str(Path(sys.executable).parent / "cmake")
    headers = glob.glob(str(ROOT / "build/*/onnxruntime-headers/include/onnxruntime"))
    plan = tmp_path / "plan.json"
    build("dpmpp-2m", 4, 0.002, 80).save(plan)
    b = tmp_path / "b"
    args = [cmake, "-S", ROOT, "-B", b, "-DFEWSTEP_PYTHON=OFF", "-DFEWSTEP_CUDA=ON", f"-DFEWSTEP_AOT_PLAN={plan}",
            f"-DPython3_EXECUTABLE={sys.executable}"] + ([f"-DFEWSTEP_ORT_INCLUDE_DIR={headers[0]}"] if headers else [])
    p = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path)
    if p.returncode != 0 and "fewstep.kernels.aot failed" in p.stderr:
        pytest.skip("Triton AOT compile unavailable here")
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run([cmake, "--build", b], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:]
    syms = subprocess.run(["nm", "-D", str(b / "libfewstep.so")], capture_output=True, text=True).stdout
    for arch in ("sm80", "sm90"):
        assert f" T fewstep_fused_update_{arch}" in syms  # the dispatcher of each target is exported
        assert f"fewstep_fused_update_{arch}_algo0" in syms
