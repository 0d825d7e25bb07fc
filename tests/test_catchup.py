"""Catch-Up Distillation (issue 15): the catch-up / Runge–Kutta targets on toy fields, the zero-initialised
heads, training mechanics (the loss falls, bitwise resume), the flow-velocity checkpoint through the runtime
(Euler plans, fitted solvers, export and the C++ runtime) and the CLI.

Digits quality is measured in benchmarks/cud_quality.py; the digits runs here are a few steps at a tiny batch.
"""

import json

import numpy as np
import pytest
import torch
from inproc import run  # noqa: E402

from fewstep.runtime import noise as fnoise
from fewstep.runtime import sample
from fewstep.runtime.denoisers import FlowDenoiser
from fewstep.runtime.digits_net import UNetConfig
from fewstep.runtime.models import bundle_steps, load
from fewstep.training import catchup, trainer


# --- the targets ------------------------------------------------------------------------------------
def _toy_inputs(b=5):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((b, 1, 2, 2), generator=g, dtype=torch.float64)
    t = 0.3 + 0.6 * torch.rand(b, generator=g, dtype=torch.float64)
    delta = torch.rand(b, generator=g, dtype=torch.float64) / 16
    return x, t, delta


def test_targets_on_a_linear_field_match_the_hand_expansion():
    """v(x, t) = x. Hand expansion (float64, independent of the code's grouping):
    Euler:  v(x − Δx) = x(1 − Δ).
    RK2:    k1 = x, k2 = x(1 − Δ); y1 = x − Δ(k1 + k2)/2 = x(1 − Δ + Δ²/2), y2 = x − Δ(k1 + k2) = x(1 − Δ)².
    RK3:    k3 = v(x − Δ(7k1 + k2)/4) = x(1 − 2Δ + Δ²/4); φ = 5/12 k1 + 2/3 k2 − 1/12 k3 = x(1 − Δ/2 − Δ²/48);
            y_j = x − jΔφ.
    The targets are v at those points (= the points). Float64 rounding of a few operations on |x| ≲ 3: 1e-14."""
    x, t, d = _toy_inputs()
    dd = d.reshape(-1, 1, 1, 1)

    def v(xx, tt):
        return xx

    got1 = catchup.catchup_targets(v, x, t, d, v(x, t), 1)
    torch.testing.assert_close(got1[0], x * (1 - dd), rtol=0, atol=1e-14)
    got2 = catchup.catchup_targets(v, x, t, d, v(x, t), 2)
    torch.testing.assert_close(got2[0], x * (1 - dd + dd**2 / 2), rtol=0, atol=1e-14)
    torch.testing.assert_close(got2[1], x * (1 - dd) ** 2, rtol=0, atol=1e-14)
    got3 = catchup.catchup_targets(v, x, t, d, v(x, t), 3)
    phi = x * (1 - dd / 2 - dd**2 / 48)
    for j in (1, 2, 3):
        torch.testing.assert_close(got3[j - 1], x - j * dd * phi, rtol=0, atol=1e-14)


def test_targets_evaluate_at_the_right_times():
    """v(x, t) = t (x-independent): each target is the time its point is evaluated at, t − jΔ."""
    x, t, d = _toy_inputs()
    for k in (1, 2, 3):
        got = catchup.catchup_targets(lambda xx, tt: tt.reshape(-1, 1, 1, 1).expand_as(xx), x, t, d,
                                      t.reshape(-1, 1, 1, 1).expand_as(x), k)
        for j in range(1, k + 1):
            torch.testing.assert_close(got[j - 1], (t - j * d).reshape(-1, 1, 1, 1).expand_as(x), rtol=0, atol=1e-15)


