"""Named conditioning inputs in the C++ runtime (issue 16.6): an engine's contract lists its inputs (e.g.
encoder_hidden_states and its negative_ twin for CFG); the C API (fewstep_sample_inputs,
fewstep_engine_input_count / _info), `_C.Engine.sample(inputs=...)`, `fewstep run --input / --embeddings` and
`fewstep-run --input` take them by name, checked against the contract. Class labels and guidance are two
such inputs: the old calls give the same bytes as the generic one.

The conditioned engine is built here with onnx.helper (the text-to-image exporter is another change): a
one-row stochastic sampler reading z, noise, guidance, two float conditioning tensors and an int64 one.
"""

import ctypes
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from test_cpp_runtime import ORT_LIB, _env, native_build  # noqa: E402

from fewstep import _C  # noqa: E402
from fewstep.runtime import noise as fnoise  # noqa: E402

SS = (3, 4)  # sample shape
EHS = (5, 4)  # encoder_hidden_states per sample: 20 values, more than a sample's 12 (the size-limit case)
F32, I64 = 1, 7  # FEWSTEP_DTYPE_*
CONTRACT = {
    "inputs": [
        {"name": "z", "dtype": "float32", "shape": ["batch", *SS]},
        {"name": "noise", "dtype": "float32", "shape": [1, "batch", *SS]},
        {"name": "guidance", "dtype": "float32", "shape": ["batch"]},
        {"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", *EHS]},
        {"name": "negative_encoder_hidden_states", "dtype": "float32", "shape": ["batch", *EHS]},
        {"name": "time_ids", "dtype": "int64", "shape": ["batch", 2]},
    ],
    "outputs": [{"name": "sample", "dtype": "float32", "shape": ["batch", *SS]}],
    "sample_shape": list(SS), "nfe": 1, "n_stochastic": 1, "sigma_init": 1.0, "num_classes": None,
    "null_label": None, "guidance_input": True, "compute_dtype": "float32",
}
PLAN = {"format": "fewstep.plan/1", "sigma_init": 1.0, "rows": [{"sigma": 1.0, "a": 1.0, "c": 0.0, "g": 0.5, "q": []}]}


def _conditioned_model(contract=CONTRACT, plan=PLAN, batch="batch"):
    """sample = 2z + 0.5·noise[0] + m(neg) + W·(m(ehs) − m(neg)) + Σ time_ids / 4, m = mean over the 5 tokens."""
    from onnx import TensorProto as T
    from onnx import helper as h

    def vi(name, t, *dims):
        return h.make_tensor_value_info(name, t, list(dims))

    ins = [vi("z", T.FLOAT, batch, *SS), vi("noise", T.FLOAT, 1, batch, *SS), vi("guidance", T.FLOAT, batch),
           vi("encoder_hidden_states", T.FLOAT, batch, *EHS),
           vi("negative_encoder_hidden_states", T.FLOAT, batch, *EHS),
           vi("time_ids", T.INT64, batch, 2)]
    inits = [h.make_tensor("two", T.FLOAT, [], [2.0]), h.make_tensor("half", T.FLOAT, [], [0.5]),
             h.make_tensor("quarter", T.FLOAT, [], [0.25]), h.make_tensor("zero", T.INT64, [], [0]),
             h.make_tensor("ax1", T.INT64, [1], [1]), h.make_tensor("col", T.INT64, [3], [-1, 1, 1])]
    nodes = [
        h.make_node("Mul", ["z", "two"], ["z2"]),
        h.make_node("Gather", ["noise", "zero"], ["eps0"], axis=0),
        h.make_node("Mul", ["eps0", "half"], ["eps_h"]),
        h.make_node("ReduceMean", ["encoder_hidden_states"], ["mc"], axes=[1], keepdims=1),
        h.make_node("ReduceMean", ["negative_encoder_hidden_states"], ["mu"], axes=[1], keepdims=1),
        h.make_node("Sub", ["mc", "mu"], ["d"]),
        h.make_node("Reshape", ["guidance", "col"], ["w"]),
        h.make_node("Mul", ["w", "d"], ["wd"]),
        h.make_node("Add", ["mu", "wd"], ["cfg"]),
        h.make_node("Cast", ["time_ids"], ["tf"], to=T.FLOAT),
        h.make_node("ReduceSum", ["tf", "ax1"], ["ts"], keepdims=1),
        h.make_node("Reshape", ["ts", "col"], ["t3"]),
        h.make_node("Mul", ["t3", "quarter"], ["tq"]),
        h.make_node("Add", ["z2", "eps_h"], ["s1"]),
        h.make_node("Add", ["s1", "cfg"], ["s2"]),
        h.make_node("Add", ["s2", "tq"], ["sample"]),
    ]
    g = h.make_graph(nodes, "conditioned", ins, [vi("sample", T.FLOAT, batch, *SS)], initializer=inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    meta = {"fewstep.format": "fewstep.engine/1", "fewstep.kind": "sampler", "fewstep.contract": json.dumps(contract)}
    if plan is not None:
        meta["fewstep.plan"] = json.dumps(plan)
    for k, v in meta.items():
        m.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(m, full_check=True)
    return m


@pytest.fixture(scope="module")
def cond(tmp_path_factory):
    d = tmp_path_factory.mktemp("cond")
    onnx.save(_conditioned_model(), d / "cond.onnx")
    return str(d / "cond.onnx")


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
    lib.fewstep_engine_input_count.argtypes = [ctypes.c_void_p]
    lib.fewstep_engine_input_count.restype = ctypes.c_size_t
    lib.fewstep_engine_input_info.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(InputInfo)]
    lib.fewstep_sample_inputs.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.POINTER(Input),
                                          ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
    lib.fewstep_sample.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    yield lib
    mp.undo()


