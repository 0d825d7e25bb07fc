"""Distilled students (issue 7): guided distillation, progressive distillation, their CLI and plumbing.

The training runs here are tiny (a few steps at batch 8) on the real digits teacher: they check
the mechanics (targets, resume, data parallel, the student as a model everywhere); quality is
measured in benchmarks/distill_quality.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fewstep.runtime import digits_net, sample
from fewstep.runtime import noise as fnoise
from fewstep.runtime.digits_net import load_teacher
from fewstep.runtime.models import ModelError, bundle_steps, load
from fewstep.runtime.solvers import build
from fewstep.training import guided, progressive

HERE = os.path.dirname(os.path.abspath(__file__))

# float32 tolerances: two evaluations of the digits UNet that sum in another order (another batch, thread
# count or runtime) differ by at most its worst-case rounding R·u relative to the output's magnitude, R ≈ 70
# roundings on the longest path (25 convs, 17 GroupNorm + SiLU, 8 residual adds), u = 2⁻²⁴: 4.2e-6 a pass.
F32_U = 2.0**-24
UNET_PASS = 70 * F32_U


def run(*args, ok=True, env=None):
    # cwd away from the repo root: its fewstep/ folder is not the installed package
    p = subprocess.run([sys.executable, "-m", "fewstep", *map(str, args)], capture_output=True, text=True,
                       timeout=600, cwd=HERE, env=env)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real (tiny) bundle: stage 1 for 6 steps, then 4 → 2 → 1 with 4 iterations per halving."""
    root = tmp_path_factory.mktemp("bundle")
    cfg = guided.GuidedConfig(steps=6, batch=8, ckpt_every=3)
    guided.train_guided(str(root / "guided"), config=cfg, progress=False)
    pcfg = progressive.ProgressiveConfig(from_steps=4, to_steps=1, iters=4, batch=8, ckpt_every=2)
    progressive.train_progressive(str(root), str(root / "guided"), pcfg, progress=False)
    return root


# --- the student network --------------------------------------------------------------------------
def test_student_starts_as_the_conditional_teacher():
    t = load_teacher()
    s = guided.student_from_teacher(t)
    x = torch.randn(5, 1, 8, 8) * 3
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0])
    labels = torch.tensor([0, 3, 5, 9, 10])
    want = t(x, sigma, labels)
    for w in (1.0, 2.5, 5.0):
        torch.testing.assert_close(s(x, sigma, labels, guidance=w), want, rtol=0, atol=0)


def test_guided_target_is_cfg_with_per_sample_w():
    t = load_teacher()
    x = torch.randn(3, 1, 8, 8)
    sigma = torch.tensor([0.5, 2.0, 9.0])
    labels = torch.tensor([1, 2, 10])
    w = torch.tensor([1.0, 3.0, 4.5])
    got = guided.guided_target(t, x, sigma, labels, w)
    for i in range(3):
        want = t(x[i:i + 1], sigma[i:i + 1], labels[i:i + 1], guidance=float(w[i]))
        # one pass per batch composition; CFG's combination scales its rounding by 1 + 2w (≤ 10 here)
        atol = (1 + 2 * float(w[i])) * UNET_PASS * float(want.abs().max())
        torch.testing.assert_close(got[i:i + 1], want, rtol=0, atol=atol)
        if i == 1:  # the check can fail: the same sample at w − 0.1 is far outside it
            off = t(x[i:i + 1], sigma[i:i + 1], labels[i:i + 1], guidance=float(w[i]) - 0.1)
            assert float((got[i:i + 1] - off).abs().max()) > 10 * atol


def test_trained_student_uses_w_and_matches_executor(bundle):
    s = load(str(bundle)).denoiser
    assert isinstance(s, digits_net.GuidedDenoiser)
    x = torch.randn(4, 1, 8, 8) * 2
    sigma = torch.full((4,), 2.0)
    labels = torch.tensor([1, 2, 3, 4])
    a, b = s(x, sigma, labels, guidance=1.0), s(x, sigma, labels, guidance=4.0)
    assert (a - b).abs().max() > 1e-6  # 6 steps of training moved the W embedding off zero
    # The executor passes W through the student (one evaluation), not through CFG's two batches.
    plan = build("ddim", 3, s.sigma_min, s.sigma_max)
    z = torch.randn(4, 1, 8, 8)
    got = sample(plan, s, z, cond=labels, guidance=4.0)
    xx = plan.sigma_init * z
    for r in plan.rows:
        d = s(xx, torch.full((4,), r.sigma), labels, guidance=4.0)
        xx = r.c * xx + r.q[0] * d
    # the same float32 ops on the same batch: at most a differently fused update, ≤ 2 roundings of the
    # largest term per row (|x| ≤ σ_max·max|z|), ×2; CFG's two batches instead would be off by ~1e-2
    torch.testing.assert_close(got, xx, rtol=0, atol=4 * plan.nfe * F32_U * plan.sigma_init * float(z.abs().max()))