def test_straight_flow_is_a_fixed_point_of_every_target():
    """All data at m: x_t = t·z + (1 − t)·m, the exact velocity v(x, t) = (x − m)/t is constant along each
    straight path, so every catch-up / RK target equals v(x_t, t) (Euler is exact on straight paths).
    Float64, division by t ≥ 0.1: rounding ≲ 1e-13."""
    x, t, d = _toy_inputs()
    m = 0.25

    def v(xx, tt):
        return (xx - m) / tt.reshape(-1, 1, 1, 1)

    k1 = v(x, t)
    for k in (1, 2, 3):
        for tg in catchup.catchup_targets(v, x, t, d, k1, k):
            torch.testing.assert_close(tg, k1, rtol=0, atol=1e-12)


# --- the network ------------------------------------------------------------------------------------
def test_heads_start_at_zero_and_do_not_change_the_velocity():
    torch.manual_seed(0)
    net = catchup.CUDNet(UNetConfig(), heads=2)
    assert all(float(h.weight.abs().sum()) == 0 and float(h.bias.abs().sum()) == 0 for h in net.heads)
    with torch.no_grad():  # make the main output non-trivial (the UNet's own output conv starts at zero)
        for p in net.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4), torch.arange(4)
    out = net(x, t, y)
    assert len(out) == 3 and float(out[0].abs().max()) > 0
    assert torch.equal(out[0], net.unet(x, t, y))  # the hook reads features, changes nothing
    assert all(torch.equal(o, torch.zeros_like(o)) for o in out[1:])
    assert not net.unet.out._forward_hooks  # scoped to the call


# --- training -----------------------------------------------------------------------------------------
def _fixed_batch_gt_loss(net, data):
    """MSE of the main velocity to z − x on a fixed batch of 128 (t ~ U(0, 1), no label dropout)."""
    gen = torch.Generator().manual_seed(999)
    x, y = data(gen, 128)
    z = torch.randn(x.shape, generator=gen)
    t = torch.rand(128, generator=gen)
    x_t = t.reshape(-1, 1, 1, 1) * z + (1 - t.reshape(-1, 1, 1, 1)) * x
    with torch.no_grad():
        return float(((net(x_t, t, y)[0] - (z - x)) ** 2).mean())


@pytest.mark.parametrize("method,heads", [("cud", "none"), ("fm", "none")])
def test_loss_falls(method, heads):
    """30 steps at batch 8 on the digits: the velocity's MSE to z − x on a fixed batch falls from its value at
    the zero-output initialisation (E|z − x|² ≈ 1 + σ_data²) by ≥ 20 % (the E-optimal predictor is far lower:
    at t → 1 only the data mean is unknown)."""
    cfg = catchup.CUDConfig(method=method, heads=heads, steps=30, batch=8, lr=2e-3, warmup=5)
    data, _ = catchup.digits_data()
    torch.manual_seed(0)
    net = catchup.CUDNet(UNetConfig(), catchup.HEADS[heads] if method == "cud" else 0)
    before = _fixed_batch_gt_loss(net, data)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = catchup.make_loss(cfg, data)
    gen = torch.Generator()
    for step in range(cfg.steps):
        gen.manual_seed(step)
        loss = loss_fn(net, gen, cfg.batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _fixed_batch_gt_loss(net, data)
    assert after < 0.8 * before, (before, after)


def test_interrupted_run_resumes_bitwise(tmp_path):
    """8 steps, checkpoints every 3: an exception at step 5 (after the step-3 checkpoint), then the same
    call again, ends bitwise where the uninterrupted run ends (RK3: three outputs, five target calls)."""
    cfg = catchup.CUDConfig(heads="rk3", steps=8, batch=4, warmup=2, ckpt_every=3, ema_halflife=2.0)
    data, _ = catchup.digits_data()

    def net():
        torch.manual_seed(1)
        return catchup.CUDNet(UNetConfig(), 2)

    a, _ = trainer.run(net(), catchup.make_loss(cfg, data), cfg.loop(), str(tmp_path / "a"), 1, {}, "a",
                       progress=False)
    calls = {"n": 0}

    def failing(gen, b):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return data(gen, b)

    with pytest.raises(KeyboardInterrupt):
        trainer.run(net(), catchup.make_loss(cfg, failing), cfg.loop(), str(tmp_path / "b"), 1, {}, "b",
                    progress=False)
    assert json.loads((tmp_path / "b" / "train_state.json").read_text())["step"] == 3
    b, _ = trainer.run(net(), catchup.make_loss(cfg, data), cfg.loop(), str(tmp_path / "b"), 1, {}, "b",
                       progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], v) for k, v in net().state_dict().items())  # it trained