class Input(ctypes.Structure):  # fewstep_input
    _fields_ = [("name", ctypes.c_char_p), ("shape", ctypes.POINTER(ctypes.c_int64)), ("ndim", ctypes.c_size_t),
                ("dtype", ctypes.c_int32), ("data", ctypes.c_void_p)]


class InputInfo(ctypes.Structure):  # fewstep_input_info
    _fields_ = [("name", ctypes.c_char_p), ("ndim", ctypes.c_int32), ("shape", ctypes.c_int64 * 10),
                ("dtype", ctypes.c_int32), ("source", ctypes.c_int32)]


def _load(lib, path):
    h = ctypes.c_void_p()  # NULL params: ONNX Runtime from $FEWSTEP_ORT_LIBRARY (set by the lib fixture)
    assert lib.fewstep_engine_load(str(path).encode(), None, ctypes.byref(h)) == 0, lib.fewstep_last_error()
    return h


def _c_inputs(arrays: dict, shapes: dict | None = None, dtypes: dict | None = None):
    """A fewstep_input[] over the arrays (kept alive by the returned tuple); shapes / dtypes override."""
    arr = (Input * max(1, len(arrays)))()
    keep = []
    for i, (name, a) in enumerate(arrays.items()):
        shape = (shapes or {}).get(name, a.shape)
        dims = (ctypes.c_int64 * max(1, len(shape)))(*shape)
        keep.append(dims)
        dt = (dtypes or {}).get(name, I64 if a.dtype == np.int64 else F32)
        arr[i] = Input(name.encode(), dims, len(shape), dt, a.ctypes.data if a is not None else None)
    return arr, keep


