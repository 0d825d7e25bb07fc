"""The `fewstep` CLI contract: outputs, the Python API behind them, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fewstep
from fewstep.runtime import noise as fnoise
from fewstep.runtime import sample
from fewstep.runtime.gmm import GMM
from fewstep.runtime.solvers import build


def run(*args, ok=True):
    # cwd away from the repo root: `python -m` puts the cwd first on sys.path, and the root's
    # fewstep/ folder is not the installed package.
    p = subprocess.run([sys.executable, "-m", "fewstep", *map(str, args)], capture_output=True, text=True,
                       timeout=600, cwd=os.path.dirname(os.path.abspath(__file__)))
    if ok:
        assert p.returncode == 0, p.stderr
    return p


def test_version():
    assert run("--version").stdout.strip() == f"fewstep {fewstep.__version__}"


def test_plugin_commands_are_the_plugins():
    """main() registers only the plugin that owns argv's command: PLUGIN_COMMANDS must name what each one adds."""
    import argparse
    import importlib

    from fewstep import cli

    assert set(cli.PLUGIN_COMMANDS.values()) == set(cli.PLUGINS)
    for mod in cli.PLUGINS:
        sub, bench = argparse.ArgumentParser().add_subparsers(), argparse.ArgumentParser().add_subparsers()
        importlib.import_module(mod).register(sub, bench)
        assert set(sub.choices) == {k for k, v in cli.PLUGIN_COMMANDS.items() if v == mod}, mod
    assert cli._command(["--version"]) is None and cli._command(["--version", "--help"]) == ""
    assert cli._command(["run", "e.onnx", "--n", "2"]) == "run" and cli._command([]) == ""


