"""Hostile input: every bad plan, noise file, model folder or argument is one line, exit 2, nothing written.

The README's promise, kept by two kinds of test: the cases a hostile user found (2026-12-01) as
plain regressions, and a property-based fuzz (Hypothesis, derandomized so CI sees the same
examples every run) that generates plans, noise files and model folders and checks only the
contract: exit code 2 (or 0 for input that happens to be valid), one line on stderr, no
traceback, nothing left in the output directory. Exit 1 is an internal error: a bug, never
the answer to bad input.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fewstep.cli import main
from fewstep.runtime.models import WEIGHTS_DIR
from fewstep.runtime.solvers import build

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    """In-process `fewstep …` (the subprocess costs a torch import per call): exit code, stderr lines."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's errors exit through Parser.error
        rc = exc.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, [line for line in err.splitlines() if line.strip()]


def assert_refused(rc, lines, out: Path, match: str | None = None):
    assert rc == 2, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("fewstep: error: "), lines
    if match:
        assert match in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


# --- regressions: the cases of the hostile-input report ------------------------------------------
def _plan_text(tmp_path, text: str | bytes) -> Path:
    p = tmp_path / "plan.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


GOOD = json.loads(build("ddim", 2, 0.002, 80.0).to_json())


@pytest.mark.parametrize("text,match", [
    ('{"format": "fewstep.plan/1", "n": ' + "9" * 5001 + "}", "5001 digits"),
    ('{"format": "fewstep.plan/1", "sigma_init": 1e400}', "out of float64 range"),
    ("[" * 100_000 + "]" * 100_000, "nested more than"),
    (json.dumps({**GOOD, "provenance": {"teacher_hash": 5}}), "teacher_hash"),
    (json.dumps({**GOOD, "rows": GOOD["rows"] * 600}), "at most 1000"),
    (b"\x00\xff\xfe garbage", "UTF-8"),
])
def test_hostile_plan_files(capsys, tmp_path, text, match):
    out = tmp_path / "out"
    rc, lines = run_cli(capsys, "sample", "--model", "gmm", "--plan", _plan_text(tmp_path, text), "--out", out)
    assert_refused(rc, lines, out, match)


@pytest.mark.parametrize("path,match", [("/dev/zero", "not a regular file"), ("/", "is a directory")])
def test_plan_that_is_not_a_file(capsys, tmp_path, path, match):
    rc, lines = run_cli(capsys, "sample", "--model", "gmm", "--plan", path, "--out", tmp_path / "o")
    assert_refused(rc, lines, tmp_path / "o", match)


