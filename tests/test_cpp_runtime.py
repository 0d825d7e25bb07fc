"""The C++ runtime (issue 5): C API engines over ONNX Runtime, `_C.Engine`, `fewstep run`, the
native `fewstep-run`, embedding through `cmake --install` + find_package, and reliability
(bad files, threads, fuzzing). The ASan/LSan cycle test is in test_cpp_asan.py."""

import ctypes
import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from fewstep import _C  # noqa: E402
from fewstep.export.onnx import export_onnx  # noqa: E402
from fewstep.runtime import noise as fnoise  # noqa: E402
from fewstep.runtime import sample as py_sample  # noqa: E402
from fewstep.runtime.models import load  # noqa: E402
from fewstep.runtime.solvers import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORT_LIB = _C.find_ort_library()
# Engine vs executor, max |Δ| / max |ref| (derived in tests/test_export.py): float32 UNet engines differ by
# ≤ passes·(1 + 2w)·R·2⁻²⁴ (R ≈ 70 roundings a pass; 8.4e-6 for the 2-pass W-conditioned student, whose W is
# an input, not a CFG combination); GMM graphs compute in float64 and differ by one float32 ulp (1.2e-7).
TOL = 1e-4  # above both (verify's own float32 bound, 2·g_w·R·2⁻²⁴ per engine, is 7e-5 to 1.5e-4 on digits engines)