# --- progressive distillation --------------------------------------------------------------------
def test_grids_nest_and_end_at_zero():
    for n in (1, 2, 4, 8, 32):
        g, g2 = progressive.grid(n, 0.002, 80.0), progressive.grid(2 * n, 0.002, 80.0)
        assert g[0] == 80.0 and g[-1] == 0.0 and len(g) == n + 1
        assert g2[::2] == g  # halving keeps every other point exactly
        assert all(a > b for a, b in zip(g, g[1:]))


def test_pd_target_lands_on_the_two_step_teacher():
    # The one-step target x̃: a DDIM step from z_t with D = x̃ must reproduce the teacher's z_s.
    torch.manual_seed(0)
    z_t, z_s = torch.randn(6, 1, 8, 8), torch.randn(6, 1, 8, 8)
    for s_t, s_s in ((80.0, 2.5), (1.0, 0.3), (0.5, 0.0)):
        r = s_s / s_t
        target = (z_s - r * z_t) / (1 - r)
        # ≤ 6 float32 roundings of terms ≤ (|z_s| + |z_t|)/(1 − r), ×2
        atol = 12 * F32_U * float((z_s.abs() + z_t.abs()).max()) / (1 - r)
        torch.testing.assert_close(target + r * (z_t - target), z_s, rtol=0, atol=atol)


def test_student_plans_are_ddim_and_the_stochastic_sampler():
    n, smin, smax = 4, 0.002, 80.0
    g = progressive.grid(n, smin, smax)
    det = progressive.student_plan(n, smin, smax)
    sto = progressive.student_plan(n, smin, smax, stochastic=True)
    assert det.nfe == sto.nfe == n and det.sigmas == sto.sigmas == g[:-1] and det.sigma_init == smax
    assert det.stochastic_rows == [] and sto.stochastic_rows == [0, 1, 2]
    # A constant denoiser D = c: deterministic DDIM ends at c; the stochastic one too (its last step is to σ = 0).
    c = torch.full((2, 1, 8, 8), 0.25)
    den = lambda x, sigma, cond=None, guidance=None: c.expand_as(x)  # noqa: E731
    z = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(sample(det, den, z), c)
    noise = torch.randn(3, 2, 1, 8, 8)
    torch.testing.assert_close(sample(sto, den, z, noise=noise), c)
    # Row i of the stochastic sampler: a double-length step to σ_{i+2}, then noise back up to σ_{i+1}.
    r = sto.rows[0]
    assert r.c == pytest.approx(g[2] / g[0]) and r.g == pytest.approx((g[1] ** 2 - g[2] ** 2) ** 0.5)
    assert progressive.student_plan(1, smin, smax, stochastic=True).stochastic_rows == []


def test_a_halving_lowers_its_loss(tmp_path):
    # 2 → 1 from the shipped-teacher-initialised stage-1 student: the training loss must fall.
    t = load_teacher()
    s = guided.student_from_teacher(t)
    cfg = progressive.ProgressiveConfig(from_steps=2, to_steps=1, iters=40, batch=16, lr=5e-4, ckpt_every=40)
    progressive.halve(s, 1, str(tmp_path / "h"), cfg, 0, "sha256:test", progress=False)
    st = json.loads((tmp_path / "h" / "student.json").read_text())
    assert st["steps"] == 40 and st["steps_per_sample"] == 1
    first = _pd_loss(s, cfg)
    after = _pd_loss(load_teacher(str(tmp_path / "h" / "student.safetensors")), cfg, teacher=s)
    assert after < 0.8 * first, (first, after)


def _pd_loss(student, cfg, teacher=None):
    """The 2→1 distillation loss on a fixed held-out batch."""
    teacher = teacher or student
    g2 = torch.tensor(progressive.grid(2, 0.002, 80.0), dtype=torch.float64)
    gen = torch.Generator().manual_seed(123)
    from fewstep.training.data import load_digits_split

    x0, y = load_digits_split()[2][:64], load_digits_split()[3][:64]
    w = 1 + 4 * torch.rand(64, generator=gen)
    z_t = x0 + torch.randn(x0.shape, generator=gen) * 80.0
    st = torch.full((64,), 80.0, dtype=torch.float64)
    with torch.no_grad():
        z_mid = progressive._ddim(teacher, None, z_t, st, g2[1].expand(64), y, w)
        z_s = progressive._ddim(teacher, None, z_mid, g2[1].expand(64), g2[2].expand(64), y, w)
        d = guided.student_call(student, student.model, z_t, st.float(), y, w)
    return float(((d - z_s) ** 2).mean())


