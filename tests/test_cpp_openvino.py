"""The `openvino` provider of the C++ runtime (issue 18.5): FEWSTEP_PROVIDER_OPENVINO in the C API, `_C.Engine(...,
provider="openvino")`, `fewstep-run --provider openvino` and `fewstep run --provider openvino` put ONNX Runtime's
OpenVINO execution provider (device CPU, float32) in front of its CPU provider.

With an ONNX Runtime library that lacks the EP (the default pip build) every door says so in one line
(FEWSTEP_ERR_UNSUPPORTED), naming the onnxruntime-openvino build and FEWSTEP_ORT_LIBRARY. The run itself needs
that build's library, which CI does not have: point $FEWSTEP_OPENVINO_ORT_LIBRARY at its
onnxruntime/capi/libonnxruntime.so.* (OpenVINO's libraries beside it) to run it, else it is skipped.
"""

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from test_cpp_runtime import ORT_LIB, _env, native_build  # noqa: E402

from fewstep import _C  # noqa: E402

PROVIDER_OPENVINO = 3
ERR_INVALID_ARGUMENT, ERR_UNSUPPORTED = 1, 8
# absolute: the CLI subprocesses run in cwd="/"
OV_LIB = os.environ.get("FEWSTEP_OPENVINO_ORT_LIBRARY", "")
OV_LIB = os.path.abspath(OV_LIB) if OV_LIB else ""
W = 2.0


class Params(ctypes.Structure):  # fewstep_engine_params
    _fields_ = [("intra_op_threads", ctypes.c_int32), ("inter_op_threads", ctypes.c_int32),
                ("provider", ctypes.c_int32), ("device_id", ctypes.c_int32), ("cuda_graph", ctypes.c_int32),
                ("engine_cache_dir", ctypes.c_char_p), ("ort_library", ctypes.c_char_p)]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return native_build(tmp_path_factory)


@pytest.fixture(scope="module")
def gmm_engine(tmp_path_factory):
    """A small engine: the provider is appended before the session is created, so any engine file shows it."""
    from fewstep.export.onnx import export_onnx
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import build

    g = load("gmm")
    path = tmp_path_factory.mktemp("ov") / "tiny.onnx"
    export_onnx(g.denoiser, build("ddim", 1, g.denoiser.sigma_min, g.denoiser.sigma_max), path,
                sample_shape=g.shape, num_classes=g.num_classes, guidance_input=False)
    return str(path)


def _says_what_to_do(msg: str) -> bool:
    return "\n" not in msg.strip() and "OpenVINO execution provider" in msg and "onnxruntime-openvino" in msg \
        and "FEWSTEP_ORT_LIBRARY" in msg


@pytest.mark.skipif("OpenVINOExecutionProvider" in ort.get_available_providers(),
                    reason="the default onnxruntime here is the OpenVINO build: nothing is missing")
