"""The C library inside the installed wheel (issue 18, item 1): `pip install .` puts libfewstep, fewstep.h /
fewstep.hpp, the CMake package config and the native fewstep-run into site-packages/fewstep/; `fewstep-run` is a
console script on the venv's PATH; `fewstep --cmake-prefix-path` gives the prefix for find_package(fewstep); the
native code finds the pip-installed ONNX Runtime by itself (no FEWSTEP_ORT_LIBRARY anywhere below).

Skipped in a development checkout (`make dev`: the source tree has no C library in the package); `make test`
installs the wheel first, so it runs there. Every sample is compared bit for bit with `_C.Engine` (the same
library code on the same ORT, one thread: identical float operations in the same order)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fewstep import _C, _native  # noqa: E402

PREFIX = _native.cmake_prefix_path()
wheel_only = pytest.mark.skipif(PREFIX is None, reason="development checkout: no C library inside the package "
                                                      "(`make test` installs the wheel)")
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's scripts directory


def _env():
    """No ORT hint at all: the native side must find the onnxruntime package by itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("FEWSTEP_ORT_LIBRARY", "LD_LIBRARY_PATH")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from fewstep.export.onnx import export_onnx
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import build

    g = load("gmm")
    path = tmp_path_factory.mktemp("wheel") / "tiny.onnx"
    export_onnx(g.denoiser, build("ddim", 2, g.denoiser.sigma_min, g.denoiser.sigma_max), path,
                sample_shape=g.shape, num_classes=g.num_classes, guidance_input=False)
    return str(path)


@wheel_only
def test_layout_and_prefix_one_liners():
    p = Path(PREFIX)
    assert p == Path(_native.__file__).resolve().parent  # the package directory is the prefix
    for f in ("include/fewstep.h", "include/fewstep.hpp", "lib/libfewstep.so", "lib/cmake/fewstep/fewstepConfig.cmake",
              "lib/cmake/fewstep/fewstepConfigVersion.cmake", "lib/cmake/fewstep/fewstepTargets.cmake",
              "bin/fewstep-run"):
        assert (p / f).is_file(), f
    assert os.access(p / "bin/fewstep-run", os.X_OK)
    for cmd in ([sys.executable, "-m", "fewstep", "--cmake-prefix-path"], [BIN / "fewstep", "--cmake-prefix-path"]):
        # cwd "/": from the checkout's root, `-m fewstep` would import the source folder, not the wheel
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        assert r.returncode == 0 and r.stdout == f"{PREFIX}\n" and not r.stderr, (cmd, r.stderr)


@wheel_only
def test_fewstep_run_on_path_finds_ort_itself(engine, tmp_path):
    exe = shutil.which("fewstep-run", path=str(BIN))
    assert exe, "the fewstep-run console script is not in the venv"
    want = _C.Engine(engine, threads=1).sample(5, 4, labels=np.zeros(4, np.int64))
    r = subprocess.run(["fewstep-run", engine, "--seed", "5", "--n", "4", "--class", "0", "--threads", "1",
                        "--out", tmp_path / "x.npy"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), want)
    # the console script keeps the native exit codes and stdio: 2 bad input (usage, engine, ONNX Runtime library)
    r = subprocess.run(["fewstep-run", engine, "--n", "x"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("fewstep-run: error:") and not r.stdout, r.stderr
    r = subprocess.run(["fewstep-run", engine, "--ort-library", "/nonexistent/libonnxruntime.so", "--out",
                        tmp_path / "e.npy"], env=_env(), capture_output=True, text=True)
    assert r.returncode == 2 and "cannot load ONNX Runtime" in r.stderr and not (tmp_path / "e.npy").exists()


@wheel_only
def test_find_package_against_the_wheel(engine, tmp_path):
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(BIN))
    if not cmake or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("cmake and a C++ compiler are needed to build examples/find_package")
    prefix = subprocess.run([BIN / "fewstep", "--cmake-prefix-path"], capture_output=True, text=True,
                            check=True).stdout.strip()
    b = tmp_path / "embed"
    gen = ["-G", "Ninja"] if shutil.which("ninja") or shutil.which("ninja", path=str(BIN)) else []
    env = _env()
    r = subprocess.run([cmake, "-S", ROOT / "examples/find_package", "-B", b, *gen, f"-DCMAKE_PREFIX_PATH={prefix}",
                        "-DCMAKE_C_FLAGS=-Wall -Werror -pedantic"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([cmake, "--build", b], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    want = _C.Engine(engine, threads=1).sample(4, 6, labels=np.arange(6) % 9)
    r = subprocess.run([b / "minimal", engine, "4", "6", tmp_path / "m.npy"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), want)
    r = subprocess.run([b / "embed", engine, "4", "6"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and f"sum={want.astype(np.float64).sum():.9g}" in r.stdout, r.stdout + r.stderr
    # linked against the package's libfewstep (not a build tree's)
    ldd = subprocess.run(["ldd", b / "minimal"], capture_output=True, text=True).stdout if shutil.which("ldd") else ""
    assert not ldd or str(Path(prefix) / "lib/libfewstep.so") in ldd, ldd


_LOAD = """
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
lib.fewstep_last_error.restype = ctypes.c_char_p
lib.fewstep_engine_load.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
h = ctypes.c_void_p()
rc = lib.fewstep_engine_load(sys.argv[2].encode(), None, ctypes.byref(h))
print(rc, (lib.fewstep_last_error() or b"").decode())
"""


def test_libfewstep_finds_the_onnxruntime_package_beside_it(engine, tmp_path):
    """The lookup itself, also in a development checkout: libfewstep copied into a site-packages-like tree
    (sp/fewstep/lib/) loads an engine with no ORT hint when sp/onnxruntime/capi/ holds the library, fails to
    find ORT when it does not, and FEWSTEP_ORT_LIBRARY still overrides. One process per case: a process
    keeps the first ONNX Runtime it loads."""
    import onnxruntime

    src = Path(PREFIX) / "lib/libfewstep.so" if PREFIX else ROOT / "build/dev/libfewstep.so"
    if not src.exists():
        pytest.skip("no libfewstep.so built (make dev)")
    sp = tmp_path / "sp"
    (sp / "fewstep/lib").mkdir(parents=True)
    shutil.copy(src, sp / "fewstep/lib/libfewstep.so")
    lib = str(sp / "fewstep/lib/libfewstep.so")

    def load(env):
        r = subprocess.run([sys.executable, "-c", _LOAD, lib, engine], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        code, msg = r.stdout.split(" ", 1)
        return int(code), msg

    code, msg = load(_env())
    assert code == 7 and "cannot load ONNX Runtime (libonnxruntime.so)" in msg, msg  # no sibling package yet
    (sp / "onnxruntime").symlink_to(Path(onnxruntime.__file__).parent, target_is_directory=True)
    assert load(_env())[0] == 0
    code, msg = load({**_env(), "FEWSTEP_ORT_LIBRARY": "/nonexistent/libonnxruntime.so"})
    assert code == 7 and "/nonexistent/libonnxruntime.so" in msg, msg