def test_progressive_bundle_layout_and_loading(bundle):
    idx = json.loads((bundle / "students.json").read_text())
    assert sorted(idx["students"], key=int) == ["1", "2"] and bundle_steps(str(bundle)) == [1, 2]
    for n in (1, 2):
        t = load(str(bundle), steps=n)
        assert t.plans["deterministic"].nfe == n and t.plans["stochastic"].nfe == n
        assert t.plans["deterministic"].provenance["teacher_hash"] == t.content_hash
        assert t.reference_denoiser is not None
    with pytest.raises(ModelError, match="students for 1, 2 steps, not 3"):
        load(str(bundle), steps=3)
    # A rerun finds every halving done and trains nothing.
    before = {p: p.stat().st_mtime_ns for p in bundle.glob("steps_*/student.safetensors")}
    pcfg = progressive.ProgressiveConfig(from_steps=4, to_steps=1, iters=4, batch=8, ckpt_every=2)
    progressive.train_progressive(str(bundle), str(bundle / "guided"), pcfg, progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in bundle.glob("steps_*/student.safetensors")}


def test_ship_bundle_leaves_training_state_behind(bundle, tmp_path):
    from fewstep.training.bundle import ship

    files = ship(str(bundle), str(tmp_path / "ship"))
    assert all("train_state" not in f for f in files)
    t = load(str(tmp_path / "ship"), steps=2)
    assert t.content_hash == load(str(bundle), steps=2).content_hash
    assert load(str(tmp_path / "ship")).content_hash == load(str(bundle)).content_hash


# --- the CLI -------------------------------------------------------------------------------------
def test_cli_sample_eval_export_run_a_student(bundle, tmp_path):
    b = str(bundle)
    p = run("sample", "--model", b, "--nfe", 2, "--guidance", 3, "--class", 4, "--n", 6, "--seed", 5,
            "--out", tmp_path / "s")
    assert "NFE 2" in p.stdout
    x = np.load(tmp_path / "s" / "samples.npy")
    t = load(b, steps=2)
    z, _ = fnoise.draw(5, 6, (1, 8, 8), 0)
    want = sample(t.plans["deterministic"], t.denoiser, torch.from_numpy(z), cond=torch.full((6,), 4), guidance=3.0)
    # The CLI's thread count may differ: 2 passes of the W-conditioned student (one evaluation each, no CFG
    # combination), each reaching the output with gain ≤ 1, ×2.
    np.testing.assert_allclose(x, want.numpy(), rtol=0, atol=2 * 2 * UNET_PASS * float(want.abs().max()))
    p = run("sample", "--model", b, "--nfe", 2, "--stochastic", "--guidance", 2, "--n", 4, "--out", tmp_path / "st")
    assert "pd-stoch-2" in p.stdout
    res = json.loads(run("eval", "--model", b, "--nfe", 1, "--guidance", 2, "--n", 20, "--json").stdout)
    assert res["nfe"] == 1 and res["guidance"] == 2.0 and {"fd_digits", "class_accuracy",
                                                            "rmse_vs_reference"} <= set(res)
    # The stage-1 student with a classic solver.
    run("sample", "--model", b, "--solver", "ddim", "--nfe", 3, "--guidance", 2, "--n", 3, "--out", tmp_path / "d")
    # Export: one graph whose guidance scale is an input; the engine agrees with the executor.
    p = run("export", "--model", b, "--nfe", 2, "--out", tmp_path / "s2.onnx", "--verify")
    assert p.stdout.strip().endswith(") ok"), p.stdout
    from fewstep.export.onnx import read_metadata

    c = read_metadata(tmp_path / "s2.onnx")["fewstep.contract"]
    assert [i["name"] for i in c["inputs"]] == ["z", "class_labels", "guidance"] and c["nfe"] == 2
    p = run("run", tmp_path / "s2.onnx", "--batch", 6, "--seed", 5, "--class", 4, "--guidance", 3,
            "--out", tmp_path / "r.npy")
    # ONNX Runtime vs torch: the same 2 passes (the engine's guidance is an input of the one evaluation), ×2
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), x, rtol=0, atol=2 * 2 * UNET_PASS * float(np.abs(x).max()))
    # A student checkpoint + its plan file, like any model and plan; another student's plan is refused.
    p = run("sample", "--model", bundle / "steps_2", "--plan", bundle / "steps_2" / "plan.json", "--guidance", 3,
            "--class", 4, "--n", 6, "--seed", 5, "--out", tmp_path / "p")
    np.testing.assert_array_equal(np.load(tmp_path / "p" / "samples.npy"), x)
    p = run("sample", "--model", bundle / "steps_1", "--plan", bundle / "steps_2" / "plan.json", "--n", 2,
            "--out", tmp_path / "e", ok=False)
    assert p.returncode == 2 and "content hash" in p.stderr
    # Bad input: one line naming the problem.
    p = run("sample", "--model", b, "--nfe", 8, "--n", 2, "--out", tmp_path / "e", ok=False)
    assert p.returncode == 2 and "students for 1, 2 steps, not 8" in p.stderr
    p = run("sample", "--model", "digits", "--nfe", 2, "--stochastic", "--out", tmp_path / "e", ok=False)
    assert p.returncode == 2 and "--stochastic" in p.stderr


