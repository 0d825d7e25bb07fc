"""--decode engines in the C++ runtime (issue 16): an engine exported with the pipeline's VAE decoder appended
maps noise + embeddings to pixels, its output 'image' [batch, 3, H, W] rather than 'sample' [batch,
*sample_shape]. The C API says so (fewstep_engine_output_info) and sizes out_len by it; `_C.Engine.sample`,
`fewstep-run` and `fewstep run` return / write arrays of that shape, bit-identical to ONNX Runtime from Python
on the same inputs and within verify's derived float32 tolerance of the executor + VAE. A contract whose
output lies is one line, at load or (a size the graph leaves dynamic) at the run.

The pipeline is tests/pipeline_fixtures.py's tiny random-weight SD folder (16×16 images from 4×8×8 latents).
"""

import ctypes
import json
import subprocess

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from pipeline_fixtures import build_sd  # noqa: E402
from test_cpp_runtime import ORT_LIB, _env, native_build  # noqa: E402

from fewstep import _C  # noqa: E402

W = 3.0  # CFG scale of the runs (≠ 1: the CFG branch of the graph's If)
LATENTS, IMAGE = (4, 8, 8), (3, 16, 16)
F32 = 1  # FEWSTEP_DTYPE_FLOAT32
ERR_INVALID_ARGUMENT, ERR_BUFFER_TOO_SMALL, ERR_INVALID_ENGINE = 1, 3, 6


class OutputInfo(ctypes.Structure):  # fewstep_output_info
    _fields_ = [("name", ctypes.c_char_p), ("ndim", ctypes.c_int32), ("shape", ctypes.c_int64 * 10),
                ("dtype", ctypes.c_int32), ("per_sample", ctypes.c_int64)]


class Input(ctypes.Structure):  # fewstep_input
    _fields_ = [("name", ctypes.c_char_p), ("shape", ctypes.POINTER(ctypes.c_int64)), ("ndim", ctypes.c_size_t),
                ("dtype", ctypes.c_int32), ("data", ctypes.c_void_p)]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD folder and its DPM++(2M) 2-NFE sampler exported with --decode (guidance input, CFG in the graph)."""
    from fewstep.export.onnx import export_teacher
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import get

    d = tmp_path_factory.mktemp("decode")
    folder = build_sd(str(d / "sd"))
    m = load(folder)
    plan = get("dpmpp-2m").build(np.append(np.geomspace(m.denoiser.sigma_max, 0.1, 2), 0.0))
    res = export_teacher(folder, plan, str(d / "sd.onnx"), decode=True)
    return {"folder": folder, "path": str(d / "sd.onnx"), "contract": res.contract, "dir": d}


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return native_build(tmp_path_factory)


@pytest.fixture(scope="module")
def lib(native):
    mp = pytest.MonkeyPatch()
    mp.setenv("FEWSTEP_ORT_LIBRARY", ORT_LIB)
    lib = ctypes.CDLL(str(native / "libfewstep.so"))
    lib.fewstep_last_error.restype = ctypes.c_char_p
    lib.fewstep_engine_load.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.fewstep_engine_free.argtypes = [ctypes.c_void_p]
    lib.fewstep_engine_output_info.argtypes = [ctypes.c_void_p, ctypes.POINTER(OutputInfo)]
    lib.fewstep_sample_inputs.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.POINTER(Input),
                                          ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    yield lib
    mp.undo()


def _feeds(contract, b, seed):
    """verify's inputs: z = Philox stream 0 of the seed (what the C++ runtime draws), the embeddings from the
    streams after it, W for every sample."""
    from fewstep.export.onnx import example_inputs

    return example_inputs(contract, b, seed=seed, guidance=W)


def _given(feeds):
    return {k: v for k, v in feeds.items() if k != "z"}  # z: from the seed


def _ort(path, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _c_inputs(arrays):
    arr = (Input * len(arrays))()
    keep = []
    for i, (name, a) in enumerate(arrays.items()):
        dims = (ctypes.c_int64 * a.ndim)(*a.shape)
        keep.append(dims)
        arr[i] = Input(name.encode(), dims, a.ndim, F32, a.ctypes.data)
    return arr, keep


def _with_contract(src, dst, edit, dynamic_hw: bool = False):
    """A copy of engine `src` whose fewstep.contract is edit(contract); ``dynamic_hw``: the graph's declared output
    H and W become symbolic, as engines exported before the exporter declared the contract's shape."""
    m = onnx.load(src)
    if dynamic_hw:
        for i, d in enumerate(m.graph.output[0].type.tensor_type.shape.dim[2:]):
            d.dim_param = f"hw{i}"
    p = next(p for p in m.metadata_props if p.key == "fewstep.contract")
    c = json.loads(p.value)
    edit(c)
    p.value = json.dumps(c)
    onnx.save(m, dst)
    return str(dst)