# --- plans: Euler on the uniform-t grid is flow Euler ----------------------------------------------------
class _ToyVelocity(torch.nn.Module):
    def forward(self, x, t, cond):
        return torch.tanh(x) + t.to(x.dtype).reshape(-1, 1, 1, 1)


def test_euler_plan_is_flow_euler():
    """The Plan (DDIM rows on σ_i = t_i/(1 − t_i)) against the flow loop x ← x − (t_i − t_{i+1})·v(x, t_i) from
    t_max·z. The executor works in σ-space (x_σ = (1 + σ)·x_t, |x_σ| ≤ 81·|x_t| ≲ 400): ~10 float32 roundings per
    step of at most 400·2⁻²⁴ ≈ 2.4e-5 each, mapped back by 1/(1 + σ) ≤ 1 — under 16 steps·10·2.4e-5 ≈ 4e-3
    worst case; the tolerance is that bound."""
    den = FlowDenoiser(_ToyVelocity(), sigma_min=0.002, sigma_max=80.0)
    z = torch.randn((6, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    t_max = 80.0 / 81.0
    for n in (1, 2, 4, 16):
        plan = catchup.euler_plan(n, 80.0)
        assert plan.nfe == n and plan.sigma_init == pytest.approx(80.0, rel=1e-12)
        got = sample(plan, den, z)
        x = (t_max * z).double()
        for i in range(n):
            ti, tn = t_max * (n - i) / n, t_max * (n - i - 1) / n
            x = x - (ti - tn) * _ToyVelocity()(x, torch.full((6,), ti, dtype=torch.float64), None)
        np.testing.assert_allclose(got.numpy(), x.numpy(), rtol=0, atol=4e-3)


# --- digits bundle through the runtime ------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A real (tiny) catch-up bundle: 3 steps of RK2, trajectories from 16 noises, 2 one-step steps."""
    root = tmp_path_factory.mktemp("cud")
    cfg = catchup.CUDConfig(steps=3, batch=4, warmup=1, ckpt_every=2, extra_steps=2, traj_n=16)
    catchup.train_bundle(str(root), cfg, seed=0, progress=False)
    return root


def test_bundle_loads_samples_exports_and_runs(bundle, tmp_path, capsys):
    b = str(bundle)
    assert bundle_steps(b) == [1, 2, 4, 8, 16]
    stage1 = load(b)
    assert isinstance(stage1.denoiser, FlowDenoiser)
    t = load(b, steps=4)
    assert isinstance(t.denoiser, FlowDenoiser) and t.plans["deterministic"].name == "cud-euler-4"
    assert t.plans["deterministic"].provenance["teacher_hash"] == t.content_hash == stage1.content_hash
    one = load(b, steps=1)  # the additionally trained weights
    assert one.content_hash != stage1.content_hash
    assert one.plans["deterministic"].provenance["teacher_hash"] == one.content_hash
    p = run(capsys, "sample", "--model", b, "--nfe", 4, "--class", 3, "--n", 6, "--seed", 5, "--out", tmp_path / "s")
    assert "cud-euler-4" in p.stdout
    x = np.load(tmp_path / "s" / "samples.npy")
    z, _ = fnoise.draw(5, 6, (1, 8, 8), 0)
    want = sample(t.plans["deterministic"], t.denoiser, torch.from_numpy(z), cond=torch.full((6,), 3))
    np.testing.assert_allclose(x, want.numpy(), rtol=0, atol=1e-5)  # the CLI's thread count may differ
    # export --verify checks ONNX Runtime against the executor with its derived per-engine tolerance
    p = run(capsys, "export", "--model", b, "--nfe", 2, "--out", tmp_path / "e2.onnx", "--verify")
    assert p.stdout.strip().endswith(") ok"), p.stdout
    # The C++ runtime runs the same ONNX graph as the verified session (bit-identical to it, README), so the
    # bound is the one --verify derived for this engine from its rounding depth: max |Δ| ≤ tol · max |x|.
    tol = float(p.stdout.split("(tolerance ")[-1].split(")")[0])
    run(capsys, "run", tmp_path / "e2.onnx", "--n", 6, "--seed", 5, "--class", 3, "--out", tmp_path / "r.npy")
    x2 = sample(load(b, steps=2).plans["deterministic"], t.denoiser, torch.from_numpy(z), cond=torch.full((6,), 3))
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), x2.numpy(), rtol=0, atol=tol * float(x2.abs().max()))
    from fewstep.training.bundle import ship

    files = ship(b, str(tmp_path / "ship"))
    assert all("train_state" not in f and "traj" not in f for f in files)
    assert load(str(tmp_path / "ship"), steps=1).content_hash == one.content_hash