def test_cli_bad_arguments(tmp_path):
    for args, msg in ((("guided", "--out", tmp_path / "g", "--steps", 0), "--steps must be ≥ 1"),
                      (("guided", "--out", tmp_path / "g", "--w-min", 5, "--w-max", 2), "above --w-max"),
                      (("progressive", "--student", tmp_path / "nope", "--out", tmp_path / "p"), "not found"),
                      (("progressive", "--student", "x", "--out", tmp_path / "p", "--from-steps", 6),
                       "power of two")):
        p = run("distill", *args, ok=False)
        assert p.returncode == 2 and msg in p.stderr, p.stderr
        assert "Traceback" not in p.stderr


def test_progressive_refuses_a_plain_teacher(tmp_path):
    p = run("distill", "progressive", "--student", digits_net.WEIGHTS_DIR,
            "--out", tmp_path / "p", ok=False)
    assert p.returncode == 2 and "guidance-conditioned student" in p.stderr


def test_kill_9_then_resume_is_bitwise_the_uninterrupted_run(tmp_path):
    args = ["distill", "guided", "--steps", 120, "--batch", 4, "--ckpt-every", 10, "--quiet"]
    run(*args, "--out", tmp_path / "a")
    cmd = [sys.executable, "-m", "fewstep", *map(str, args), "--out", str(tmp_path / "b")]
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "b" / "train_state.json"
    t0 = time.time()
    while time.time() - t0 < 120:
        if state.exists() and json.loads(state.read_text())["step"] >= 10:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = json.loads(state.read_text())["step"]
    assert 10 <= step < 120, "the run finished before it could be killed"
    assert not (tmp_path / "b" / "student.safetensors").exists()
    run(*args, "--out", tmp_path / "b")
    a = (tmp_path / "a" / "student.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "student.safetensors").read_bytes()
    # Other settings in the same directory: refused, the checkpoint kept.
    p = run("distill", "guided", "--steps", 120, "--batch", 8, "--out", tmp_path / "b", ok=False)
    assert p.returncode == 2 and "other settings" in p.stderr


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun not installed")
def test_torchrun_two_processes_gloo(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "fewstep", "distill",
                        "guided", "--steps", "6", "--batch", "8", "--ckpt-every", "3", "--quiet", "--out",
                        str(tmp_path / "ddp")], capture_output=True, text=True, timeout=600, cwd=HERE, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    meta = json.loads((tmp_path / "ddp" / "student.json").read_text())
    assert meta["world_size"] == 2 and meta["steps"] == 6
    st = json.loads((tmp_path / "ddp" / "train_state.json").read_text())
    assert st["record"]["world_size"] == 2
    s = load(str(tmp_path / "ddp")).denoiser
    assert isinstance(s, digits_net.GuidedDenoiser)


# --- the shipped students -------------------------------------------------------------------------
def test_shipped_digits_guided_out_of_the_box(tmp_path):
    assert {1, 2, 4, 8} <= set(bundle_steps("digits-guided"))
    for n in (1, 2, 4, 8):
        t = load("digits-guided", steps=n)
        assert isinstance(t.denoiser, digits_net.GuidedDenoiser) and t.plans["deterministic"].nfe == n
    p = run("sample", "--model", "digits-guided", "--nfe", 1, "--guidance", 3, "--class", 7, "--n", 10,
            "--out", tmp_path / "s")
    assert "NFE 1" in p.stdout and (tmp_path / "s" / "grid.png").exists()
    # Quality of the shipped artifact (not a timing): the 4-step student at W = 2 draws the requested class.
    res = json.loads(run("eval", "--model", "digits-guided", "--nfe", 4, "--guidance", 2, "--n", 60,
                         "--json").stdout)
    assert res["nfe"] == 4 and res["class_accuracy"] >= 0.9, res