def test_output_is_declared(sd, lib):
    assert sd["contract"]["outputs"] == [{"name": "image", "dtype": "float32", "shape": ["batch", *IMAGE]}]
    e = _C.Engine(sd["path"], threads=1)
    assert e.output == {"name": "image", "shape": ("batch", *IMAGE), "dtype": "float32", "per_sample": 768}
    assert e.info["sample_shape"] == LATENTS and e.info["per_sample"] == 256  # z's: the latents
    h = ctypes.c_void_p()
    assert lib.fewstep_engine_load(sd["path"].encode(), None, ctypes.byref(h)) == 0, lib.fewstep_last_error()
    try:
        o = OutputInfo()
        assert lib.fewstep_engine_output_info(h, ctypes.byref(o)) == 0
        assert o.name == b"image" and o.dtype == F32 and o.per_sample == 768
        assert tuple(o.shape[: o.ndim]) == (-1, *IMAGE)
        assert lib.fewstep_engine_output_info(h, None) == ERR_INVALID_ARGUMENT
        assert lib.fewstep_engine_output_info(None, ctypes.byref(o)) == ERR_INVALID_ARGUMENT
    finally:
        lib.fewstep_engine_free(h)


@pytest.mark.parametrize("seed,b", [(0, 1), (7, 3)])
def test_c_api_and_bindings_equal_onnxruntime_bitwise(sd, lib, seed, b):
    feeds = _feeds(sd["contract"], b, seed)
    want = _ort(sd["path"], feeds)
    assert want.shape == (b, *IMAGE)
    e = _C.Engine(sd["path"], threads=1)
    got = e.sample(seed, b, inputs=_given(feeds))
    assert got.shape == (b, *IMAGE) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want)  # same library, graph and inputs: identical bytes
    h = ctypes.c_void_p()
    assert lib.fewstep_engine_load(sd["path"].encode(), None, ctypes.byref(h)) == 0, lib.fewstep_last_error()
    try:
        arr, keep = _c_inputs(_given(feeds))
        out = np.full((b, *IMAGE), np.nan, np.float32)
        assert lib.fewstep_sample_inputs(h, seed, b, arr, len(arr), out.ctypes.data, out.size) == 0, \
            lib.fewstep_last_error()
        np.testing.assert_array_equal(out, want)
        # out_len is checked against the image, not the latents: a buffer sized [b, *sample_shape] is refused
        # before anything is written
        small = np.zeros(b * 256 + 1, np.float32)
        assert lib.fewstep_sample_inputs(h, seed, b, arr, len(arr), small.ctypes.data, small.size) == \
            ERR_BUFFER_TOO_SMALL
        assert lib.fewstep_last_error() == f"out has room for {small.size} floats, the batch needs {b * 768}".encode()
        assert not small.any()
    finally:
        lib.fewstep_engine_free(h)


def test_engine_equals_executor_and_vae_within_export_tolerance(sd):
    """The C++ runtime's pixels against the float32 executor's latents through the pipeline's VAE decoder, within
    the tolerance verify derives for this engine (2·g_w·R·2⁻²⁴, R counted on its graph, decoder included)."""
    from fewstep.export.onnx import read_metadata
    from fewstep.export.verify import engine_tolerance, reference
    from fewstep.runtime.models import load

    b, seed = 2, 4
    feeds = _feeds(sd["contract"], b, seed)
    got = _C.Engine(sd["path"], threads=1).sample(seed, b, inputs=_given(feeds))
    ref = reference(load(sd["folder"]), read_metadata(sd["path"]), feeds, W)
    tol = engine_tolerance(sd["path"], W)
    rel = float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())
    assert ref.shape == got.shape and rel <= tol, (rel, tol)
    # the check can fail: pixels of another seed are far outside it
    other = reference(load(sd["folder"]), read_metadata(sd["path"]), _feeds(sd["contract"], b, seed + 1), W)
    assert float(np.abs(got.astype(np.float64) - other).max() / np.abs(other).max()) > tol