def test_fifo_plan_does_not_hang(capsys, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rc, lines = run_cli(capsys, "sample", "--model", "gmm", "--plan", fifo, "--out", tmp_path / "o")
    assert_refused(rc, lines, tmp_path / "o", "not a regular file")


@pytest.mark.parametrize("args,match", [
    (["--seed", "-1"], "seed must be in [0, 2^64)"),
    (["--seed", str(2**70)], "seed must be in [0, 2^64)"),
    (["--n", "1e8"], "invalid int value"),
    (["--n", "100000000"], "ask for fewer samples"),
    (["--n", "100000000"], "100,000,000 samples"),
    (["--n", "0"], "--n must be ≥ 1"),
])
def test_hostile_sample_arguments(capsys, tmp_path, args, match):
    out = tmp_path / "o"
    rc, lines = run_cli(capsys, "sample", "--model", "digits", "--solver", "ddim", "--nfe", "2", *args, "--out", out)
    assert_refused(rc, lines, out, match)


def test_nfe_cap_answers_at_once(capsys, tmp_path):
    rc, lines = run_cli(capsys, "sample", "--model", "gmm", "--solver", "ddim", "--nfe", "10000", "--out", tmp_path)
    assert_refused(rc, lines, tmp_path, "at most 1000")


def _npy_header(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


@pytest.mark.parametrize("data,match", [
    (b"hello", "not a .npy file"),
    (_npy_header((10**11, 1, 8, 8)), "header claims"),
    (_npy_header((4, 1, 8, 8)) + b"\0" * 100, "truncated"),
    (_npy_header((2,), "|O") + b"\0" * 16, "Python objects"),
])
def test_hostile_noise_files(capsys, tmp_path, data, match):
    f = tmp_path / "z.npy"
    f.write_bytes(data)
    out = tmp_path / "o"
    rc, lines = run_cli(capsys, "sample", "--model", "digits", "--solver", "ddim", "--nfe", "2", "--noise", f,
                        "--out", out)
    assert_refused(rc, lines, out, match)


def _teacher_copy(tmp_path: Path, name="m") -> Path:
    d = tmp_path / name
    d.mkdir()
    for ext in ("safetensors", "json"):
        shutil.copy(os.path.join(WEIGHTS_DIR, f"digits_teacher.{ext}"), d / f"digits_teacher.{ext}")
    return d


def test_hostile_model_folders(capsys, tmp_path):
    from safetensors.torch import load_file, save_file

    cases = {}
    d = _teacher_copy(tmp_path, "truncated")
    w = d / "digits_teacher.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    cases[d] = "deserializing header"
    d = _teacher_copy(tmp_path, "garbage")
    (d / "digits_teacher.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    cases[d] = "cannot load it"
    d = _teacher_copy(tmp_path, "missing")
    t = load_file(d / "digits_teacher.safetensors")
    t.pop(sorted(t)[3])
    save_file(t, d / "digits_teacher.safetensors")
    cases[d] = "missing"
    d = _teacher_copy(tmp_path, "huge")  # a config asking for a network 3,000× wider than its weights
    meta = json.loads((d / "digits_teacher.json").read_text())
    meta["config"]["channels"] = [100_000] * len(meta["config"]["channels"])
    (d / "digits_teacher.json").write_text(json.dumps(meta))
    cases[d] = "the config says"
    d = _teacher_copy(tmp_path, "badjson")
    (d / "digits_teacher.json").write_text('{"config": ')
    cases[d] = "not valid JSON"
    for bundle, index in {"abs": {"format": "fewstep.students/1", "stage1": "/etc/passwd", "students": {}},
                          "up": {"format": "fewstep.students/1", "stage1": "../m/x.safetensors"},
                          "notdict": [1, 2]}.items():
        d = tmp_path / bundle
        d.mkdir()
        (d / "students.json").write_text(json.dumps(index))
        cases[d] = "students.json"
    out = tmp_path / "out"
    for model, match in cases.items():
        rc, lines = run_cli(capsys, "sample", "--model", model, "--solver", "ddim", "--nfe", "2", "--out", out)
        assert_refused(rc, lines, out, match)


@pytest.mark.parametrize("cmd", ["sample", "eval"])
def test_non_finite_result_is_an_error_and_writes_nothing(capsys, tmp_path, cmd):
    """--guidance 1e30 is finite but drives every sample to NaN: exit 3, one line, no file."""
    out = tmp_path / "o"
    args = [cmd, "--model", "digits", "--solver", "ddim", "--nfe", "2", "--class", "3", "--guidance", "1e30",
            "--n", "4"] + (["--out", out] if cmd == "sample" else [])
    rc, lines = run_cli(capsys, *args)
    assert rc == 3 and len(lines) == 1 and "NaN or inf" in lines[0], (rc, lines)
    assert not out.exists()


def test_plan_with_huge_coefficient_is_not_finite(capsys, tmp_path):
    bad = json.loads(json.dumps(GOOD))
    bad["rows"][0]["c"] = 1e300
    bad["rows"][1]["c"] = 1e300
    out = tmp_path / "o"
    rc, lines = run_cli(capsys, "sample", "--model", "gmm", "--plan", _plan_text(tmp_path, json.dumps(bad)),
                        "--n", "4", "--out", out)
    assert rc == 3 and len(lines) == 1, (rc, lines)
    assert not out.exists()


def test_errors_never_name_temporary_files(tmp_path):
    from fewstep.runtime.plan import atomic_write_bytes

    with pytest.raises(OSError) as exc:
        atomic_write_bytes("/proc/fewstep-test", b"x")
    assert exc.value.filename == "/proc/fewstep-test" and ".tmp" not in str(exc.value)
    target = tmp_path / "x.npy"
    (tmp_path / "x.npy.tmp").write_bytes(b"someone else's file")  # the old fixed temp name
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and (tmp_path / "x.npy.tmp").read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npy", "x.npy.tmp"]


def test_subprocess_cli_keeps_one_line():
    """The same contract through the real entry point (exit code and stderr of a process)."""
    p = subprocess.run([sys.executable, "-m", "fewstep", "sample", "--model", "gmm", "--solver", "ddim",
                        "--nfe", "2", "--seed", "-5", "--out", "/nonexistent-dir/x"], capture_output=True, text=True,
                       cwd="/")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("fewstep: error: "), p.stderr


# --- property-based fuzz ---------------------------------------------------------------------------
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_value = st.recursive(json_leaf, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                          max_leaves=12)
FIELDS = ["format", "name", "sigma_init", "rows", "provenance", "sigma", "a", "p", "c", "q", "g", "guidance", "s"]


@st.composite
def hostile_plans(draw) -> str:
    """Mostly a valid plan with a few fields replaced by arbitrary JSON; sometimes raw text."""
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "json", "text"]))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_value))
    plan = json.loads(json.dumps(GOOD))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(FIELDS))
        target = plan if key in GOOD else plan["rows"][draw(st.integers(0, len(plan["rows"]) - 1))]
        if draw(st.booleans()):
            target[key] = draw(json_value)
        else:
            target.pop(key, None)
    return json.dumps(plan)