def _feeds(seed, b, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    return {"guidance": np.linspace(1.0, 4.0, b).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((b, *EHS)).astype(np.float32),
            "negative_encoder_hidden_states": rng.standard_normal((b, *EHS)).astype(np.float32),
            "time_ids": rng.integers(0, 1024, (b, 2)).astype(np.int64)}


def _ort(path, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _want(cond, seed, b, given):
    z, eps = fnoise.draw(seed, b, SS, 1)
    return _ort(cond, {"z": z, "noise": eps, **given})


# ---- discovery ---------------------------------------------------------------------------------------


def test_inputs_are_listed(cond, lib):
    want = [("z", ("batch", *SS), "float32", "seed"), ("noise", (1, "batch", *SS), "float32", "seed_only"),
            ("guidance", ("batch",), "float32", "required"),
            ("encoder_hidden_states", ("batch", *EHS), "float32", "required"),
            ("negative_encoder_hidden_states", ("batch", *EHS), "float32", "required"),
            ("time_ids", ("batch", 2), "int64", "required")]
    got = [(d["name"], d["shape"], d["dtype"], d["source"]) for d in _C.Engine(cond, threads=1).inputs]
    assert got == want
    h = _load(lib, cond)
    try:
        assert lib.fewstep_engine_input_count(h) == len(want) and lib.fewstep_engine_input_count(None) == 0
        for i, (name, shape, dtype, source) in enumerate(want):
            ii = InputInfo()
            assert lib.fewstep_engine_input_info(h, i, ctypes.byref(ii)) == 0
            assert ii.name.decode() == name and ii.dtype == (I64 if dtype == "int64" else F32)
            assert tuple(ii.shape[: ii.ndim]) == tuple(-1 if d == "batch" else d for d in shape)
            assert ii.source == {"required": 0, "seed": 1, "seed_only": 2}[source]
        ii = InputInfo()
        assert lib.fewstep_engine_input_info(h, len(want), ctypes.byref(ii)) == 2  # out of range
        assert b"past the engine's 6 inputs" in lib.fewstep_last_error()
        assert lib.fewstep_engine_input_info(h, 0, None) == 1
    finally:
        lib.fewstep_engine_free(h)


# ---- the same sample through every door --------------------------------------------------------------


@pytest.mark.parametrize("seed,b", [(0, 1), (7, 4), (2**63 + 5, 3)])
def test_c_api_and_bindings_equal_onnxruntime_bitwise(cond, lib, seed, b):
    given = _feeds(seed, b)
    want = _want(cond, seed, b, given)
    h = _load(lib, cond)
    try:
        arr, keep = _c_inputs(given)
        out = np.full((b, *SS), np.nan, np.float32)
        assert lib.fewstep_sample_inputs(h, seed, b, arr, len(given), out.ctypes.data, out.size) == 0, \
            lib.fewstep_last_error()
        np.testing.assert_array_equal(out, want)  # same library, same graph, same inputs: identical bytes
        # a given z replaces the seed's (the noise still comes from the seed)
        z = np.random.default_rng(5).standard_normal((b, *SS)).astype(np.float32)
        arr, keep = _c_inputs({**given, "z": z})
        assert lib.fewstep_sample_inputs(h, seed, b, arr, len(given) + 1, out.ctypes.data, out.size) == 0
        _, eps = fnoise.draw(seed, b, SS, 1)
        np.testing.assert_array_equal(out, _ort(cond, {"z": z, "noise": eps, **given}))
    finally:
        lib.fewstep_engine_free(h)
    e = _C.Engine(cond, threads=1)
    np.testing.assert_array_equal(e.sample(seed, b, inputs=given), want)
    # keyword guidance is the input 'guidance'; float64 arrays are passed as float32
    rest = {k: v for k, v in given.items() if k != "guidance"}
    rest["encoder_hidden_states"] = rest["encoder_hidden_states"].astype(np.float64)
    np.testing.assert_array_equal(e.sample(seed, b, guidance=given["guidance"], inputs=rest), want)


def test_old_call_refuses_an_engine_with_conditioning_inputs(cond, lib):
    h = _load(lib, cond)
    try:
        out = np.zeros(12, np.float32)
        assert lib.fewstep_sample(h, 0, 1, None, None, out.ctypes.data, out.size) == 1
        msg = lib.fewstep_last_error().decode()
        assert msg.startswith("missing input 'encoder_hidden_states' (float32 [batch, 5, 4])"), msg
    finally:
        lib.fewstep_engine_free(h)
    with pytest.raises(ValueError, match="missing input 'encoder_hidden_states'"):
        _C.Engine(cond, threads=1).sample(0, 1)


def test_bad_inputs_give_their_status_and_one_line(cond, lib):
    b = 2
    good = _feeds(0, b)
    nan = {**good, "encoder_hidden_states": good["encoder_hidden_states"].copy()}
    nan["encoder_hidden_states"][1, 2, 3] = np.nan
    drop = {k: v for k, v in good.items() if k != "negative_encoder_hidden_states"}
    z_bad = {**good, "z": np.zeros((b, *SS), np.float32)}
    z_bad["z"][0, 0, 0] = np.inf
    # (arrays, shapes, dtypes, extra entries, batch, status, message)
    cases = {
        "unknown name": ({**good, "encoder_hidden_state": good["encoder_hidden_states"]}, {}, {}, b, 1,
                         "unknown input 'encoder_hidden_state': this engine takes z, guidance, encoder_hidden_states"),
        "missing": (drop, {}, {}, b, 1, "missing input 'negative_encoder_hidden_states'"),
        "noise given": ({**good, "noise": np.zeros((1, b, *SS), np.float32)}, {}, {}, b, 1,
                        "input 'noise' cannot be given"),
        "wrong shape": (good, {"encoder_hidden_states": (b, 4, 5)}, {}, b, 1,
                        "input 'encoder_hidden_states' has shape [2, 4, 5], expected [2, 5, 4] at batch 2"),
        "wrong rank": (good, {"time_ids": (b,)}, {}, b, 1, "input 'time_ids' has shape [2], expected [2, 2]"),
        "batch mismatch": (good, {}, {}, 3, 1, "input 'guidance' has shape [2], expected [3] at batch 3"),
        "huge shape": (good, {"encoder_hidden_states": (2**62, 2**62, 2**62)}, {}, b, 1,
                       "has shape [4611686018427387904, 4611686018427387904, 4611686018427387904]"),
        "huge rank": (good, {"guidance": tuple([1] * 11)}, {}, b, 1, "has shape rank 11"),
        "wrong dtype": (good, {}, {"time_ids": F32}, b, 1, "input 'time_ids' must be int64, got float32"),
        "unknown dtype": (good, {}, {"guidance": 3}, b, 1, "dtype 3 is neither"),
        "NaN": (nan, {}, {}, b, 1, "input encoder_hidden_states holds NaN or inf (value 31)"),
        "inf z": (z_bad, {}, {}, b, 1, "input z holds NaN or inf (value 0)"),
        "NaN guidance": ({**good, "guidance": np.array([1.0, np.nan], np.float32)}, {}, {}, b, 1,
                         "input guidance holds NaN or inf (value 1)"),
        # the output fits (178,956,970 × 12 < 2^31 values) but encoder_hidden_states (× 20) does not: refused
        # before anything of that size exists
        "input too large": (good, {}, {}, 2**31 // 12, 2, "input 'encoder_hidden_states' [178956970, 5, 4] holds "
                            "more than the 2^31 values"),
    }
    h = _load(lib, cond)
    try:
        out = np.zeros((b, *SS), np.float32)
        for name, (arrays, shapes, dtypes, batch, status, match) in cases.items():
            arr, keep = _c_inputs(arrays, shapes, dtypes)
            # out_len claims room for the batch: every case fails before `out` is written
            rc = lib.fewstep_sample_inputs(h, 0, batch, arr, len(arrays), out.ctypes.data, batch * 12)
            msg = lib.fewstep_last_error().decode()
            assert rc == status and match in msg and "\n" not in msg, (name, rc, msg)
        arr, keep = _c_inputs({**good, "guidance": good["guidance"]})  # a dict cannot repeat a name; C can
        twice = (Input * 5)(*arr[:4], arr[0])
        assert lib.fewstep_sample_inputs(h, 0, b, twice, 5, out.ctypes.data, out.size) == 1
        assert lib.fewstep_last_error() == b"input 'guidance' given twice"
        nul = (Input * 1)(Input(None, None, 0, F32, None))
        assert lib.fewstep_sample_inputs(h, 0, b, nul, 1, out.ctypes.data, out.size) == 1
        assert lib.fewstep_last_error() == b"inputs[0].name is NULL"
        arr, keep = _c_inputs(good)
        arr[1].data = None
        assert lib.fewstep_sample_inputs(h, 0, b, arr, 4, out.ctypes.data, out.size) == 1
        assert b"data is NULL" in lib.fewstep_last_error()
        assert lib.fewstep_sample_inputs(h, 0, b, None, 3, out.ctypes.data, out.size) == 1
        assert lib.fewstep_sample_inputs(None, 0, b, None, 0, out.ctypes.data, out.size) == 1
        arr, keep = _c_inputs(good)
        assert lib.fewstep_sample_inputs(h, 0, b, arr, 4, out.ctypes.data, out.size - 1) == 3  # buffer too small
        assert lib.fewstep_sample_inputs(h, 0, b, arr, 4, out.ctypes.data, out.size) == 0  # and the good call runs
    finally:
        lib.fewstep_engine_free(h)
    e = _C.Engine(cond, threads=1)
    with pytest.raises(ValueError, match="expected a float or integer array"):
        e.sample(0, b, inputs={**good, "time_ids": good["time_ids"].astype(bool)})
    with pytest.raises(ValueError, match="input 'time_ids' must be int64, got float32"):
        e.sample(0, b, inputs={**good, "time_ids": good["time_ids"].astype(np.float32)})
    with pytest.raises(ValueError, match="input 'guidance' given twice"):
        e.sample(0, b, guidance=good["guidance"], inputs=good)


# ---- class labels are one named input ------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    from fewstep.export.onnx import export_onnx
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import build

    g = load("gmm")
    d = tmp_path_factory.mktemp("labelled")
    den = g.denoiser
    export_onnx(den, build("ddpm", 4, den.sigma_min, den.sigma_max), d / "ddpm.onnx", sample_shape=g.shape,
                num_classes=g.num_classes, teacher_hash=g.content_hash)
    return str(d / "ddpm.onnx")


def test_class_label_engine_old_and_generic_calls_are_identical(labelled, lib):
    b, seed = 6, 11
    labels = np.array([0, 3, 8, 9, 1, 9], np.int64)  # 9 = the null label
    w = np.full(b, 2.5, np.float32)
    e = _C.Engine(labelled, threads=1)
    assert [(d["name"], d["source"]) for d in e.inputs] == [("z", "seed"), ("noise", "seed_only"),
                                                            ("class_labels", "required"), ("guidance", "required")]
    old = e.sample(seed, b, labels=labels, guidance=w)
    assert old.tobytes() == e.sample(seed, b, inputs={"class_labels": labels, "guidance": w}).tobytes()
    # the old call's defaults (null labels, W = 1) are the generic call with those inputs
    null = np.full(b, 9, np.int64)
    assert e.sample(seed, b).tobytes() == e.sample(seed, b, inputs={"class_labels": null,
                                                                    "guidance": np.ones(b, np.float32)}).tobytes()
    h = _load(lib, labelled)
    try:
        o1, o2 = np.zeros((b, 2), np.float32), np.zeros((b, 2), np.float32)
        assert lib.fewstep_sample(h, seed, b, labels.ctypes.data, w.ctypes.data, o1.ctypes.data, o1.size) == 0
        arr, keep = _c_inputs({"class_labels": labels, "guidance": w})
        assert lib.fewstep_sample_inputs(h, seed, b, arr, 2, o2.ctypes.data, o2.size) == 0
        assert o1.tobytes() == o2.tobytes() == old.tobytes()
        bad = labels.copy()
        bad[2] = 30
        arr, keep = _c_inputs({"class_labels": bad, "guidance": w})
        assert lib.fewstep_sample_inputs(h, seed, b, arr, 2, o2.ctypes.data, o2.size) == 2  # out of range
        assert lib.fewstep_last_error().startswith(b"label 30 of sample 2 is not in 0..8 or the null label 9")
        arr, keep = _c_inputs({"class_labels": labels})
        assert lib.fewstep_sample_inputs(h, seed, b, arr, 1, o2.ctypes.data, o2.size) == 1  # generic: no default W
        assert lib.fewstep_last_error() == b"missing input 'guidance' (float32 [batch])"
    finally:
        lib.fewstep_engine_free(h)


# ---- the contract is checked against the graph at load -----------------------------------------------


def _edit_inputs(fn):
    c = json.loads(json.dumps(CONTRACT))
    fn(c["inputs"])
    return c


@pytest.mark.parametrize("name,contract,match", [
    ("unlisted graph input", _edit_inputs(lambda i: i.pop(5)), "inputs does not list|graph has 6 inputs"),
    ("graph lacks it", _edit_inputs(lambda i: i.append({"name": "text_embeds", "dtype": "float32",
                                                         "shape": ["batch", 8]})), "'text_embeds', which the graph"),
    ("dtype", _edit_inputs(lambda i: i[5].update(dtype="float32")), "'time_ids' is float32 but not in the graph"),
    ("float16", _edit_inputs(lambda i: i[3].update(dtype="float16")), "dtype must be \"float32\" or \"int64\""),
    ("static size", _edit_inputs(lambda i: i[3].update(shape=["batch", 6, 4])), "the graph's differs"),
    ("rank", _edit_inputs(lambda i: i[5].update(shape=["batch"])), "has rank 1, the graph's 2"),
    ("twice", _edit_inputs(lambda i: i.append(dict(i[3]))), "lists 'encoder_hidden_states' twice"),
    ("reserved ruled out", _edit_inputs(lambda i: i.append({"name": "class_labels", "dtype": "int64",
                                                            "shape": ["batch"]})), "rule out"),
    ("reserved shape", _edit_inputs(lambda i: i[0].update(shape=["batch", 12])), "inputs lists 'z' as float32"),
    ("zero size", _edit_inputs(lambda i: i[3].update(shape=["batch", 0, 4])), "shape entries"),
    ("huge", _edit_inputs(lambda i: i[3].update(shape=["batch", 2**31, 2**31])), r"more than 2\^31 values"),
    ("not a list", {**CONTRACT, "inputs": {"z": 1}}, "inputs must be a list"),
    ("no name", _edit_inputs(lambda i: i[3].pop("name")), r"inputs\[3\].name must be"),
    ("control character", _edit_inputs(lambda i: i[3].update(name="encoder\nhidden")), r"inputs\[3\].name must be"),
])
def test_contract_inputs_checked_at_load(tmp_path, name, contract, match):
    path = tmp_path / "e.onnx"
    onnx.save(_conditioned_model(contract), path)
    with pytest.raises(ValueError, match=match):
        _C.Engine(str(path), threads=1)


def test_fixed_batch_engine(tmp_path):
    """A fixed batch is a size in the contract (as the exporter writes it), equal to the graph's."""
    c = json.loads(json.dumps(CONTRACT).replace('"batch"', "2"))
    onnx.save(_conditioned_model(c, batch=2), tmp_path / "f.onnx")
    e = _C.Engine(str(tmp_path / "f.onnx"), threads=1)
    assert e.info["fixed_batch"] == 2 and e.inputs[3]["shape"] == (2, *EHS)
    given = _feeds(0, 2)
    np.testing.assert_array_equal(e.sample(4, 2, inputs=given), _want(str(tmp_path / "f.onnx"), 4, 2, given))
    with pytest.raises(ValueError, match="exported for batch 2"):
        e.sample(4, 3, inputs=_feeds(0, 3))
    onnx.save(_conditioned_model(CONTRACT, batch=2), tmp_path / "g.onnx")  # "batch" over a fixed graph: refused
    with pytest.raises(ValueError, match=r"inputs lists 'z' as float32 \[batch, 3, 4\], the engine's is float32 \[2"):
        _C.Engine(str(tmp_path / "g.onnx"), threads=1)


# ---- the command lines -------------------------------------------------------------------------------


def test_fewstep_run_native_inputs(cond, native, tmp_path):
    exe = str(native / "fewstep-run")
    b, seed = 3, 9
    given = _feeds(seed, b, rng_seed=1)
    for k, v in given.items():
        np.save(tmp_path / f"{k}.npy", v)

    def flags(**paths):
        return [a for k, v in paths.items() for a in ("--input", f"{k}={v}")]

    good = {k: tmp_path / f"{k}.npy" for k in given}
    files = flags(**good)
    p = subprocess.run([exe, cond, "--seed", str(seed), *files, "--out", tmp_path / "x.npy", "--threads", "1"],
                       env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("3 samples at NFE 1")  # N from the inputs' leading size
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), _want(cond, seed, b, given))
    # --guidance W instead of a guidance file
    nog = flags(**{k: v for k, v in good.items() if k != "guidance"})
    p = subprocess.run([exe, cond, "--seed", str(seed), *nog, "--guidance", "2.5", "--out", tmp_path / "y.npy"],
                       env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    want = _want(cond, seed, b, {**given, "guidance": np.full(b, 2.5, np.float32)})
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    np.save(tmp_path / "i32.npy", given["time_ids"].astype(np.int32))
    np.save(tmp_path / "ti_f.npy", given["time_ids"].astype(np.float32))
    nan = given["encoder_hidden_states"].copy()
    nan[0, 0, 0] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    cases = [(flags(**{**good, "time_ids": None})[:-2], "missing input 'time_ids'"),
             ([*files, *flags(time_ids=good["time_ids"])], "input 'time_ids' given twice"),
             (flags(**{**good, "time_ids": tmp_path / "i32.npy"}), "float32 (<f4) or int64 (<i8)"),
             (flags(**{**good, "time_ids": tmp_path / "ti_f.npy"}), "'time_ids' must be int64, got float32"),
             (flags(**{**good, "encoder_hidden_states": tmp_path / "nan.npy"}), "holds NaN or inf"),
             ([*files, *flags(prompt=good["time_ids"])], "unknown input 'prompt'"),
             ([*files, "--n", "2"], "expected [2] at batch 2"),
             ([*files, "--input", "text_embeds"], "--input must be NAME=FILE.npy"),
             ([*files, *flags(x=tmp_path / "none.npy")], "cannot open input file for 'x'"),
             ([*files, "--guidance", "2"], "--guidance and --input guidance")]
    # --embeddings: the float tensors from one safetensors file, time_ids from its .npy
    from safetensors.numpy import save_file

    save_file({k: v for k, v in given.items() if k != "time_ids"}, str(tmp_path / "e.safetensors"))
    p = subprocess.run([exe, cond, "--seed", str(seed), "--embeddings", tmp_path / "e.safetensors",
                        *flags(time_ids=good["time_ids"]), "--out", tmp_path / "s.npy"], env=_env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), _want(cond, seed, b, given))
    save_file({"time_ids": given["time_ids"].astype(np.float16)}, str(tmp_path / "f16.safetensors"))
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 16)

    def raw(header: str, data: bytes = b"") -> Path:
        path = tmp_path / f"raw{len(header)}.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + data)
        return path

    far = raw('{"guidance": {"dtype": "F32", "shape": [3], "data_offsets": [0, 1000000000000]}}', b"\0" * 12)
    deep = raw("[" * 100_000 + "]" * 100_000)
    # entries that all name the same bytes: read one by one they would cost the file's size each (10^4 entries
    # over 4 MiB asked for 40 GB)
    shared = raw(json.dumps({f"t{i}": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]} for i in range(1000)}),
                 b"\0" * 12)
    emb = ["--embeddings", tmp_path / "e.safetensors", *flags(time_ids=good["time_ids"])]
    cases += [(["--embeddings", tmp_path / "garbage.safetensors"], "not a .safetensors file"),
              (["--embeddings", tmp_path / "f16.safetensors"], 'is "F16"; fewstep-run reads F32 and I64'),
              (["--embeddings", far], "do not fit its shape and the file"),
              (["--embeddings", deep], "nested too deeply"),
              (["--embeddings", shared], "'t0' and 't1' share bytes"),
              ([*emb, *flags(guidance=good["guidance"])], "--input guidance: the embeddings file holds"),
              (emb[:2], "missing input 'time_ids'")]
    for args, match in cases:
        q = subprocess.run([exe, cond, *map(str, args), "--out", tmp_path / "e.npy"], env=_env(), capture_output=True,
                           text=True)
        assert q.returncode == 2 and q.stderr.count("\n") == 1 and match in q.stderr, (args, q.stderr)
        assert not (tmp_path / "e.npy").exists()