def test_version_and_run_start_without_torch(tmp_path):
    """`fewstep --version` and `fewstep run` on an engine (the C++ runtime) never import torch (1–5 s), on
    success or on error; the command's help and its errors are those of the full CLI."""
    pytest.importorskip("onnxruntime")
    from fewstep.export.onnx import export_onnx
    from fewstep.runtime.models import load

    gmm = load("gmm")
    engine = tmp_path / "g.onnx"
    export_onnx(gmm.denoiser, build("ddim", 2, gmm.denoiser.sigma_min, gmm.denoiser.sigma_max), engine,
                sample_shape=gmm.shape, num_classes=gmm.num_classes, teacher_hash=gmm.content_hash)
    x, y = tmp_path / "x.npy", tmp_path / "y.npy"
    code = f"""
import contextlib, io, sys
from fewstep.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0 and out.getvalue().startswith("fewstep "), out.getvalue()
assert main(["run", {str(engine)!r}, "--n", "3", "--seed", "1", "--threads", "1", "--out", {str(x)!r}]) == 0
assert main(["run", {str(tmp_path / "none.onnx")!r}, "--n", "3", "--out", {str(y)!r}]) == 2
assert "torch" not in sys.modules, "torch was imported"
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert p.returncode == 0, p.stderr
    assert p.stderr.strip() == "fewstep: error: engine not found: " + str(tmp_path / "none.onnx"), p.stderr
    # the run did run: the engine's own samples (labels 0, 1, 2: `fewstep run`'s default), bit for bit
    from fewstep import _C

    want = _C.Engine(str(engine), threads=1).sample(1, 3, labels=np.arange(3, dtype=np.int64))
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), want)
    assert run("run", "--help").stdout.startswith("usage: fewstep run")


def test_sample_gmm_equals_python_api(tmp_path):
    p = run("sample", "--model", "gmm", "--solver", "dpmpp-2m", "--nfe", 5, "--n", 33, "--seed", 7, "--out", tmp_path)
    assert "NFE 5" in p.stdout and len(p.stdout.strip().splitlines()) == 1
    x = np.load(tmp_path / "samples.npy")
    assert x.dtype == np.float32 and x.shape == (33, 2)
    g = GMM.default()
    z, _ = fnoise.draw(7, 33, (2,), 0)
    plan = build("dpmpp-2m", 5, g.sigma_min, g.sigma_max)
    want = sample(plan, g, torch.from_numpy(z)).numpy()
    np.testing.assert_array_equal(x, want)


def test_sample_noise_file_and_plan_file(tmp_path):
    z = np.random.default_rng(0).standard_normal((9, 2)).astype(np.float32)
    np.save(tmp_path / "z.npy", z)
    g = GMM.default()
    plan = build("heun", 5, g.sigma_min, g.sigma_max)
    plan.save(tmp_path / "plan.json")
    run("sample", "--model", "gmm", "--plan", tmp_path / "plan.json", "--noise", tmp_path / "z.npy",
        "--out", tmp_path / "o")
    x = np.load(tmp_path / "o" / "samples.npy")
    np.testing.assert_array_equal(x, sample(plan, g, torch.from_numpy(z)).numpy())


def test_sample_stochastic_plan_is_seeded(tmp_path):
    a = run("sample", "--model", "gmm", "--solver", "ddpm", "--nfe", 6, "--n", 8, "--seed", 3, "--out", tmp_path / "a")
    b = run("sample", "--model", "gmm", "--solver", "ddpm", "--nfe", 6, "--n", 4, "--seed", 3, "--out", tmp_path / "b")
    assert a.returncode == b.returncode == 0
    xa, xb = np.load(tmp_path / "a" / "samples.npy"), np.load(tmp_path / "b" / "samples.npy")
    np.testing.assert_array_equal(xa[:4], xb)  # per-sample streams: batch size does not matter


def test_eval_json_gmm():
    p = run("eval", "--model", "gmm", "--solver", "ddim", "--nfe", 4, "--n", 64, "--json")
    res = json.loads(p.stdout)
    assert res["nfe"] == 4 and res["n"] == 64
    assert 0 < res["rmse_vs_reference"] < 2 and res["sliced_w2"] > 0


def test_eval_error_falls_with_nfe():
    e = [json.loads(run("eval", "--model", "gmm", "--solver", "dpmpp-2m", "--nfe", n, "--n", 128,
                        "--json").stdout)["rmse_vs_reference"] for n in (3, 20)]
    assert e[1] < e[0] / 3


@pytest.mark.slow
def test_sample_and_eval_digits(tmp_path):
    run("sample", "--model", "digits", "--solver", "dpmpp-2m", "--nfe", 4, "--n", 20, "--class", 3,
        "--guidance", 2, "--out", tmp_path)
    x = np.load(tmp_path / "samples.npy")
    assert x.shape == (20, 1, 8, 8) and x.dtype == np.float32
    assert (tmp_path / "grid.png").stat().st_size > 100
    res = json.loads(run("eval", "--model", "digits", "--solver", "dpmpp-2m", "--nfe", 6, "--n", 100,
                         "--json").stdout)
    for k in ("nfe", "rmse_vs_reference", "fd_digits", "class_accuracy"):
        assert k in res
    assert res["class_accuracy"] > 0.5


# --- bad input: exit code != 0, one clear line, no traceback, nothing written ------------


def _bad(tmp_path, *args, match):
    out = tmp_path / "out"
    p = run(*args, "--out", out, ok=False) if args[0] == "sample" else run(*args, ok=False)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("fewstep: error:"), p.stderr
    assert match in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_bad_plan_json(tmp_path):
    (tmp_path / "p.json").write_text('{"format": "fewstep.plan/1", "rows": [')
    _bad(tmp_path, "sample", "--model", "gmm", "--plan", tmp_path / "p.json", match="not valid JSON")


def test_nan_in_plan(tmp_path):
    d = build("ddim", 3, 0.002, 80).to_dict()
    text = json.dumps(d).replace('"c": ', '"c": NaN, "x": ', 1)
    (tmp_path / "p.json").write_text(text)
    _bad(tmp_path, "sample", "--model", "gmm", "--plan", tmp_path / "p.json", match="NaN")


def test_unknown_solver(tmp_path):
    _bad(tmp_path, "sample", "--model", "gmm", "--solver", "nope", "--nfe", 3, match="unknown solver 'nope'")


def test_unknown_model(tmp_path):
    _bad(tmp_path, "sample", "--model", "nope", "--solver", "ddim", "--nfe", 3, match="unknown model 'nope'")


def test_missing_weights_file(tmp_path):
    _bad(tmp_path, "sample", "--model", tmp_path / "gone.safetensors", "--solver", "ddim", "--nfe", 3,
         match="gone.safetensors")


def test_noise_wrong_shape(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((4, 3), np.float32))
    _bad(tmp_path, "sample", "--model", "gmm", "--solver", "ddim", "--nfe", 3, "--noise", tmp_path / "z.npy",
         match="shape (4, 2)")


def test_heun_even_nfe(tmp_path):
    _bad(tmp_path, "sample", "--model", "gmm", "--solver", "heun", "--nfe", 4, match="2n − 1")


def test_nfe_zero(tmp_path):
    _bad(tmp_path, "sample", "--model", "gmm", "--solver", "ddim", "--nfe", 0, match="NFE")


def test_plan_for_other_teacher(tmp_path):
    plan = build("ddim", 3, 0.002, 80).replace(provenance={"teacher_hash": "sha256:" + "0" * 64})
    plan.save(tmp_path / "p.json")
    _bad(tmp_path, "sample", "--model", "gmm", "--plan", tmp_path / "p.json", match="content hash")
    run("sample", "--model", "gmm", "--plan", tmp_path / "p.json", "--force", "--n", 2, "--out", tmp_path / "f")


def test_guidance_needs_class(tmp_path):
    _bad(tmp_path, "sample", "--model", "gmm", "--solver", "ddim", "--nfe", 3, "--guidance", 3, match="--class")


def test_out_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    p = run("sample", "--model", "gmm", "--solver", "ddim", "--nfe", 3, "--out", tmp_path / "f", ok=False)
    assert p.returncode != 0 and "not a directory" in p.stderr and "Traceback" not in p.stderr
    assert (tmp_path / "f").read_text() == "x"


def test_no_partial_files_on_success(tmp_path):
    run("sample", "--model", "gmm", "--solver", "ddim", "--nfe", 2, "--n", 4, "--out", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["samples.npy"]


def test_teacher_train_then_sample_path(tmp_path):
    run("teacher", "train", "digits", "--out", tmp_path / "t", "--steps", 2, "--quiet")
    run("sample", "--model", tmp_path / "t", "--solver", "ddim", "--nfe", 2, "--n", 3, "--out", tmp_path / "o")
    assert np.load(tmp_path / "o" / "samples.npy").shape == (3, 1, 8, 8)
    _bad(tmp_path, "teacher", "train", "cats", match="unknown teacher 'cats'")