@FUZZ
@given(text=hostile_plans())
def test_fuzz_plans(capsys, tmp_path_factory, text):
    d = tmp_path_factory.mktemp("fz")
    out = d / "out"
    rc, lines = run_cli(capsys, "sample", "--model", "gmm", "--plan", _plan_text(d, text), "--n", "3", "--out", out)
    if rc == 0:
        assert (out / "samples.npy").is_file()
        return
    assert rc in (2, 3), (rc, lines, text[:300])
    assert len(lines) == 1 and lines[0].startswith("fewstep: error: "), lines
    assert not out.exists()


@st.composite
def hostile_noise(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "header", "array"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "header":
        shape = tuple(draw(st.lists(st.integers(0, 10**12), max_size=5)))
        descr = draw(st.sampled_from(["<f4", "<f8", "|O", "<i8", "|b1", "<c8", "V3"]))
        return _npy_header(shape, descr) + draw(st.binary(max_size=600))
    shape = tuple(draw(st.lists(st.integers(1, 9), max_size=4)))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.int32, np.float16]))
    arr = np.full(shape, draw(st.sampled_from([0.0, 1.0, math.inf, math.nan])), dtype=np.float64)
    buf = io.BytesIO()
    with np.errstate(invalid="ignore"):  # NaN → int32 is the point of the example
        np.save(buf, arr.astype(dtype))
    return buf.getvalue()


@FUZZ
@given(data=hostile_noise())
def test_fuzz_noise_files(capsys, tmp_path_factory, data):
    d = tmp_path_factory.mktemp("fz")
    (d / "z.npy").write_bytes(data)
    out = d / "out"
    rc, lines = run_cli(capsys, "sample", "--model", "gmm", "--solver", "ddim", "--nfe", "2", "--noise",
                        d / "z.npy", "--out", out)
    if rc == 0:
        return
    assert rc == 2, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("fewstep: error: "), lines
    assert not out.exists()


@st.composite
def hostile_checkpoints(draw) -> tuple[bytes, str]:
    """The shipped teacher's files, one of them cut, overwritten in places, or its config mutated."""
    w = Path(WEIGHTS_DIR, "digits_teacher.safetensors").read_bytes()
    meta = json.loads(Path(WEIGHTS_DIR, "digits_teacher.json").read_text())
    kind = draw(st.sampled_from(["cut", "splice", "config"]))
    if kind == "cut":
        w = w[: draw(st.integers(0, len(w) - 1))]
    elif kind == "splice":
        at = draw(st.integers(0, 2000))
        w = w[:at] + draw(st.binary(min_size=1, max_size=64)) + w[at + 64:]
    else:
        key = draw(st.sampled_from(sorted(meta["config"]) + ["sigma_data", "config", "format"]))
        target = meta["config"] if key in meta["config"] else meta
        target[key] = draw(json_value)
    return w, json.dumps(meta)