def _rel(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def _meta(m, key, value):
    for p in m.metadata_props:
        if p.key == key:
            p.value = value
            return m
    raise KeyError(key)


@pytest.fixture(scope="module")
def gmm():
    return load("gmm")


@pytest.fixture(scope="module")
def engines(gmm, tmp_path_factory):
    """GMM engines: stochastic DDPM with labels + CFG input (every input of the contract), a fixed
    batch one, a step graph, and broken variants."""
    d = tmp_path_factory.mktemp("engines")
    den = gmm.denoiser
    kw = dict(sample_shape=gmm.shape, num_classes=gmm.num_classes, teacher_hash=gmm.content_hash)
    plan = build("ddpm", 6, den.sigma_min, den.sigma_max)
    tiny = build("ddim", 1, den.sigma_min, den.sigma_max)
    out = {"plan": plan, "dir": d}
    export_onnx(den, plan, d / "ddpm.onnx", **kw)
    export_onnx(den, tiny, d / "fixed3.onnx", batch=3, guidance_input=False, **kw)
    export_onnx(den, tiny, d / "tiny.onnx", guidance_input=False, **kw)
    export_onnx(den, tiny, d / "step.onnx", step_graph=True, **kw)
    good = (d / "ddpm.onnx").read_bytes()
    (d / "truncated.onnx").write_bytes(good[: len(good) // 2])
    (d / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(5000))
    (d / "empty.onnx").write_bytes(b"")
    m = onnx.load(d / "ddpm.onnx")
    del m.metadata_props[:]
    onnx.save(m, d / "nometa.onnx")
    c = json.loads(next(p.value for p in onnx.load(d / "ddpm.onnx").metadata_props if p.key == "fewstep.contract"))
    onnx.save(_meta(onnx.load(d / "ddpm.onnx"), "fewstep.contract", json.dumps({**c, "sample_shape": [3]})),
              d / "badshape.onnx")
    onnx.save(_meta(onnx.load(d / "ddpm.onnx"), "fewstep.contract", '{"sample_shape": [2], "nfe": '),
              d / "badjson.onnx")
    for k in ("ddpm", "fixed3", "tiny", "step", "truncated", "garbage", "empty", "nometa", "badshape", "badjson"):
        out[k] = str(d / f"{k}.onnx")
    return out


def _ort_run(path, feeds):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# ---- same sample everywhere -------------------------------------------------------------------


def test_engine_contract(engines):
    e = _C.Engine(engines["ddpm"], threads=1)
    assert e.info == {"sample_shape": (2,), "per_sample": 2, "fixed_batch": None, "nfe": 6, "n_stochastic": 5,
                      "num_classes": 9, "null_label": 9, "guidance_input": True, "sigma_init": 80.0,
                      "compute_dtype": "float32"}
    assert json.loads(e.plan_json) == json.loads(engines["plan"].to_json())
    assert e.metadata("fewstep.format") == "fewstep.engine/1" and e.metadata("nope") is None
    assert _C.Engine(engines["fixed3"]).info["fixed_batch"] == 3


@pytest.mark.parametrize("seed", [0, 12345, 2**63 + 5])
def test_cpp_equals_ort_python_bitwise_and_executor(engines, gmm, seed):
    b = 7
    labels = np.array([0, 3, 8, 9, 1, 9, 4], np.int64)  # 9 = null label (unconditional rows)
    guidance = np.full(b, 2.5, np.float32)
    e = _C.Engine(engines["ddpm"], threads=1)
    x = e.sample(seed, b, labels=labels, guidance=guidance)
    z, eps = fnoise.draw(seed, b, (2,), 5)
    want = _ort_run(engines["ddpm"], {"z": z, "noise": eps, "class_labels": labels, "guidance": guidance})
    np.testing.assert_array_equal(x, want)  # bit-identical to ONNX Runtime from Python
    ref = py_sample(engines["plan"], gmm.denoiser, torch.from_numpy(z), cond=torch.from_numpy(labels), guidance=2.5,
                    noise=torch.from_numpy(eps)).numpy()
    assert _rel(x, ref) <= TOL
    # per-sample guidance is honoured: a different W changes only that sample
    g2 = guidance.copy()
    g2[1] = 4.0
    y = e.sample(seed, b, labels=labels, guidance=g2)
    assert not np.array_equal(y[1], x[1]) and np.array_equal(np.delete(y, 1, 0), np.delete(x, 1, 0))


def test_given_z_and_defaults(engines):
    e = _C.Engine(engines["ddpm"], threads=1)
    z = np.random.default_rng(1).standard_normal((4, 2)).astype(np.float32)
    _, eps = fnoise.draw(3, 4, (2,), 5)
    null = np.full(4, 9, np.int64)
    want = _ort_run(engines["ddpm"], {"z": z, "noise": eps, "class_labels": null, "guidance": np.ones(4, np.float32)})
    np.testing.assert_array_equal(e.sample(3, 4, z=z), want)  # labels None = null label, guidance None = 1


def _cli(*args):
    """`fewstep ...` in-process."""
    import fewstep.cli as cli

    return cli.main([str(a) for a in args])


def test_fewstep_run_equals_fewstep_sample(engines, tmp_path):
    plan_path = tmp_path / "plan.json"
    engines["plan"].save(plan_path)
    common = ["--class", 3, "--guidance", 2.0]
    assert _cli("run", engines["ddpm"], "--seed", 11, "--batch", 6, *common, "--out", tmp_path / "run.npy") == 0
    assert _cli("sample", "--model", "gmm", "--plan", plan_path, "--seed", 11, "--n", 6, *common,
                "--out", tmp_path / "s") == 0
    x, ref = np.load(tmp_path / "run.npy"), np.load(tmp_path / "s" / "samples.npy")
    assert x.shape == ref.shape == (6, 2) and _rel(x, ref) <= TOL
    z, eps = fnoise.draw(11, 6, (2,), 5)
    want = _ort_run(engines["ddpm"], {"z": z, "noise": eps, "class_labels": np.full(6, 3, np.int64),
                                      "guidance": np.full(6, 2.0, np.float32)})
    np.testing.assert_array_equal(x, want)
    # --noise: z from the file (stochastic rows from seed 0), as `fewstep sample --noise`
    np.save(tmp_path / "z.npy", np.random.default_rng(5).standard_normal((5, 2)).astype(np.float32))
    assert _cli("run", engines["ddpm"], "--noise", tmp_path / "z.npy", "--class", 1, "--out", tmp_path / "r2.npy") == 0
    assert _cli("sample", "--model", "gmm", "--plan", plan_path, "--noise", tmp_path / "z.npy", "--class", 1,
                "--out", tmp_path / "s2") == 0
    assert _rel(np.load(tmp_path / "r2.npy"), np.load(tmp_path / "s2" / "samples.npy")) <= TOL
    # bad input is one line + exit 2
    assert _cli("run", engines["ddpm"], "--class", 12, "--out", tmp_path / "x.npy") == 2
    assert _cli("run", engines["nometa"], "--out", tmp_path / "x.npy") == 2
    assert _cli("run", tmp_path / "missing.onnx", "--out", tmp_path / "x.npy") == 2


# ---- every guidance variant: the contract matches the graph, everywhere ---------------------------


def _fixed_w(plan, w, rows=None):
    """``plan`` with W fixed to ``w`` on ``rows`` (default: every row)."""
    from fewstep.runtime.plan import Row

    rows = range(plan.nfe) if rows is None else rows
    return plan.replace(rows=tuple(Row(**{**r.__dict__, "guidance": w}) if e in rows else r
                                   for e, r in enumerate(plan.rows)))


@pytest.fixture(scope="module")
def variants(gmm, tmp_path_factory):
    """One engine per way guidance can enter a graph: (name, path, plan, denoiser, num_classes, W values a call
    may pass, whether the graph picks its rows by W)."""
    d = tmp_path_factory.mktemp("variants")
    den = gmm.denoiser
    ddim = build("ddim", 2, den.sigma_min, den.sigma_max)
    ddpm = build("ddpm", 3, den.sigma_min, den.sigma_max)  # stochastic: a noise input too
    student = load("digits-guided")  # the W-conditioned student (training/guided.py): W is a network input
    sp = build("dpmpp-2m", 2, student.denoiser.sigma_min, student.denoiser.sigma_max)
    kw = dict(sample_shape=gmm.shape, num_classes=gmm.num_classes, teacher_hash=gmm.content_hash)
    mixed = _fixed_w(ddim, 4.0, rows=[0])
    cases = [  # name, denoiser, plan, export kwargs, guidance input?, rows picked by W (a Range)?
        ("cfg_input", den, ddpm, kw, True, True),
        ("cfg_no_input", den, ddim, {**kw, "guidance_input": False}, False, False),
        ("fixed_w1", den, _fixed_w(ddpm, 1.0), kw, False, False),
        ("fixed_w2", den, _fixed_w(ddim, 2.0), kw, False, False),
        ("fixed_row0_input_rest", den, mixed, kw, True, True),
        ("no_classes", den, ddpm, {**kw, "num_classes": None}, False, False),
        ("student_w_input", student.denoiser, sp, dict(sample_shape=student.shape, num_classes=student.num_classes,
                                                        teacher_hash=student.content_hash), True, False),
    ]
    out = []
    for name, dn, plan, ekw, has_w, branch in cases:
        path = str(d / f"{name}.onnx")
        res = export_onnx(dn, plan, path, **ekw)
        assert res.contract["guidance_input"] is has_w, name
        assert any(n.op_type == "Range" for n in onnx.load(path).graph.node) is branch, name
        out.append((name, path, plan, dn, ekw["num_classes"], [1.0, 2.0, "mixed"] if has_w else [None]))
    return out


def test_every_guidance_variant_runs_everywhere(variants, native, tmp_path):
    """Each variant loads in _C.Engine, `fewstep run`, the native fewstep-run and ONNX Runtime; the C++ sample is
    bit-identical to ONNX Runtime's on the same inputs and equals the executor within the float32 export tolerance
    (TOL: the GMM graph computes in float64 like its torch code, the student in float32; see TOL for both)."""
    b, seed = 6, 21
    for name, path, plan, den, ncls, ws in variants:
        e = _C.Engine(path, threads=1)
        info = e.info
        assert (info["num_classes"] or None) == ncls and info["n_stochastic"] == len(plan.stochastic_rows), name
        labels = None if ncls is None else (np.arange(b) % ncls).astype(np.int64)
        z, eps = fnoise.draw(seed, b, tuple(info["sample_shape"]), info["n_stochastic"])
        for w in ws:
            g = None if w is None else (np.array([1, 2, 1, 3, 1, 0.5], np.float32) if w == "mixed"
                                        else np.full(b, w, np.float32))
            x = e.sample(seed, b, labels=labels, guidance=g)
            feeds = {"z": z, **({"noise": eps} if info["n_stochastic"] else {}),
                     **({"class_labels": labels} if labels is not None else {}),
                     **({"guidance": g} if g is not None else {})}
            np.testing.assert_array_equal(x, _ort_run(path, feeds), err_msg=f"{name} W={w}")
            t = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
            noise = t(eps) if info["n_stochastic"] else None
            for i in range(b) if w == "mixed" else [slice(None)]:  # the executor takes one W per call
                sl = slice(i, i + 1) if w == "mixed" else i
                wi = None if g is None else float(g[sl][0])
                with torch.no_grad():
                    ref = py_sample(plan, den, t(z[sl]), cond=None if labels is None else t(labels[sl]), guidance=wi,
                                    noise=None if noise is None else noise[:, sl]).numpy()
                assert _rel(x[sl], ref) <= TOL, (name, w, i)
        # `fewstep run` and the native fewstep-run load it and give the same sample (W = 1 where there is a W)
        extra = ["--guidance", "1"] if ws[0] is not None else []
        out = tmp_path / f"{name}.npy"
        assert _cli("run", path, "--seed", seed, "--batch", b, "--threads", 1, *extra, "--out", out) == 0, name
        want = e.sample(seed, b, labels=labels, guidance=None if ws[0] is None else np.ones(b, np.float32))
        np.testing.assert_array_equal(np.load(out), want)
        p = subprocess.run([str(native / "fewstep-run"), path, "--seed", str(seed), "--n", str(b), "--threads",
                            "1", *extra, "--out", str(tmp_path / f"{name}_native.npy")], env=_env(),
                           capture_output=True, text=True)
        assert p.returncode == 0, (name, p.stderr)
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}_native.npy"), want)


def test_stale_contract_names_the_fix(variants, tmp_path):
    """A W-baked engine whose contract still lists a guidance input (as exporters before issue 19 wrote it)."""
    path = next(p for name, p, *_ in variants if name == "fixed_w1")
    m = onnx.load(path)
    c = json.loads(next(p.value for p in m.metadata_props if p.key == "fewstep.contract"))
    c = {**c, "guidance_input": True, "inputs": c["inputs"] + [{"name": "guidance", "dtype": "float32",
                                                                 "shape": ["batch"]}]}
    onnx.save(_meta(m, "fewstep.contract", json.dumps(c)), tmp_path / "stale.onnx")
    with pytest.raises(ValueError, match="export it again"):
        _C.Engine(str(tmp_path / "stale.onnx"))
    e = _C.Engine(path)
    with pytest.raises(ValueError, match="has no guidance input"):
        e.sample(0, 2, labels=np.zeros(2, np.int64), guidance=np.full(2, 2.0, np.float32))


def test_bench_latency_harness(tmp_path):
    """`fewstep bench latency`: interleaved rounds whose order rotates, an idle gap before every call, W = 1 and
    W = 2 for an engine with a guidance input, every path's output checked."""
    from fewstep.export.latency import interleaved, wait_quiet

    def spin(seconds):  # a worker thread burning CPU, as ONNX Runtime's do after a run
        t_end = time.perf_counter() + seconds
        while time.perf_counter() < t_end:
            pass

    worker = threading.Thread(target=spin, args=(0.3,))
    t0 = time.perf_counter()
    worker.start()
    assert wait_quiet(0)
    waited = time.perf_counter() - t0
    worker.join()
    assert waited >= 0.3  # not before the spinning thread stopped
    t0 = time.perf_counter()
    assert wait_quiet(0) and time.perf_counter() - t0 < 0.3 * 2  # a quiet process: one 20 ms window (or a few)
    calls = []
    t = interleaved({k: (lambda k=k: calls.append((k, time.perf_counter()))) for k in "abc"}, 3, gap_ms=5, warmup=0)
    assert [k for k, _ in calls] == list("abc" "bca" "cab") and all(len(v) == 3 for v in t.values())
    assert min(b[1] - a[1] for a, b in zip(calls, calls[1:])) >= 0.005  # the gap precedes every call
    assert _cli("bench", "latency", "--model", "gmm", "--solver", "ddim", "--nfe", 2, "--batch", 3, "--repeats", 2,
                "--gap-ms", 1, "--out", tmp_path) == 0
    r = json.loads((tmp_path / "latency_gmm_ddim-2_b3_t1.json").read_text())
    assert sorted(r["by_guidance"]) == ["W=1", "W=2"] and r["gap_ms"] == 1 and r["repeats"] == 2
    assert all(r["cpp_equals_ort_python"].values()) and max(r["cpp_vs_executor_max_rel_err"].values()) <= TOL
    assert all(v > 0 for x in r["by_guidance"].values() for v in x["median_us"].values())
    assert "W=2" in (tmp_path / "latency_gmm_ddim-2_b3_t1.md").read_text()
    assert _cli("bench", "latency", "--model", "gmm", "--solver", "ddim", "--nfe", 2, "--gap-ms", -1) == 2


# ---- reliability ------------------------------------------------------------------------------


@pytest.mark.parametrize("name,match", [
    ("truncated", "not a loadable ONNX model"), ("garbage", "not a loadable ONNX model"), ("empty", "empty file"),
    ("nometa", "without fewstep metadata"), ("step", "only sampler engines"), ("badshape", "shape does not match"),
    ("badjson", "malformed JSON"),
])
def test_bad_files_raise(engines, name, match):
    with pytest.raises(ValueError, match=match):
        _C.Engine(engines[name])


def test_bad_arguments_raise(engines):
    e = _C.Engine(engines["ddpm"], threads=1)
    with pytest.raises(ValueError, match="label 10 of sample 1"):
        e.sample(0, 2, labels=np.array([0, 10]))
    with pytest.raises(ValueError, match="labels must be"):
        e.sample(0, 3, labels=np.array([0, 1]))
    with pytest.raises(ValueError, match="not finite"):
        e.sample(0, 1, guidance=np.array([np.nan], np.float32))
    with pytest.raises(ValueError, match="batch"):
        e.sample(0, 0)
    with pytest.raises(ValueError, match="exported for batch 3"):
        _C.Engine(engines["fixed3"]).sample(0, 4, labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="provider"):
        _C.Engine(engines["ddpm"], provider="tpu")
    with pytest.raises(RuntimeError, match="ONNX Runtime"):  # one library per process: already loaded
        _C.Engine(engines["ddpm"], ort_library="/nonexistent/libonnxruntime.so")


def test_c_api_status_codes(engines, native):
    """Through ctypes on libfewstep.so: every failure is a status code + thread-local message."""
    lib = ctypes.CDLL(str(native / "libfewstep.so"))
    lib.fewstep_last_error.restype = ctypes.c_char_p
    lib.fewstep_engine_load.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.fewstep_sample.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.fewstep_engine_free.argtypes = [ctypes.c_void_p]
    os.environ["FEWSTEP_ORT_LIBRARY"] = ORT_LIB  # params NULL: the library comes from the environment
    try:
        want = {"missing": 5, "truncated": 6, "garbage": 6, "empty": 6, "nometa": 6, "step": 6, "badshape": 6}
        for name, code in want.items():
            h = ctypes.c_void_p(1)
            path = str(engines["dir"] / "missing.onnx") if name == "missing" else engines[name]
            assert lib.fewstep_engine_load(path.encode(), None, ctypes.byref(h)) == code, name
            assert h.value is None and lib.fewstep_last_error()
        assert lib.fewstep_engine_load(None, None, None) == 1
        h = ctypes.c_void_p()
        assert lib.fewstep_engine_load(engines["tiny"].encode(), None, ctypes.byref(h)) == 0
        out = np.zeros(8, np.float32)
        labels = np.array([0, 1, 2, 30], np.int64)
        assert lib.fewstep_sample(h, 0, 4, labels.ctypes.data, None, out.ctypes.data, 7) == 3  # buffer too small
        assert lib.fewstep_sample(h, 0, 4, labels.ctypes.data, None, out.ctypes.data, 8) == 2  # label 30
        assert b"label 30" in lib.fewstep_last_error()
        assert lib.fewstep_sample(h, 0, 0, None, None, out.ctypes.data, 8) == 1
        assert lib.fewstep_sample(None, 0, 1, None, None, out.ctypes.data, 8) == 1
        labels[3] = 3
        assert lib.fewstep_sample(h, 0, 4, labels.ctypes.data, None, out.ctypes.data, 8) == 0
        lib.fewstep_engine_free(h)
        lib.fewstep_engine_free(None)
    finally:
        del os.environ["FEWSTEP_ORT_LIBRARY"]


def test_eight_threads_equal_serial(engines):
    e = _C.Engine(engines["ddpm"], threads=1)
    labels = np.arange(16, dtype=np.int64) % 10
    serial = [e.sample(s, 16, labels=labels) for s in range(32)]
    got = [None] * 32

    def work(t):
        for s in range(t, 32, 8):
            got[s] = e.sample(s, 16, labels=labels)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in range(32):
        np.testing.assert_array_equal(got[s], serial[s])
    assert not np.array_equal(serial[0], serial[1])


def test_sample_releases_the_gil(engines):
    """While one thread is inside Engine.sample (~1 s), Python code in another thread keeps running:
    the longest pause the main thread sees is well below the length of the call."""
    e = _C.Engine(engines["ddpm"], threads=1)
    labels = np.zeros(40_000, np.int64)
    done = threading.Event()
    span = []

    def work():
        t0 = time.perf_counter()
        e.sample(0, len(labels), labels=labels)
        span.append(time.perf_counter() - t0)
        done.set()

    t = threading.Thread(target=work)
    last, gap = time.perf_counter(), 0.0
    t.start()
    while not done.is_set():
        now = time.perf_counter()
        gap, last = max(gap, now - last), now
    t.join()
    assert span[0] > 0.2 and gap < 0.5 * span[0], (gap, span)  # GIL held through the run: gap ≈ span


def test_fuzz_loader(engines, tmp_path):
    """Bounded atheris run over the loader: random files, mutated engines, fuzzed contracts."""
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = Path(engines["tiny"]).read_bytes()
    contract = next(p.value for p in onnx.load(engines["tiny"]).metadata_props if p.key == "fewstep.contract")
    (corpus / "contract").write_bytes(contract.encode() + b"\x02")  # atheris takes the mode from the last byte
    (corpus / "engine").write_bytes(good[:2000] + b"\x01")
    (corpus / "raw").write_bytes(good[:300] + b"\x00")
    env = {**os.environ, "FEWSTEP_FUZZ_ENGINE": engines["tiny"]}
    p = subprocess.run([sys.executable, str(ROOT / "tests/fuzz/fuzz_loader.py"), "-runs=600", "-seed=1",
                        "-max_len=20000", "-len_control=0", str(corpus)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    stats = [ln for ln in p.stdout.splitlines() if ln.startswith("fuzz stats:")][-1]
    assert "mode2_loaded" in stats and "mode2_rejected_contract" in stats and "mode0_rejected" in stats, stats


# ---- native build: fewstep-run, install, find_package, minimal.c ------------------------------


def _cmake():
    exe = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if not exe or not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("cmake and a C++ compiler are needed for the native build")
    return exe


def _gen():
    return ["-G", "Ninja"] if shutil.which("ninja") else []


def ort_headers_arg():
    """Reuse the headers an earlier build fetched (make dev / the wheel build: ONNX Runtime's C API and
    nlohmann/json); else CMake fetches them."""
    args = []
    for var, pattern in (("ORT", "onnxruntime-headers/include/onnxruntime/onnxruntime_c_api.h"),
                         ("JSON", "nlohmann-headers/include/nlohmann/json.hpp")):
        hits = sorted(glob.glob(str(ROOT / "build/*" / pattern)))
        if hits:
            d = Path(hits[0]).parent
            args.append(f"-DFEWSTEP_{var}_INCLUDE_DIR={d if var == 'ORT' else d.parent}")
    return args


_NATIVE: list[Path] = []  # the one build of this pytest session (the test_cpp_* modules share it)


def native_build(tmp_path_factory) -> Path:
    """libfewstep + fewstep-run: built in a temp dir, or $FEWSTEP_NATIVE_BUILD (a build dir of this checkout
    already configured with -DFEWSTEP_PYTHON=OFF), brought up to date, so a C++ change is tested at once.
    Built once per session: the modules that need it only read it (run its programs, install from it)."""
    if not _NATIVE:
        _NATIVE.append(_native_build(tmp_path_factory))
    return _NATIVE[0]


def _native_build(tmp_path_factory) -> Path:
    cmake = _cmake()
    given = os.environ.get("FEWSTEP_NATIVE_BUILD")
    if given:
        p = subprocess.run([cmake, "--build", given], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        return Path(given)
    b = tmp_path_factory.mktemp("native")
    subprocess.run([cmake, "-S", ROOT, "-B", b, *_gen(), "-DCMAKE_BUILD_TYPE=Release", "-DFEWSTEP_PYTHON=OFF",
                    *ort_headers_arg()], check=True, capture_output=True)
    p = subprocess.run([cmake, "--build", b], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return b


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    return native_build(tmp_path_factory)


def _env():
    return {**os.environ, "FEWSTEP_ORT_LIBRARY": ORT_LIB}


def test_native_cli(engines, native, tmp_path):
    exe = str(native / "fewstep-run")
    run = [exe, engines["ddpm"], "--seed", "9", "--n", "5", "--class", "2", "--guidance", "1.5", "--threads", "1"]
    p = subprocess.run([*run, "--out", tmp_path / "x.npy", "--bench", "20"], env=_env(), capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    e = _C.Engine(engines["ddpm"], threads=1)
    want = e.sample(9, 5, labels=np.full(5, 2), guidance=np.full(5, 1.5, np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), want)
    lat = [ln for ln in p.stdout.splitlines() if ln.startswith("latency ms:")][0].split()
    p50, p90, p99 = float(lat[3]), float(lat[5]), float(lat[7])
    assert 0 < p50 <= p90 <= p99 and "samples/s:" in p.stdout
    # --noise
    z = np.random.default_rng(2).standard_normal((3, 2)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    p = subprocess.run([exe, engines["ddpm"], "--noise", tmp_path / "z.npy", "--n", "3", "--class", "4",
                        "--out", tmp_path / "y.npy"], env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), e.sample(0, 3, labels=np.full(3, 4), z=z))
    # errors: usage 2, engine 1, never a crash
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3), np.float32))  # not N × sample_shape (2,)
    for args, rc in [(["--class", "12"], 2), (["--n", "x"], 2), (["--noise", tmp_path / "wrong.npy"], 2)]:
        q = subprocess.run([exe, engines["ddpm"], *map(str, args), "--out", tmp_path / "e.npy"], env=_env(),
                           capture_output=True, text=True)
        assert q.returncode == rc and q.stderr.startswith("fewstep-run: error:"), q.stderr
    q = subprocess.run([exe, engines["tiny"], "--ort-library", "/nonexistent/libonnxruntime.so", "--out",
                        tmp_path / "e.npy"], capture_output=True, text=True)
    assert q.returncode == 2 and "cannot load ONNX Runtime" in q.stderr  # bad input: exit 2, as `fewstep`
    for name in ("garbage", "nometa", "truncated"):
        q = subprocess.run([exe, engines[name], "--out", tmp_path / "e.npy"], env=_env(), capture_output=True,
                           text=True)
        assert q.returncode == 2 and "fewstep-run: error:" in q.stderr


def test_install_find_package_and_minimal_c(engines, native, tmp_path):
    cmake = _cmake()
    prefix = tmp_path / "prefix"
    subprocess.run([cmake, "--install", native, "--prefix", prefix], check=True, capture_output=True)
    assert (prefix / "include/fewstep.h").exists() and (prefix / "include/fewstep.hpp").exists()
    assert glob.glob(str(prefix / "lib*/libfewstep.so*")) and glob.glob(str(prefix / "lib*/cmake/fewstep"))
    b = tmp_path / "embed"
    p = subprocess.run([cmake, "-S", ROOT / "examples/find_package", "-B", b, *_gen(), f"-DCMAKE_PREFIX_PATH={prefix}",
                        "-DCMAKE_C_FLAGS=-Wall -Werror -pedantic"], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = subprocess.run([cmake, "--build", b], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    p = subprocess.run([b / "minimal", engines["ddpm"], "4", "6", tmp_path / "m.npy"], env=_env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    e = _C.Engine(engines["ddpm"], threads=1)
    want = e.sample(4, 6, labels=np.arange(6) % 9)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), want)
    p = subprocess.run([b / "embed", engines["ddpm"], "4", "6"], env=_env(), capture_output=True, text=True)
    assert p.returncode == 0 and f"sum={want.astype(np.float64).sum():.9g}" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([b / "minimal", engines["nometa"], "0", "1", tmp_path / "n.npy"], env=_env(),
                       capture_output=True, text=True)
    assert p.returncode == 1 and "without fewstep metadata" in p.stderr
    for seed, batch in (("abc", "1"), ("-1", "1"), ("18446744073709551616", "1"), ("1", "0x2"), ("1", "")):
        p = subprocess.run([b / "minimal", engines["ddpm"], seed, batch, tmp_path / "bad.npy"], env=_env(),
                           capture_output=True, text=True)
        assert p.returncode == 2 and "must be" in p.stderr and not (tmp_path / "bad.npy").exists(), (seed, batch)
    # the installed fewstep-run finds libfewstep through its RPATH
    p = subprocess.run([prefix / "bin/fewstep-run", engines["tiny"], "--n", "2", "--out", tmp_path / "i.npy"],
                       env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_native_cli_vocabulary(engines, native, tmp_path):
    """--version, --class none, the old --batch with its deprecation line, a line on success."""
    exe = str(native / "fewstep-run")
    p = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == f"fewstep-run {_C.version()}"
    p = subprocess.run([exe, engines["ddpm"], "--seed", "3", "--batch", "4", "--class", "none", "--out",
                        tmp_path / "u.npy"], env=_env(), capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == "fewstep-run: warning: --batch is deprecated; use --n\n", p.stderr
    assert p.stdout.startswith("4 samples at NFE 6 in ") and p.stdout.rstrip().endswith("u.npy")
    e = _C.Engine(engines["ddpm"], threads=1)
    null = e.info["null_label"]
    np.testing.assert_array_equal(np.load(tmp_path / "u.npy"), e.sample(3, 4, labels=np.full(4, null)))
    p = subprocess.run([exe, engines["ddpm"], "--seed", "18446744073709551615", "--out", tmp_path / "w.npy"],
                       env=_env(), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr  # 2^64 - 1 is a seed; -1 is not
    p = subprocess.run([exe, engines["ddpm"], "--seed", "-1", "--out", tmp_path / "w.npy"], env=_env(),
                       capture_output=True, text=True)
    assert p.returncode == 2 and "--seed" in p.stderr


def test_native_cli_hostile(engines, native, gmm, tmp_path):
    """fewstep-run: a NaN result is exit 3 with nothing written; --out a directory leaves no temporary file;
    absurd threads are refused (ONNX Runtime itself crashes at 10^5)."""
    from fewstep.runtime.plan import Row

    exe = str(native / "fewstep-run")
    den = gmm.denoiser
    blow = build("ddim", 2, den.sigma_min, den.sigma_max)
    blow = blow.replace(rows=tuple(Row(**{**r.__dict__, "c": 1e30}) for r in blow.rows))  # x·1e30·1e30: inf
    export_onnx(den, blow, tmp_path / "blow.onnx", sample_shape=gmm.shape, num_classes=gmm.num_classes,
                guidance_input=False)
    out = tmp_path / "o"
    out.mkdir()
    cases = [([tmp_path / "blow.onnx", "--n", "2", "--out", out / "x.npy"], 3, "NaN or inf"),
             ([engines["tiny"], "--n", "2", "--out", out], 2, "cannot write"),
             ([engines["tiny"], "--n", "2", "--threads", "100000", "--out", out / "y.npy"], 2, "threads")]
    for args, rc, match in cases:
        p = subprocess.run([exe, *map(str, args)], env=_env(), capture_output=True, text=True)
        assert p.returncode == rc and p.stderr.count("\n") == 1 and match in p.stderr, (args, p.stderr)
        assert list(out.iterdir()) == [] and not [f for f in tmp_path.iterdir() if ".tmp" in f.name or
                                                  f.name.startswith(".o.")]
    hdr = tmp_path / "claims.npy"  # a header promising 10^11 samples: refused before allocating
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**11, 2)})
    hdr.write_bytes(buf.getvalue() + b"\0" * 64)
    p = subprocess.run([exe, engines["tiny"], "--noise", hdr, "--out", out / "z.npy"], env=_env(), capture_output=True,
                       text=True)
    assert p.returncode == 2 and "truncated" in p.stderr and list(out.iterdir()) == [], p.stderr