def test_without_the_ep_every_door_says_so_in_one_line(gmm_engine, native, tmp_path, capsys):
    from fewstep.cli import main

    lib = ctypes.CDLL(str(native / "libfewstep.so"))
    lib.fewstep_last_error.restype = ctypes.c_char_p
    lib.fewstep_default_params.restype = Params
    lib.fewstep_engine_load.argtypes = [ctypes.c_char_p, ctypes.POINTER(Params), ctypes.POINTER(ctypes.c_void_p)]
    p = lib.fewstep_default_params()
    p.provider, p.intra_op_threads, p.ort_library = PROVIDER_OPENVINO, 1, ORT_LIB.encode()
    h = ctypes.c_void_p()
    assert lib.fewstep_engine_load(gmm_engine.encode(), ctypes.byref(p), ctypes.byref(h)) == ERR_UNSUPPORTED
    assert not h and _says_what_to_do(lib.fewstep_last_error().decode()), lib.fewstep_last_error()
    p.provider = PROVIDER_OPENVINO + 1  # past the enum
    assert lib.fewstep_engine_load(gmm_engine.encode(), ctypes.byref(p), ctypes.byref(h)) == ERR_INVALID_ARGUMENT
    assert b"_OPENVINO" in lib.fewstep_last_error()

    with pytest.raises(ValueError) as exc:
        _C.Engine(gmm_engine, threads=1, provider="openvino")
    assert _says_what_to_do(str(exc.value)), exc.value
    with pytest.raises(ValueError, match="'cpu', 'cuda', 'tensorrt' or 'openvino'"):
        _C.Engine(gmm_engine, provider="vino")

    q = subprocess.run([str(native / "fewstep-run"), gmm_engine, "--provider", "openvino", "--out",
                        str(tmp_path / "x.npy")], env=_env(), capture_output=True, text=True, cwd="/")
    assert q.returncode == 2 and q.stderr.count("\n") == 1 and _says_what_to_do(q.stderr), q.stderr
    q = subprocess.run([str(native / "fewstep-run"), gmm_engine, "--provider", "vino", "--out",
                        str(tmp_path / "x.npy")], env=_env(), capture_output=True, text=True, cwd="/")
    assert q.returncode == 2 and "cpu, cuda, tensorrt or openvino" in q.stderr, q.stderr

    capsys.readouterr()
    assert main(["run", gmm_engine, "--provider", "openvino", "--out", str(tmp_path / "y.npy")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("fewstep: error: ") and _says_what_to_do(err[0]), err
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "y.npy").exists()


needs_ov = pytest.mark.skipif(not os.path.isfile(OV_LIB), reason="set FEWSTEP_OPENVINO_ORT_LIBRARY to the "
                              "onnxruntime-openvino build's onnxruntime/capi/libonnxruntime.so.*")


@pytest.fixture(scope="module")
def digits_engines(tmp_path_factory):
    """Digits, DPM-Solver++(2M) at 4 NFE: class labels only, and with a W input doing CFG in the graph."""
    from fewstep.export.onnx import export_onnx
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import build

    m = load("digits")
    d = tmp_path_factory.mktemp("ov_digits")
    plan = build("dpmpp-2m", 4, m.denoiser.sigma_min, m.denoiser.sigma_max)
    kw = dict(sample_shape=m.shape, num_classes=m.num_classes, teacher_hash=m.content_hash)
    export_onnx(m.denoiser, plan, d / "labels.onnx", guidance_input=False, **kw)
    export_onnx(m.denoiser, plan, d / "cfg.onnx", **kw)
    return {"labels": str(d / "labels.onnx"), "cfg": str(d / "cfg.onnx")}


@needs_ov
@pytest.mark.parametrize("kind", ["labels", "cfg"])
def test_openvino_matches_the_cpu_provider_within_export_tolerance(digits_engines, native, tmp_path, kind):
    """Both providers run the same float32 graph; each differs from exact arithmetic by at most g_w·R·2⁻²⁴
    (verify's worst case, R the graph's rounding depth, g_w the CFG gain), so they differ from each other by at
    most 2·g_w·R·2⁻²⁴: verify's engine_tolerance, the export tolerance. (OpenVINO is asked for float32: on a CPU
    with bf16 units its default would round every op to 8 bits, far outside it.)"""
    from fewstep.export.verify import engine_tolerance

    path = digits_engines[kind]
    env = {**os.environ, "FEWSTEP_ORT_LIBRARY": OV_LIB}
    g = ["--guidance", str(W)] if kind == "cfg" else []
    outs = {}
    for provider in ("cpu", "openvino"):
        q = subprocess.run([str(native / "fewstep-run"), path, "--seed", "3", "--n", "16", *g, "--threads", "1",
                            "--provider", provider, "--out", str(tmp_path / f"{provider}.npy")], env=env,
                           capture_output=True, text=True, cwd="/", timeout=600)
        assert q.returncode == 0, q.stderr
        outs[provider] = np.load(tmp_path / f"{provider}.npy")
    ref = outs["cpu"].astype(np.float64)
    rel = float(np.abs(outs["openvino"] - ref).max() / np.abs(ref).max())
    tol = engine_tolerance(path, W)
    assert outs["openvino"].shape == (16, 1, 8, 8) and rel <= tol, (rel, tol)
    # the check can fail: the same samples in another order (another sample's z and class) are far outside it
    assert float(np.abs(np.roll(outs["openvino"], 1, axis=0) - ref).max() / np.abs(ref).max()) > tol
    # `fewstep run --provider openvino --ort-library` (its own process: one ONNX Runtime library per process)
    q = subprocess.run([sys.executable, "-m", "fewstep", "run", path, "--seed", "3", "--n", "16", *g, "--threads", "1",
                        "--provider", "openvino", "--ort-library", OV_LIB, "--out", str(tmp_path / "py.npy")],
                       capture_output=True, text=True, cwd="/", timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert q.returncode == 0, q.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "py.npy"), outs["openvino"])  # the same library and provider


@needs_ov
def test_openvino_runs_a_decode_engine(native, tmp_path):
    """A --decode engine (tiny SD, noise + embeddings → pixels) under OpenVINO: the image, within the export
    tolerance of the CPU provider's (the bound of the test above)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from pipeline_fixtures import build_sd

    from fewstep.export.onnx import example_inputs, export_teacher
    from fewstep.export.verify import engine_tolerance
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import get

    folder = build_sd(str(tmp_path / "sd"))
    plan = get("dpmpp-2m").build(np.append(np.geomspace(load(folder).denoiser.sigma_max, 0.1, 2), 0.0))
    path = str(tmp_path / "sd.onnx")
    c = export_teacher(folder, plan, path, decode=True).contract
    args = []
    for k, v in example_inputs(c, 2, seed=1, guidance=3.0).items():
        if k != "z":
            np.save(tmp_path / f"{k}.npy", v)
            args += ["--input", f"{k}={tmp_path / k}.npy"]
    env = {**os.environ, "FEWSTEP_ORT_LIBRARY": OV_LIB}
    outs = {}
    for provider in ("cpu", "openvino"):
        q = subprocess.run([str(native / "fewstep-run"), path, "--seed", "1", *args, "--threads", "1", "--provider",
                            provider, "--out", str(tmp_path / f"{provider}.npy")], env=env, capture_output=True,
                           text=True, cwd="/", timeout=600)
        assert q.returncode == 0 and ": image [2, 3, 16, 16] -> " in q.stdout, q.stderr
        outs[provider] = np.load(tmp_path / f"{provider}.npy")
    ref = outs["cpu"].astype(np.float64)
    rel = float(np.abs(outs["openvino"] - ref).max() / np.abs(ref).max())
    tol = engine_tolerance(path, 3.0)
    assert rel <= tol, (rel, tol)