def test_command_lines_write_the_image(sd, native, tmp_path, capsys):
    from fewstep.cli import main

    b, seed = 2, 5
    feeds = _feeds(sd["contract"], b, seed)
    want = _ort(sd["path"], feeds)
    args = []
    for k, v in _given(feeds).items():
        np.save(tmp_path / f"{k}.npy", v)
        args += ["--input", f"{k}={tmp_path / k}.npy"]
    # the native CLI, from another directory (absolute paths only)
    p = subprocess.run([str(native / "fewstep-run"), sd["path"], "--seed", str(seed), *args, "--threads", "1",
                        "--out", str(tmp_path / "x.npy")], env=_env(), capture_output=True, text=True, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"{b} samples at NFE 2 in ") and f": image [{b}, 3, 16, 16] -> " in p.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), want)
    # `fewstep run` (the C++ runtime through _C)
    capsys.readouterr()
    rc = main(["run", sd["path"], "--seed", str(seed), *args, "--threads", "1", "--out", str(tmp_path / "y.npy")])
    assert rc == 0
    assert f": image [{b}, 3, 16, 16] -> " in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)


@pytest.mark.parametrize("name,edit,match", [
    ("shape lies (rank)", lambda c: c["outputs"][0].update(shape=["batch", 3, 256]),
     "output 'image' has rank 3, the graph's 4"),
    ("latents' name", lambda c: c["outputs"][0].update(name="sample", shape=["batch", *LATENTS]),
     "the graph has no output 'sample'"),
    ("sample is the latents", lambda c: c["outputs"][0].update(name="sample"),
     r"but 'sample' is the latents \[batch, 4, 8, 8\]"),
    ("no output list", lambda c: c.pop("outputs"), "the graph has no output 'sample'"),
    ("dtype", lambda c: c["outputs"][0].update(dtype="float16"), 'dtype must be "float32"'),
    ("two outputs", lambda c: c["outputs"].append(dict(c["outputs"][0])), "outputs must be a list of one output"),
    ("fixed batch", lambda c: c["outputs"][0]["shape"].__setitem__(0, 2), 'the first shape entry must be "batch"'),
    ("huge", lambda c: c["outputs"][0].update(shape=["batch", 3, 2**31, 2**31]), r"more than 2\^31 values per sample"),
    ("zero size", lambda c: c["outputs"][0].update(shape=["batch", 3, 0, 16]), "shape entries must be an integer"),
    ("control character", lambda c: c["outputs"][0].update(name="ima\nge"), r"outputs\[0\].name must be"),
])
def test_hostile_output_contract_is_one_line_at_load(sd, tmp_path, name, edit, match):
    path = _with_contract(sd["path"], tmp_path / "e.onnx", edit)
    with pytest.raises(ValueError, match=match) as exc:
        _C.Engine(path, threads=1)
    assert "\n" not in str(exc.value)


def test_output_size_lie_is_one_line_at_load(sd, native, tmp_path, capsys):
    """The exported graph declares the output's shape as its contract says (H and W fixed), so a contract
    promising [batch, 3, 32, 32] for a 16×16 decoder is refused at load, in one line, by every entry point,
    and nothing is written."""
    from fewstep.cli import main

    path = _with_contract(sd["path"], tmp_path / "lie.onnx",
                          lambda c: c["outputs"][0].update(shape=["batch", 3, 32, 32]))
    with pytest.raises((ValueError, RuntimeError)) as exc:
        _C.Engine(path, threads=1)
    assert "\n" not in str(exc.value) and "32" in str(exc.value) and "16" in str(exc.value), exc.value
    feeds = _given(_feeds(sd["contract"], 2, 0))
    args = []
    for k, v in feeds.items():
        np.save(tmp_path / f"{k}.npy", v)
        args += ["--input", f"{k}={tmp_path / k}.npy"]
    p = subprocess.run([str(native / "fewstep-run"), path, *args, "--out", str(tmp_path / "x.npy")], env=_env(),
                       capture_output=True, text=True, cwd="/")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("fewstep-run: error: "), p.stderr
    capsys.readouterr()
    assert main(["run", path, *args, "--out", str(tmp_path / "y.npy")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("fewstep: error: "), err
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "y.npy").exists()


def test_output_lie_the_graph_cannot_show_is_one_line_at_the_run(sd, tmp_path):
    """An engine whose graph leaves H and W symbolic loads with a contract promising [batch, 3, 32, 32]; the run
    then refuses (ONNX Runtime's output is checked against the contract before any copy) and returns nothing."""
    path = _with_contract(sd["path"], tmp_path / "lie.onnx",
                          lambda c: c["outputs"][0].update(shape=["batch", 3, 32, 32]), dynamic_hw=True)
    e = _C.Engine(path, threads=1)
    assert e.output["shape"] == ("batch", 3, 32, 32)
    with pytest.raises((ValueError, RuntimeError)) as exc:
        e.sample(0, 2, inputs=_given(_feeds(sd["contract"], 2, 0)))
    assert "\n" not in str(exc.value) and ("32" in str(exc.value) or "shape" in str(exc.value)), exc.value
