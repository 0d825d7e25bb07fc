"""Hostile engines: metadata is validated at load in C++ (and so in `fewstep run`, `fewstep-run` and the
Python bindings alike); a run whose result is not finite is its own error; C API calls set their error.

Engines are tiny GMM samplers exported here; each hostile variant edits one metadata entry with onnx.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from fewstep import _C  # noqa: E402
from fewstep.errors import NonFiniteError  # noqa: E402
from fewstep.export.onnx import export_onnx  # noqa: E402
from fewstep.runtime.models import load  # noqa: E402
from fewstep.runtime.solvers import build  # noqa: E402


def _meta(path: Path, key: str) -> str:
    return next(p.value for p in onnx.load(path).metadata_props if p.key == key)


def _with_meta(src: Path, dst: Path, key: str, value: str) -> Path:
    m = onnx.load(src)
    for p in m.metadata_props:
        if p.key == key:
            p.value = value
    onnx.save(m, dst)
    return dst


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile_engines")
    gmm = load("gmm")
    den = gmm.denoiser
    kw = dict(sample_shape=gmm.shape, num_classes=gmm.num_classes, teacher_hash=gmm.content_hash)
    plan = build("ddpm", 4, den.sigma_min, den.sigma_max)  # stochastic rows: the noise input exists
    export_onnx(den, plan, d / "good.onnx", **kw)
    # x ← 1e30·x twice: finite coefficients (float32 holds 1e30), an infinite result
    blow = build("ddim", 2, den.sigma_min, den.sigma_max)
    blow = blow.replace(rows=tuple(r.__class__(**{**r.__dict__, "c": 1e30}) for r in blow.rows))
    export_onnx(den, blow, d / "blowup.onnx", guidance_input=False, **kw)
    return {"dir": d, "good": d / "good.onnx", "blowup": d / "blowup.onnx",
            "plan": json.loads(_meta(d / "good.onnx", "fewstep.plan")),
            "contract": json.loads(_meta(d / "good.onnx", "fewstep.contract"))}


def _variants(eng):
    d, good, plan, c = eng["dir"], eng["good"], eng["plan"], eng["contract"]
    two_rows = {**plan, "rows": plan["rows"][:2]}
    no_noise = {**plan, "rows": [{**r, "g": 0.0} for r in plan["rows"]]}
    neg_sigma = {**plan, "rows": [{**plan["rows"][0], "sigma": -1.0}] + plan["rows"][1:]}
    return {
        "plan garbage": (_with_meta(good, d / "v1.onnx", "fewstep.plan", "{not json"), "fewstep.plan"),
        "plan rows ≠ nfe": (_with_meta(good, d / "v2.onnx", "fewstep.plan", json.dumps(two_rows)), "nfe"),
        "plan stochastic ≠ contract": (_with_meta(good, d / "v3.onnx", "fewstep.plan", json.dumps(no_noise)),
                                       "n_stochastic"),
        "plan sigma < 0": (_with_meta(good, d / "v4.onnx", "fewstep.plan", json.dumps(neg_sigma)), "sigma"),
        "plan format": (_with_meta(good, d / "v5.onnx", "fewstep.plan", json.dumps({**plan, "format": "x"})),
                        "fewstep.plan/1"),
        "compute_dtype int8": (_with_meta(good, d / "v6.onnx", "fewstep.contract",
                                          json.dumps({**c, "compute_dtype": "int8"})), "compute_dtype"),
        "sigma_init NaN": (_with_meta(good, d / "v7.onnx", "fewstep.contract",
                                      json.dumps({**c, "sigma_init": "NaN"})), "sigma_init"),
    }


def test_bad_metadata_is_refused_at_load_everywhere(eng, tmp_path):
    for i, (name, (path, match)) in enumerate(_variants(eng).items()):
        with pytest.raises(ValueError, match=match):
            _C.Engine(str(path), threads=1)
        if i % 3:
            continue  # the CLI goes through the same loader: a third of the variants end to end is enough
        out = tmp_path / "x.npy"
        p = subprocess.run([sys.executable, "-m", "fewstep", "run", path, "--seed", "0", "--n", "2", "--out", out],
                           capture_output=True, text=True, cwd="/")
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and match in p.stderr, (name, p.stderr)
        assert not out.exists()
    _C.Engine(str(eng["good"]), threads=1).sample(0, 2)  # the unedited engine loads and runs


def test_non_finite_result_has_its_own_error(eng, tmp_path):
    e = _C.Engine(str(eng["blowup"]), threads=1)
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        e.sample(0, 2)
    out = tmp_path / "x.npy"
    p = subprocess.run([sys.executable, "-m", "fewstep", "run", eng["blowup"], "--seed", "0", "--n", "2",
                        "--out", out], capture_output=True, text=True, cwd="/")
    assert p.returncode == 3 and p.stderr.count("\n") == 1 and "NaN or inf" in p.stderr, p.stderr
    assert not out.exists()


def test_threads_are_capped(eng):
    with pytest.raises(ValueError, match="at most .* threads"):
        _C.Engine(str(eng["good"]), threads=100_000)


def test_sample_from_refuses_non_finite_z(eng):
    e = _C.Engine(str(eng["good"]), threads=1)
    z = np.zeros((2, *eng["contract"]["sample_shape"]), np.float32)
    z[1, 0] = np.inf
    with pytest.raises(ValueError, match="z holds NaN or inf"):
        e.sample(0, 2, z=z)


def test_c_api_errors_set_the_last_error():
    lib = ctypes.CDLL(_C.__file__)
    lib.fewstep_randn.restype = ctypes.c_int
    lib.fewstep_randn.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.POINTER(ctypes.c_float), ctypes.c_size_t]
    lib.fewstep_last_error.restype = ctypes.c_char_p
    buf = (ctypes.c_float * 8)()
    cases = [((0, 2**32, 0, 1, 8, buf, 8), "stream"), ((0, 0, 0, 1, 8, buf, 4), "room for 4"),
             ((0, 0, 0, 0, 8, buf, 8), "batch"), ((0, 0, 0, 1, 8, None, 8), "NULL")]
    for args, match in cases:
        assert lib.fewstep_randn(*args) != 0
        assert match in lib.fewstep_last_error().decode(), (args, lib.fewstep_last_error())


def _data_shaped_engine(path: Path) -> Path:
    """A graph whose output is [2N, 2] for an input [N, 2]: its contract's dims are dynamic, so only the
    run can tell (ORT hands back its own, larger buffer)."""
    from onnx import TensorProto, helper

    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2])
    out = helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["M", 2])
    g = helper.make_graph([helper.make_node("Concat", ["z", "z"], ["sample"], axis=0)], "twice", [z], [out])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    contract = {"sample_shape": [2], "nfe": 1, "n_stochastic": 0, "num_classes": None, "guidance_input": False}
    for k, v in {"fewstep.format": "fewstep.engine/1", "fewstep.kind": "sampler",
                 "fewstep.contract": json.dumps(contract)}.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, path)
    return path


@pytest.mark.parametrize("case", ["directory", "fifo", "huge batch", "not ORT", "threads", "data-shaped output",
                                  "text noise"])
def test_hostile_run_arguments(eng, tmp_path, capsys, case):
    import os

    from fewstep.cli import main

    good = str(eng["good"])
    args = {"directory": [str(tmp_path), "--n", "2"],
            "huge batch": [good, "--n", str(2**40)],
            "not ORT": [good, "--n", "2", "--ort-library", "/etc/passwd"],
            "threads": [good, "--n", "2", "--threads", "100000"],
            "text noise": [good, "--noise", str(tmp_path / "z.npy")]}.get(case)
    if case == "fifo":
        os.mkfifo(tmp_path / "fifo")
        args = [str(tmp_path / "fifo"), "--n", "2"]
    if case == "data-shaped output":
        args = [str(_data_shaped_engine(tmp_path / "twice.onnx")), "--n", "3"]
    (tmp_path / "z.npy").write_text("hello")
    out = tmp_path / "out.npy"
    capsys.readouterr()
    rc = main(["run", *args, "--seed", "0", "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("fewstep: error: "), (rc, err)
    assert "Traceback" not in err[0] and not out.exists() and ".tmp" not in err[0]


def test_external_data_damage_is_one_line_naming_it(eng, tmp_path, capsys):
    """An engine whose weights live beside it (external data, as SD-size exports do): a truncated or missing data
    file, or a location outside the engine's folder, is refused at load in one line that says so, without ONNX
    Runtime's source locations ("…/initializer.cc:51 onnxruntime::Initializer::Initializer(…) [ONNXRuntimeError]
    : 1 : FAIL : …")."""
    from fewstep.cli import main

    m = onnx.load(eng["good"])
    path = tmp_path / "x.onnx"
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="x.onnx.data",
                    size_threshold=0)
    data = (tmp_path / "x.onnx.data").read_bytes()
    _C.Engine(str(path), threads=1).sample(0, 2)  # the unedited external-data engine loads and runs

    def located(name: str, location: str) -> Path:
        g = onnx.load(path, load_external_data=False)
        for t in g.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        onnx.save(g, tmp_path / name)
        return tmp_path / name

    cases = {"truncated": (path, "out of bounds"), "missing": (path, "does not exist"),
             "absolute": (located("abs.onnx", "/etc/passwd"), "Absolute path not allowed"),
             "escaping": (located("up.onnx", "../" * 8 + "etc/passwd"), "escapes model directory")}
    for case, (engine, match) in cases.items():
        if case == "truncated":
            (tmp_path / "x.onnx.data").write_bytes(data[: len(data) // 2])
        if case == "missing":
            (tmp_path / "x.onnx.data").unlink()
        with pytest.raises(ValueError) as exc:
            _C.Engine(str(engine), threads=1)
        msg = str(exc.value)
        assert "not a loadable ONNX model" in msg and match in msg, (case, msg)
        assert ".cc:" not in msg and "ONNXRuntimeError" not in msg and "\n" not in msg, (case, msg)
    out = tmp_path / "out.npy"
    capsys.readouterr()
    assert main(["run", str(path), "--n", "2", "--out", str(out)]) == 2  # the CLI: the same line, once
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "does not exist" in err[0] and not out.exists(), err


# --- property-based fuzz of engine metadata -------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(10**30), 10**30), st.floats(width=64),
                  st.text(max_size=6))
_value = st.recursive(_leaf, lambda k: st.one_of(st.lists(k, max_size=3), st.dictionaries(st.text(max_size=5), k,
                                                                                          max_size=3)), max_leaves=8)


@st.composite
def _metadata_edit(draw):
    key = draw(st.sampled_from(["fewstep.plan", "fewstep.contract"]))
    if draw(st.integers(0, 4)) == 0:
        return key, draw(st.text(max_size=80))  # not JSON at all
    return key, draw(st.sampled_from(["row", "top", "input"])), draw(st.text(max_size=12) | st.sampled_from(
        ["sigma", "a", "c", "q", "p", "g", "guidance", "rows", "nfe", "n_stochastic", "sample_shape",
         "num_classes", "null_label", "guidance_input", "sigma_init", "compute_dtype", "format", "inputs", "name",
         "shape", "dtype"])), draw(_value)


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(edit=_metadata_edit())
def test_fuzz_engine_metadata(eng, tmp_path_factory, edit):
    """Any edit of the plan or contract metadata: the engine loads and samples, or says why in a
    ValueError (NonFiniteError for a NaN result); never another exception, a crash or a hang."""
    key = edit[0]
    if len(edit) == 2:
        text = edit[1]
    else:
        obj = json.loads(_meta(eng["good"], key))
        target = obj["rows"][0] if edit[1] == "row" and key == "fewstep.plan" else obj
        if edit[1] == "input" and key == "fewstep.contract":  # one entry of the contract's input list
            target = obj["inputs"][-1]
        target[edit[2]] = edit[3]
        text = json.dumps(obj)
    path = _with_meta(eng["good"], tmp_path_factory.mktemp("fz") / "e.onnx", key, text)
    try:
        e = _C.Engine(str(path), threads=1)
    except ValueError:
        return
    try:
        e.sample(0, 2)
    except ValueError:  # NonFiniteError included
        pass


def test_metadata_json_is_strict_and_depth_bounded(eng):
    """The C++ metadata reader (nlohmann/json): nesting past 64 levels is refused by a linear pre-scan before
    the parser runs (a 100k-deep contract must not reach a recursive parser or overflow the stack), brackets
    inside strings do not count, and malformed text is one ValueError naming the entry and the byte."""
    d, good, c = eng["dir"], eng["good"], eng["contract"]
    deep = "[" * 100_000 + "]" * 100_000
    cases = {
        "deep contract": (_with_meta(good, d / "j1.onnx", "fewstep.contract", deep), "nested too deeply"),
        "deep plan": (_with_meta(good, d / "j2.onnx", "fewstep.plan", '{"a": ' + deep + "}"), "nested too deeply"),
        "65 levels": (_with_meta(good, d / "j3.onnx", "fewstep.contract",
                                 json.dumps({**c, "x": json.loads("[" * 64 + "]" * 64)})), "nested too deeply"),
        "truncated": (_with_meta(good, d / "j4.onnx", "fewstep.contract", json.dumps(c)[:-1]),
                      r"fewstep.contract: malformed JSON \(.*byte"),
        "NaN literal": (_with_meta(good, d / "j5.onnx", "fewstep.contract", json.dumps({**c, "sigma_init": 1.0})
                                   .replace("1.0", "NaN")), "fewstep.contract: malformed JSON"),
    }
    for path, match in cases.values():
        with pytest.raises(ValueError, match=match):
            _C.Engine(str(path), threads=1)
    # 64 levels (the contract object + 63 lists) is allowed, and "[" inside a string is not nesting
    ok = {**c, "x": json.loads("[" * 63 + "]" * 63), "note": "[[[[{{{{" * 100 + '\\"['}
    e = _C.Engine(str(_with_meta(good, d / "j6.onnx", "fewstep.contract", json.dumps(ok))), threads=1)
    assert e.sample(0, 2).shape[0] == 2