@FUZZ
@given(files=hostile_checkpoints())
def test_fuzz_model_folders(capsys, tmp_path_factory, files):
    d = tmp_path_factory.mktemp("fz")
    m = d / "model"
    m.mkdir()
    (m / "digits_teacher.safetensors").write_bytes(files[0])
    (m / "digits_teacher.json").write_text(files[1])
    out = d / "out"
    rc, lines = run_cli(capsys, "sample", "--model", m, "--solver", "ddim", "--nfe", "2", "--n", "2", "--out", out)
    if rc == 0:  # a splice inside a weight's bytes is still a valid checkpoint
        return
    assert rc in (2, 3), (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("fewstep: error: "), lines
    assert not out.exists()



@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from pipeline_fixtures import build_sd

    return Path(build_sd(str(tmp_path_factory.mktemp("sd") / "sd")))


PIPELINE_CONFIGS = ["unet/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                    "vae/config.json", "tokenizer/tokenizer_config.json", "model_index.json"]


@FUZZ
@given(sub=st.sampled_from(PIPELINE_CONFIGS), pick=st.integers(0, 1000), value=json_value)
def test_fuzz_pipeline_folders(capsys, tmp_path_factory, sd_folder, sub, pick, value):
    """One field of one config of a tiny SD folder replaced by arbitrary JSON, then prompts through CFG sampling to
    PNGs: it runs or it is one line (found this way: a vocabulary not its weights', a dict for freq_shift, ...)."""
    d = tmp_path_factory.mktemp("fzp")
    shutil.copytree(sd_folder, d / "sd")
    path = d / "sd" / sub
    cfg = json.loads(path.read_text())
    cfg[sorted(cfg)[pick % len(cfg)]] = value
    path.write_text(json.dumps(cfg))
    out = d / "out"
    rc, lines = run_cli(capsys, "sample", "--model", d / "sd", "--prompt", "a cat", "--guidance", "3", "--solver",
                        "dpmpp-2m", "--nfe", "2", "--n", "1", "--out", out)
    if rc == 0:  # many fields are unused, or any value of theirs is valid
        return
    assert rc in (2, 3), (rc, lines)
    assert len(lines) == 1 and lines[0].startswith("fewstep: error: "), lines
    assert not out.exists()

def test_ctrl_c_leaves_nothing_behind(tmp_path):
    """SIGINT in the middle of a fit (after its first progress line): exit 130, one line, no file."""
    import signal
    import time

    out = tmp_path / "p.json"
    # digits timesteps + D-ODE at 6 NFE: tens of seconds even on an idle box (the GMM's finished in 2 s, before
    # the signal); a 100-sample teacher solve runs between the first progress line and the fit's end
    p = subprocess.Popen([sys.executable, "-m", "fewstep", "fit", "--model", "digits", "--solver", "dpmpp-2m", "--nfe",
                          "6", "--method", "timesteps+dode", "--out", out], stderr=subprocess.PIPE, text=True, cwd="/",
                         # a shell's background job (e.g. a CI runner) ignores SIGINT, and the child would inherit
                         # that: give it the default disposition, as a terminal's foreground job has
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first = p.stderr.readline()  # the fit has started: imports are done, main() is running
    assert first.startswith("fewstep fit: "), first
    time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    rest = p.stderr.read()
    assert p.wait(timeout=60) == 130, rest
    assert rest.strip().splitlines()[-1] == "fewstep: interrupted" and "Traceback" not in rest, rest
    assert list(tmp_path.iterdir()) == []


def test_foreign_configs_read_as_their_writers_wrote_them():
    """diffusers saves `-Infinity` (DPMSolverMultistepScheduler's lambda_min_clipped) and transformers int(1e30)
    (model_max_length): a pipeline folder's configs parse with foreign=True; fewstep's own files stay strict."""
    from fewstep.runtime.files import FileError, parse_json

    text = '{"lambda_min_clipped": -Infinity, "model_max_length": 1000000000000000019884624838656}'
    cfg = parse_json(text, "scheduler config", foreign=True)
    assert cfg["lambda_min_clipped"] == -math.inf and cfg["model_max_length"] == 10**30 + 19884624838656
    for bad in (text, '{"a": NaN}'):
        with pytest.raises(FileError):
            parse_json(bad, "plan")
    with pytest.raises(FileError, match="digits"):
        parse_json('{"a": ' + "9" * 65 + "}", "config", foreign=True)


def test_run_embeddings_files(capsys, tmp_path, monkeypatch):
    """`fewstep run --embeddings`: fewstep-run's rules (F32 / I64, byte ranges inside the file, no shared bytes, a
    bound on all values together), every entry checked before any data is read; a good file reads back exactly."""
    from safetensors.numpy import save_file

    from fewstep.runtime import run

    good = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "ids": np.array([[1, -2]], np.int64)}
    save_file(good, str(tmp_path / "good.safetensors"))
    got = run.read_embeddings(str(tmp_path / "good.safetensors"))
    assert got.keys() == good.keys()
    for k, v in good.items():
        assert got[k].dtype == v.dtype and got[k].flags.writeable
        np.testing.assert_array_equal(got[k], v)

    def raw(name: str, header, data: bytes = b"") -> Path:
        text = header if isinstance(header, str) else json.dumps(header)
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(len(text).to_bytes(8, "little") + text.encode() + data)
        return path

    save_file({"h": np.zeros(3, np.float16)}, str(tmp_path / "f16.safetensors"))
    cases = [(tmp_path / "f16.safetensors", "'h' is F16; fewstep run reads F32 and I64"),
             (raw("far", {"g": {"dtype": "F32", "shape": [3], "data_offsets": [0, 10**12]}}, b"\0" * 12),
              "lie outside the file"),
             (raw("deep", "[" * 100_000 + "]" * 100_000), "nested more than"),
             (raw("shared", {f"t{i}": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]} for i in range(1000)},
                  b"\0" * 12), "share bytes"),
             (tmp_path / "none.safetensors", "not found"),
             (tmp_path, "is a directory")]
    out = tmp_path / "out"
    out.mkdir()
    for path, match in cases:
        rc, lines = run_cli(capsys, "run", tmp_path / "no-engine.onnx", "--embeddings", path, "--out", out / "x.npy")
        assert_refused(rc, lines, out, match)
    # the bound on all values together (fewstep-run's per-run limit), met here by lowering it
    monkeypatch.setattr(run, "MAX_VALUES", 7)
    rc, lines = run_cli(capsys, "run", tmp_path / "no-engine.onnx", "--embeddings", tmp_path / "good.safetensors",
                        "--out", out / "x.npy")
    assert_refused(rc, lines, out, "more than 7 values")