def test_fitted_solver_on_the_flow_model(bundle, tmp_path, capsys):
    """D-ODE fits on the catch-up model like on any denoiser: its bundle's stage-1 flow model."""
    b = str(bundle)
    run(capsys, "fit", "--model", b, "--solver", "ddim", "--nfe", 2, "--method", "dode", "--n", 8,
        "--out", tmp_path / "fit.json")
    res = json.loads(run(capsys, "eval", "--model", b, "--plan", tmp_path / "fit.json", "--n", 8, "--json").stdout)
    assert res["nfe"] == 2 and np.isfinite(res["rmse_vs_reference"])


def test_cli_bad_arguments(tmp_path, capsys):
    for args, msg in ((("--heads", "rk5"), "--heads must be one of"), (("--method", "x"), "--method must be one of"),
                      (("--steps", "0"), "--steps must be ≥ 1"), (("--delta-max", "1"), "--delta-max must be in"),
                      (("--extra-steps", "-1"), "--extra-steps must be ≥ 0"), (("--lr", "nan"), "--lr must be > 0")):
        out = tmp_path / "o"
        p = run(capsys, "distill", "catchup", "--out", out, *args, ok=False)
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert not out.exists()


# --- the shipped bundle ---------------------------------------------------------------------------------
def test_shipped_digits_cud_out_of_the_box(tmp_path, capsys):
    assert bundle_steps("digits-cud") == [1, 2, 4, 8, 16]
    for n in (1, 4):
        t = load("digits-cud", steps=n)
        assert isinstance(t.denoiser, FlowDenoiser) and t.plans["deterministic"].nfe == n
        p = run(capsys, "sample", "--model", "digits-cud", "--nfe", n, "--class", 7, "--n", 10,
                "--out", tmp_path / f"s{n}")
        assert f"cud-euler-{n}" in p.stdout and (tmp_path / f"s{n}" / "grid.png").exists()
    # Quality of the shipped artifact (not a timing): one Euler step (the additionally trained weights) draws the
    # requested class (scored without eval's reference solve, which costs 96 evaluations per sample).
    from fewstep.runtime.sampling import make_inputs, run_plan
    from fewstep.training.evaluate import quality

    t = load("digits-cud", steps=1)
    inp = make_inputs(t, t.plans["deterministic"], 60, 1)
    res = quality(t, run_plan(t, t.plans["deterministic"], inp), inp, None)
    assert res["class_accuracy"] >= 0.9, res