def test_fewstep_run_python_inputs_and_embeddings(cond, tmp_path, capsys):
    from safetensors.numpy import save_file

    from fewstep.cli import main

    b, seed = 2, 5
    given = _feeds(seed, b, rng_seed=2)
    for k, v in given.items():
        np.save(tmp_path / f"{k}.npy", v)
    args = [a for k in given for a in ("--input", f"{k}={tmp_path / k}.npy")]
    assert main(["run", cond, "--seed", str(seed), *args, "--threads", "1", "--out", str(tmp_path / "x.npy")]) == 0
    want = _want(cond, seed, b, given)
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), want)
    emb = {k: v for k, v in given.items() if k != "time_ids"}
    save_file(emb, str(tmp_path / "e.safetensors"))
    assert main(["run", cond, "--seed", str(seed), "--embeddings", str(tmp_path / "e.safetensors"), "--input",
                 f"time_ids={tmp_path / 'time_ids.npy'}", "--out", str(tmp_path / "y.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), want)
    capsys.readouterr()
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    for extra, match in [([], "missing input 'time_ids'"),
                         (["--input", f"guidance={tmp_path / 'guidance.npy'}"], "the embeddings file holds"),
                         (["--input", "time_ids"], "NAME=FILE.npy")]:
        rc = main(["run", cond, "--embeddings", str(tmp_path / "e.safetensors"), *extra, "--out",
                   str(tmp_path / "z.npy")])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and match in err[0], (extra, err)
    rc = main(["run", cond, "--embeddings", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "z.npy")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "embeddings file" in err[0], err
    assert not (tmp_path / "z.npy").exists()
