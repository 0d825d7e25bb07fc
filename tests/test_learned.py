"""Learned plans (issue 20): every row coefficient and σ by gradient descent through run_rows (S4S-Alt, LD3).

On the exact GMM (one torch thread, ms per network call): held-out gain over the closed-form fit, recovery of a
perturbed plan, every family, guided rows, the on-disk reference cache, the CLI, and the learned plan in the
fast executor, the exported ONNX graph and the C++ runtime.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from fewstep.runtime import fast
from fewstep.runtime.executor import sample
from fewstep.runtime.models import load
from fewstep.runtime.plan import MAX_HISTORY, Plan
from fewstep.runtime.reference import reference
from fewstep.runtime.sampling import make_inputs, run_plan
from fewstep.runtime.solvers import build, fittable
from fewstep.training import learned, metrics
from fewstep.training.fit import FitConfig, fit
from fewstep.training.fitcore import Batch, FitError, rms, run
from fewstep.training.learned import LearnConfig, fit_learned, learn


@pytest.fixture(scope="module")
def gmm():
    return load("gmm")


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fewstep-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEWSTEP_CACHE", str(d))
        yield d


@pytest.fixture(scope="module")
def pair(gmm):
    """DPM-Solver++(2M) at 4 NFE: the closed-form timesteps + D-ODE fit and the plan learned from it."""
    cf = fit(gmm, FitConfig("dpmpp-2m", 4, "timesteps+dode"))
    # budget=None: the default 10 s wall clock would make the quality asserted below depend on the box's load
    lp = fit_learned(gmm, "dpmpp-2m", 4, LearnConfig(rounds=3, budget=None), init=cf)
    return cf, lp


def _valid(plan: Plan):
    sig = plan.sigmas
    assert all(s > 0 for s in sig) and all(a >= b for a, b in zip(sig, sig[1:])), sig
    assert sig[0] <= plan.sigma_init and plan.history <= MAX_HISTORY
    assert Plan.from_json(plan.to_json()) == plan


def test_learned_beats_closed_form_on_heldout_noise(gmm, pair):
    """500 samples of noise seed 1 (fitting used seed 0: its first 100 samples, 50 more held out). Measured:
    endpoint RMSE 0.124 (closed-form) → 0.071 (ratio 0.57; 0.055 with the pre-"fast" defaults; on 1000 samples
    0.125 → 0.059, fit_learned_gmm.md). The RMSE of 500 samples moves by a few percent between seeds, so
    requiring a ratio ≤ 0.8 leaves a margin and still fails if learning does nothing."""
    cf, lp = pair
    _valid(lp)
    pv = lp.provenance
    assert pv["winner"] == "learned" and pv["method"] == "learned" and pv["heldout_rmse"] < pv["heldout_rmse_init"]
    assert pv["teacher_hash"] == gmm.content_hash and pv["base_solver"] == "dpmpp-2m"
    inp = make_inputs(gmm, cf, 500, 1)
    ref = reference(gmm, inp, cf.sigma_init)  # one reference solve for both plans
    e_cf, e_lp = (metrics.rmse(run_plan(gmm, p, inp), ref) for p in (cf, lp))
    assert e_lp <= 0.8 * e_cf, (e_lp, e_cf)


@pytest.mark.parametrize("cfg", [
    LearnConfig(optimizer="adam", rounds=4, coef_steps=60, grid_steps=0, reg=0.0, minibatch=None, budget=None),
    LearnConfig(optimizer="lm", lm_blocks="joint", lm_rounds=1, lm_steps=10, lm_batch=100, reg=0.0, budget=None),
    LearnConfig(optimizer="lm", lm_blocks="rows", lm_rounds=3, reg=0.0, budget=None),
], ids=["adam", "lm-joint", "lm-rows"])
def test_perturbed_coefficients_converge_back(gmm, cfg):
    """The target is a known plan's own endpoint (DPM-Solver++(2M), 3 NFE); learning starts from that plan with
    every coefficient scaled by 1 ± 10 %. Convergence is judged on the samples, the function the rows compute:
    single coefficients are not identifiable (row 0's a scales the input at σ = 80, where the GMM's D hardly
    depends on it). On 1000 fresh noises the distance to the true plan's samples must fall 10× (measured 130×
    on the held-out split with Adam); a learner that only fitted the 100 training samples, or did nothing, fails.
    Adam (every step, however loaded the box: no budget), and Levenberg–Marquardt on all parameters at once and
    by blocks (the σ's, then each row)."""
    den = gmm.denoiser
    true = build("dpmpp-2m", 3, den.sigma_min, den.sigma_max)
    rng = np.random.default_rng(0)

    def jitter(v):
        return v * (1 + 0.1 * rng.choice([-1.0, 1.0])) if v != 0.0 else v

    rows = [r.__class__(sigma=r.sigma, a=jitter(r.a), p=tuple(jitter(v) for v in r.p), c=jitter(r.c),
                        q=tuple(jitter(v) for v in r.q), s=r.s) for r in true.rows]
    start = true.replace(rows=tuple(rows))
    g = torch.Generator().manual_seed(0)
    b = Batch(torch.randn(150, 2, generator=g, dtype=torch.float64), None, None, torch.float64)
    tgt = run(true, den, b)
    tr, he = learned._split(b, slice(0, 100)), learned._split(b, slice(100, 150))
    out, info = learn(start, den, tr, tgt[:100], he, tgt[100:], replace(cfg, history=true.history))
    assert info["winner"] == "learned" and info["optimizer"] == cfg.optimizer
    if cfg.optimizer == "lm":
        assert info["lm_blocks"] == (1 if cfg.lm_blocks == "joint" else 1 + true.nfe)
    fresh = Batch(torch.randn(1000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64), None, None,
                  torch.float64)
    want = run(true, den, fresh)
    e0, e1 = rms(run(start, den, fresh), want), rms(run(out, den, fresh), want)
    assert e1 <= 0.1 * e0, (e0, e1)


@pytest.mark.parametrize("family", fittable())
def test_every_family_gives_a_valid_plan_never_worse_on_heldout(gmm, family):
    """Each family at a small NFE from its D-ODE fit (cheap): a valid Plan, and on the held-out split the kept
    plan is at least as good as the closed-form one (equal when the closed-form one won)."""
    nfe = 3
    cfg = LearnConfig(rounds=1, coef_steps=10, grid_steps=5)
    plan = fit_learned(gmm, family, nfe, cfg, init_method="dode", batch=40, heldout=20)
    _valid(plan)
    pv = plan.provenance
    assert plan.nfe == nfe and pv["heldout_rmse"] <= pv["heldout_rmse_init"]
    assert pv["winner"] in ("learned", "closed-form") and pv["init_method"] == "dode"


@pytest.mark.parametrize("family", fittable())
def test_fast_init_is_never_worse_than_the_base_solver(gmm, family):
    """The default init (heuristic grid + D-ODE on 16 samples) keeps a grid or the λ's only where they lower the
    error on those samples, so it is never worse than the base solver there, and it is a valid Plan of the NFE."""
    den = gmm.denoiser
    nfe = 5 if family == "heun" else 4  # Heun: odd NFE
    b = learned.make_batch(gmm, 16, 0, None, None)
    ref = learned.reference_target(gmm, b, den.sigma_max)
    plan, info = learned.fast_init(family, nfe, den, b, ref)
    _valid(plan)
    base = build(family, nfe, den.sigma_min, den.sigma_max)
    assert plan.nfe == nfe and info["rmse"] <= rms(run(base, den, b), ref)


def test_default_fit_uses_the_fast_init_and_couples_the_grid(gmm):
    plan = fit_learned(gmm, "dpmpp-2m", 4, batch=40, heldout=20)
    pv = plan.provenance
    assert pv["init_method"] == "fast" and pv["init_info"]["batch"] == 16 and pv["grid_coupled"]
    _valid(plan)
    assert pv["heldout_rmse"] <= pv["heldout_rmse_init"]


def test_coupled_grid_moves_the_base_rows_with_the_sigmas(gmm):
    """After ``couple`` the coefficients are unchanged at the current σ's, and moving the grid moves them as the
    family's own plan on the new grid: a first-order (finite-difference) linearisation, so at a step Δ = 1e-3 in
    log-gap units the mismatch is O(Δ² + hΔ) ≈ 1e-3 of the change itself; 1 % leaves a 10× margin and fails if
    the rows did not move (mismatch = the whole change) or moved the wrong way. Uncoupled, the rows stay put."""
    den = gmm.denoiser
    init = build("dpmpp-2m", 4, den.sigma_min, den.sigma_max)
    params = learned._Params(init, 2)
    c0 = params.coefs().detach().clone()
    assert params.couple("dpmpp-2m")
    assert torch.equal(params.coefs().detach(), c0)
    th = params.theta.detach().numpy().copy() + 1e-3
    want = torch.from_numpy(params._build_coefs(th))
    with torch.no_grad():
        params.theta.add_(1e-3)
    got = params.coefs().detach()
    change = float((want - c0).abs().max())
    assert change > 0 and float((got - want).abs().max()) <= 1e-2 * change
    loose = learned._Params(init, 2)
    with torch.no_grad():
        loose.theta.add_(1e-3)
    assert torch.equal(loose.coefs().detach(), c0) and not loose.couple(None)


def test_patience_stops_and_evals_scale_the_steps(gmm):
    """The target is the init plan's own endpoint (computed by the same differentiable run, so bitwise the init's
    prediction), so its held-out error is 0 and no phase can beat it: with
    patience 1 learning stops after the first phase and keeps the init. ``evals`` of half the planned network
    evaluations halves every phase's steps, ¾ of them takes ¾ of the steps (rounded up), over all rounds."""
    den = gmm.denoiser
    true = build("dpmpp-2m", 3, den.sigma_min, den.sigma_max)
    b = Batch(torch.randn(60, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64), None, None,
              torch.float64)
    with torch.no_grad():
        tgt = learned.endpoint(learned._Params(true, 2), den, b, b.z, None)
    tr, he = learned._split(b, slice(0, 40)), learned._split(b, slice(40, 60))
    per_round = (6 + 4) * 8 * true.nfe  # (coef + grid steps) · minibatch · NFE
    cfg = LearnConfig(optimizer="adam", rounds=2, coef_steps=6, grid_steps=4, minibatch=8, patience=1,
                      evals=per_round, history=2, budget=None)  # step counts below: never the wall clock's
    out, info = learn(true, den, tr, tgt[:40], he, tgt[40:], cfg, family="dpmpp-2m")
    assert info["heldout_rmse_init"] == 0.0 and info["winner"] == "closed-form" and out is true
    assert info["stopped_early"] and info["rounds"] == 2 and info["step_fraction"] == 0.5 and info["steps"] == 3
    assert [t for t, _ in info["phases"]] == ["init", "round 1 coef"]
    _, info = learn(true, den, tr, tgt[:40], he, tgt[40:], replace(cfg, evals=3 * per_round // 2, patience=None),
                    family="dpmpp-2m")
    assert info["rounds"] == 2 and info["step_fraction"] == 0.75 and info["steps"] == 2 * (5 + 3)


def test_lr_decay_schedules(gmm, monkeypatch):
    """The step size each Adam step uses: "cosine" is warm-up, then half a cosine over the phase's remaining m
    steps (the last at (1 − cos(π/m))/2 of lr); "rounds" scales round r of R by (1 + cos(π·r/R))/2. The schedule
    is computed in float64 from the same expressions, so equality is up to 1 ulp-scale rounding (rel 1e-12)."""
    seen = []

    class Spy(learned._Adam):
        def step(self):
            seen.append(self.lr * self.scales[0])  # the coefficients' step: the schedule times --lr
            super().step()

    monkeypatch.setattr(learned, "_Adam", Spy)
    den = gmm.denoiser
    init = build("dpmpp-2m", 3, den.sigma_min, den.sigma_max)
    b = Batch(torch.randn(24, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64), None, None,
              torch.float64)
    ref = run(init, den, b) * 0.9  # a target the init misses, so every phase takes all its steps
    tr, he = learned._split(b, slice(0, 16)), learned._split(b, slice(16, 24))
    base = LearnConfig(optimizer="adam", rounds=3, coef_steps=6, grid_steps=0, warmup=2, minibatch=8, evals=None,
                       patience=None, lr=1e-2, lr_nfe=None, budget=None)  # every step, however loaded the box
    learn(init, den, tr, ref[:16], he, ref[16:], replace(base, lr_decay="cosine"))
    m = 6 - 2
    want = [1e-2 * 0.5, 1e-2] + [1e-2 * 0.5 * (1 + math.cos(math.pi * j / m)) for j in range(m)]
    assert seen == pytest.approx(want * 3, rel=1e-12)
    assert seen[5] == pytest.approx(1e-2 * (1 - math.cos(math.pi / m)) / 2, rel=1e-12)
    seen.clear()
    learn(init, den, tr, ref[:16], he, ref[16:], replace(base, lr_decay="rounds"))
    want = [f * 1e-2 * w for f in (1.0, 0.75, 0.25) for w in [0.5, 1, 1, 1, 1, 1]]
    assert seen == pytest.approx(want, rel=1e-12)


def test_spread_term_value_and_the_shrinkage_it_undoes():
    """``_spread_loss`` is mean_i (std x_i − std r_i)² (population std over each sample's entries), checked
    against numpy. The docstring's claim: with x = mean(r) + s·u (u centred, unit norm), L2 + w·spread is
    minimised at s* = ‖r̃‖·(cos + w)/(1 + w), while L2 alone gives ‖r̃‖·cos. Checked by the gradient at s*,
    which is a sum of D products of size ~‖r̃‖²/D: float64 rounding leaves ≤ ~D·1e-16 of ‖r̃‖², so 1e-12 is
    a bound with margin; a wrong s* (e.g. the L2 one) gives a gradient of order w·(1 − cos)·‖r̃‖ ≫ that."""
    g = torch.Generator().manual_seed(3)
    x, r = torch.randn(5, 1, 8, 8, generator=g, dtype=torch.float64), torch.randn(5, 1, 8, 8, generator=g,
                                                                                   dtype=torch.float64)
    want = np.mean((x.numpy().reshape(5, -1).std(1) - r.numpy().reshape(5, -1).std(1)) ** 2)
    assert float(learned._spread_loss(x, r)) == pytest.approx(want, rel=1e-12)
    r1 = r[:1]
    rt = r1 - r1.mean()
    rh = rt / rt.norm()
    v = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64)
    v = v - v.mean()
    v = v - (v * rh).sum() * rh
    u = 0.6 * rh + 0.8 * v / v.norm()  # centred, unit norm, cos(u, r̃) = 0.6
    cos = float((u * rt).sum() / rt.norm())
    assert cos == pytest.approx(0.6, rel=1e-12) and float(u.mean()) == pytest.approx(0.0, abs=1e-15)
    for w in (0.0, 0.5, 2.0):
        s = torch.tensor(float(rt.norm()) * (cos + w) / (1 + w), dtype=torch.float64, requires_grad=True)
        xs = r1.mean() + s * u
        loss = learned._mse(xs, r1) + w * learned._spread_loss(xs, r1)
        loss.backward()
        assert abs(float(s.grad)) < 1e-12 * float(rt.norm()), (w, float(s.grad))


def test_lbfgs_minimises_a_quadratic_within_its_evaluations():
    """f = ½xᵀAx − bᵀx, A SPD with condition number 10 in 5 dims. Every accepted step satisfies Armijo and a
    rejected one is undone, so the end point is the lowest f evaluated; the evaluations (line-search trials
    included) never exceed max_evals. On a quadratic the secant pairs are exact curvature, so convergence is
    superlinear; even steepest descent with exact line search reaches f − f* ≤ 1e-10·(f₀ − f*) within
    log(1e-10)/log((9/11)²) = 58 steps at κ = 10, so 80 evaluations is ample."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(1.0, 10.0, 5, dtype=torch.float64)) @ q.T
    b = torch.randn(5, generator=g, dtype=torch.float64)
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    xstar = torch.linalg.solve(a, b)
    fstar = float(-0.5 * b @ xstar)
    seen = []

    def f():
        v = 0.5 * x @ a @ x - b @ x
        seen.append(float(v))
        return v

    used = learned._lbfgs(f, [x], 3)
    assert used == len(seen) <= 3
    seen.clear()
    with torch.no_grad():
        x.zero_()
    used = learned._lbfgs(f, [x], 80)
    assert used == len(seen) <= 80
    with torch.no_grad():
        fx = float(0.5 * x @ a @ x - b @ x)
    assert fx == min(seen) and fx - fstar <= 1e-10 * (0.0 - fstar)


def test_auto_optimizer_uses_lbfgs_only_in_long_phases(gmm, monkeypatch):
    """optimizer "auto" with LD3's loss (not LM's): L-BFGS in a phase of ≥ LBFGS_MIN_EVALS steps, Adam below (spied
    on both)."""
    calls = []
    real = learned._lbfgs

    def spy(f, var, n, *a):
        calls.append(n)
        return real(f, var, n, *a)

    monkeypatch.setattr(learned, "_lbfgs", spy)
    den = gmm.denoiser
    init = build("dpmpp-2m", 5, den.sigma_min, den.sigma_max)
    b = Batch(torch.randn(24, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64), None, None,
              torch.float64)
    ref = run(init, den, b) * 0.9
    tr, he = learned._split(b, slice(0, 16)), learned._split(b, slice(16, 24))
    n = learned.LBFGS_MIN_EVALS
    cfg = LearnConfig(optimizer="auto", loss="ld3", rounds=1, coef_steps=n, grid_steps=n - 1, minibatch=8,
                      evals=None, patience=None, budget=None)
    _, info = learn(init, den, tr, ref[:16], he, ref[16:], cfg, family="dpmpp-2m")
    assert calls == [n] and info["steps"] <= 2 * n - 1
    assert info["heldout_rmse"] <= info["heldout_rmse_init"]
    assert [t for t, _ in info["phases"]] == ["init", "round 1 coef", "round 1 grid"]
    _, info = learn(init, den, tr, ref[:16], he, ref[16:], replace(cfg, grid_first=True), family="dpmpp-2m")
    assert [t for t, _ in info["phases"]] == ["init", "round 1 grid", "round 1 coef"]


def test_guided_plan_keeps_w_on_every_row(gmm):
    plan = fit_learned(gmm, "ddim", 3, LearnConfig(rounds=1), init_method="dode", cls=1, guidance=2.0, batch=40,
                       heldout=20)
    assert all(r.guidance == 2.0 for r in plan.rows)
    _valid(plan)
    pv = plan.provenance
    assert pv["guidance"] == 2.0 and pv["heldout_rmse"] <= pv["heldout_rmse_init"]


def test_ld3_loss_and_lbfgs(gmm):
    """LD3's soft loss and L-BFGS both run and keep the never-worse guarantee; the slack offsets stay in the ball."""
    for cfg in (LearnConfig(loss="ld3", slack=0.05, rounds=1), LearnConfig(optimizer="lbfgs", rounds=1, coef_steps=5,
                                                                             grid_steps=3)):
        plan = fit_learned(gmm, "dpmpp-2m", 3, cfg, init_method="dode", batch=40, heldout=20)
        _valid(plan)
        assert plan.provenance["heldout_rmse"] <= plan.provenance["heldout_rmse_init"]
    assert plan.name.endswith("learned") and fit_learned(
        gmm, "ddim", 2, LearnConfig(loss="ld3", rounds=1, coef_steps=2, grid_steps=0), init_method="dode", batch=8,
        heldout=4).name == "ddim-2-learned-ld3"


def test_reference_is_cached_on_disk(gmm, cache_dir, monkeypatch):
    """The second fit with the same (teacher, σ_init, seed, n) reads the reference from disk (a recompute would
    raise here); another seed is another entry."""
    fit_learned(gmm, "ddim", 2, LearnConfig(rounds=1, coef_steps=1, grid_steps=0), init_method="dode", batch=8,
                heldout=4, seed=7)
    n = len(list((cache_dir / "reference").glob("*.npy")))

    def boom(*a, **k):
        raise AssertionError("reference recomputed")

    monkeypatch.setattr(learned, "reference_target", boom)
    fit_learned(gmm, "dpmpp-2m", 2, LearnConfig(rounds=1, coef_steps=1, grid_steps=0), init_method="dode", batch=8,
                heldout=4, seed=7)
    with pytest.raises(AssertionError, match="recomputed"):
        fit_learned(gmm, "ddim", 2, LearnConfig(rounds=1, coef_steps=1, grid_steps=0), init_method="dode", batch=8,
                    heldout=4, seed=8)
    assert len(list((cache_dir / "reference").glob("*.npy"))) == n


def test_history_bound_and_budget(gmm):
    """11 evaluations with every history entry free (K = 10) and every free coefficient moved: the rows read at
    most 10 past entries and stay a valid Plan; a 1 ms budget stops after the first step and says so."""
    den = gmm.denoiser
    params = learned._Params(build("ddim", 11, den.sigma_min, den.sigma_max), 10)
    with torch.no_grad():
        params.delta.normal_(generator=torch.Generator().manual_seed(0))
        params.theta.add_(0.3)
    plan = params.plan("moved", {})
    _valid(plan)
    assert plan.history == MAX_HISTORY
    short = fit_learned(gmm, "ddim", 3, LearnConfig(budget=1e-3), init_method="dode", batch=16, heldout=8)
    assert short.provenance["out_of_budget"] and short.provenance["steps"] == 1


def test_bad_config_is_named():
    for kw, match in ((dict(patience=0), "--patience"), (dict(evals=0), "--evals"), (dict(warmup=-1), "--warmup"),
                      (dict(lr_nfe=0), "--lr-nfe"), (dict(loss="l1"), "--loss"), (dict(optimizer="sgd"), "--optimizer"),
                      (dict(reg=-1.0), "--reg"), (dict(spread=-1.0), "--spread"),
                      (dict(lr_decay="step"), "--lr-decay"),
                      (dict(rounds=-1), "--rounds"), (dict(history=11), "--history"), (dict(budget=0.0), "--budget"),
                      (dict(joint_below=-1), "--joint-below")):
        with pytest.raises(FitError, match=match):
            LearnConfig(**kw).check()


# -------------------------------------------------------------------------------------------------------------
# the learned plan everywhere a Plan runs


def test_learned_plan_in_fast_executor(gmm, pair):
    """fp32, the same operations in the same order as the reference executor (dense rows are no special case),
    so the 1e-6-of-scale bound of test_kernels' plain solvers holds."""
    _, lp = pair
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    ref = sample(lp, gmm.denoiser, z)
    out = fast.sample(lp, gmm.denoiser, z, use_kernel=False)
    assert float((out - ref).abs().max()) <= 1e-6 * (1 + float(ref.abs().max()))


def test_learned_plan_exports_verifies_and_runs_in_cpp(gmm, pair, tmp_path):
    """The exported graph passes `verify` (its per-engine float32 bound, export/verify.py), and the C++ engine
    equals the Python executor from the same Philox noise within 1e-4 of the sample scale: the GMM graph is a
    handful of float32 ops per row (softmax over 9 components, one update), tens of roundings of u = 2⁻²⁴ on
    values ≲ the sample scale over 3 rows ≈ 1e-5 at most, so 1e-4 has a 10× margin and a wrong row fails it."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fewstep import _C
    from fewstep.export import onnx as xo
    from fewstep.export.verify import verify
    from fewstep.runtime import noise as fnoise

    _, lp = pair
    path = tmp_path / "learned.onnx"
    xo.export_teacher("gmm", lp, path)
    assert verify(path, threads=1).passed
    e = _C.Engine(str(path), threads=1)
    assert json.loads(e.plan_json)["rows"] == json.loads(lp.to_json())["rows"]
    x = e.sample(3, 9, labels=np.arange(9, dtype=np.int64) % 9)
    z, _ = fnoise.draw(3, 9, (2,), 0)
    ref = sample(lp, gmm.denoiser, torch.from_numpy(z), cond=torch.arange(9) % 9).numpy()
    assert float(np.abs(x - ref).max() / np.abs(ref).max()) <= 1e-4


# -------------------------------------------------------------------------------------------------------------
# CLI


def _cli(*args) -> int:
    """`fewstep fit …` in process (FEWSTEP_CACHE is set for the module); argparse's own errors exit 2."""
    from fewstep.cli import main

    try:
        return main(["fit", *args])
    except SystemExit as exc:
        return exc.code


def test_cli_fit_learned(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = _cli("--model", "gmm", "--solver", "ddim", "--nfe", "3", "--method", "plan", "--init-method", "dode",
              "--batch", "40", "--heldout", "20", "--rounds", "1", "--optimizer", "adam", "--out", str(out))
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "learned round 1 coef: held-out RMSE" in err  # the progress line
    plan = Plan.load(out)
    assert plan.provenance["method"] == "learned" and plan.provenance["winner"] in ("learned", "closed-form")
    assert math.isfinite(plan.provenance["fit_seconds"])
    rc = _cli("--model", "gmm", "--solver", "ddim", "--nfe", "3", "--method", "learned", "--init", str(out),
              "--rounds", "1", "--coef-steps", "2", "--grid-steps", "0", "--batch", "40", "--heldout", "20",
              "--evals", "0", "--patience", "1", "--lr-decay", "rounds", "--spread", "0.5", "--optimizer", "auto",
              "--grid-first", "--out", str(tmp_path / "q.json"), "--quiet")
    pv = Plan.load(tmp_path / "q.json").provenance
    assert rc == 0 and pv["init_method"] == "given" and pv["init_plan_method"] == "learned"
    lc = pv["learn_config"]
    assert lc["evals"] is None and lc["patience"] == 1
    assert (lc["lr_decay"], lc["spread"], lc["optimizer"], lc["grid_first"]) == ("rounds", 0.5, "auto", True)
    # 2 NFE: "auto" is Levenberg–Marquardt, one progress line per iteration
    rc = _cli("--model", "gmm", "--solver", "dpmpp-2m", "--nfe", "2", "--method", "learned", "--batch", "40",
              "--heldout", "20", "--lm-steps", "2", "--lm-batch", "30", "--budget", "0", "--lm-rounds", "1",
              "--out", str(tmp_path / "r.json"))
    err = capsys.readouterr().err
    pv = Plan.load(tmp_path / "r.json").provenance
    assert rc == 0 and pv["optimizer"] == "lm" and pv["steps"] == 2, err
    assert "lm iteration 2/2: training loss" in err and "learned round 1 lm: held-out RMSE" in err
    assert (pv["learn_config"]["lm_steps"], pv["learn_config"]["lm_batch"]) == (2, 30)
    # the feature term's flags reach the config (digits: the GMM has no network to take features from)
    rc = _cli("--model", "digits", "--solver", "ddim", "--nfe", "2", "--method", "plan", "--batch", "16",
              "--heldout", "8", "--lm-rounds", "1", "--budget", "0", "--features", "0.8", "--feature-sigma", "1.5",
              "--out", str(tmp_path / "s.json"), "--quiet")
    pv = Plan.load(tmp_path / "s.json").provenance
    assert rc == 0 and (pv["learn_config"]["features"], pv["learn_config"]["feature_sigma"]) == (0.8, 1.5)
    assert pv["heldout_score"] is not None


@pytest.mark.parametrize("args,match", [
    (["--loss", "l1"], "invalid choice"),
    (["--reg", "-1"], "--reg"),
    (["--heldout", "0"], "--heldout"),
    (["--lm-steps", "0"], "--lm-steps"),
    (["--optimizer", "lm", "--loss", "ld3"], "--optimizer lm"),
    (["--init-method", "nope"], "unknown method"),
    (["--nfe", "4", "--init", "PLAN"], "expected 4 NFE"),  # later flags win in argparse: --nfe 4 overrides 3
    (["--init", "FOREIGN"], "another teacher"),
    (["--features", "-1"], "--features"),
    (["--feature-sigma", "0"], "--feature-sigma"),
    (["--features", "0.8"], "no network with a middle block"),  # the GMM is closed form
])
def test_cli_errors_one_line(tmp_path, capsys, args, match):
    plan = tmp_path / "p3.json"
    build("ddim", 3, 0.002, 80.0).save(plan)
    foreign = build("ddim", 3, 0.002, 80.0)
    foreign.replace(provenance={"teacher_hash": "sha256:" + "0" * 64}).save(tmp_path / "f3.json")
    base = ["--model", "gmm", "--solver", "ddim", "--nfe", "3", "--method", "learned",
            "--out", str(tmp_path / "o.json")]
    files = {"PLAN": str(plan), "FOREIGN": str(tmp_path / "f3.json")}
    assert _cli(*base, *[files.get(a, a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert match in err[-1] and err[-1].startswith("fewstep"), err
    assert not (tmp_path / "o.json").exists()


# -------------------------------------------------------------------------------------------------------------
# cost: the fast init's side-by-side runs, the budget, joint phases


def test_run_many_matches_run_one_by_one(gmm):
    """``_run_many`` (the fast init's candidate grids side by side, one network call per row) computes what
    ``fitcore.run`` computes plan by plan. The GMM denoiser runs in float64 and each sample's arithmetic is the same
    sequence of operations in both, so the endpoints agree to rounding: ≤ 1e-12 of their size allows a few
    hundred float64 ulps (2.2e-16) of reordering and fails on any wrong coefficient, σ or sample pairing (changes
    of order 1e-3 or more). Plans of another row shape (DDIM beside DPM-Solver++(2M)) run one by one."""
    from fewstep.runtime import schedules
    from fewstep.runtime.solvers import get

    den = gmm.denoiser
    b = learned.make_batch(gmm, 12, 3, None, None)
    plans = [get("dpmpp-2m").build(schedules.edm(4, end, float(den.sigma_max), rho)) for end, rho in
             ((0.002, 7.0), (0.1, 7.0), (0.3, 3.0), (1.0, 15.0))]
    for group in (plans, [plans[0], build("ddim", 4, den.sigma_min, den.sigma_max)]):
        got = learned._run_many(group, den, b)
        assert len(got) == len(group)
        for p, x in zip(group, got):
            want = run(p, den, b)
            assert x.shape == want.shape and x.dtype == torch.float64
            assert float((x - want).abs().max()) <= 1e-12 * float(want.abs().max()), p.name


def test_budget_counts_the_fast_init_and_stops_before_a_late_step(gmm, monkeypatch):
    """From the fast init the budget covers the whole fit: an init that takes longer than the budget leaves time
    for the first step only (the first always runs; every later one is skipped when the median step duration says
    it would end late). From a given plan the budget counts from the optimisation's start. A phase whose first
    step would end past the deadline takes none."""
    real = learned.fast_init

    def slow_init(*a, **k):
        time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(learned, "fast_init", slow_init)
    cfg = LearnConfig(optimizer="adam", rounds=1, coef_steps=3, grid_steps=2, budget=0.25)
    late = fit_learned(gmm, "ddim", 3, cfg, batch=16, heldout=8).provenance
    assert late["out_of_budget"] and late["steps"] == 1 and late["init_seconds"] >= 0.3
    roomy = fit_learned(gmm, "ddim", 3, replace(cfg, budget=30.0), batch=16, heldout=8).provenance
    assert not roomy["out_of_budget"] and roomy["steps"] == 5
    den = gmm.denoiser
    b = learned.make_batch(gmm, 8, 0, None, None)
    params = learned._Params(build("ddim", 3, den.sigma_min, den.sigma_max), 2)
    obj = learned._Objective(params, den, b, learned.reference_target(gmm, b, den.sigma_max), LearnConfig(), 1.0)
    d0 = params.delta.detach().clone()
    done, late = learned._phase(obj, [params.delta], 0.1, 5, torch.Generator().manual_seed(0),
                                time.perf_counter() + 60.0, clock={"steps": [120.0, 1.0, 130.0]})
    assert (done, late) == (0, True) and torch.equal(params.delta.detach(), d0)


def test_joint_phases_where_the_budget_leaves_short_phases(gmm):
    """``joint_below``: where the evaluation budget shrinks the phases below that many steps, each round is one
    phase over coefficients and σ's together (its steps the sum of both), with one held-out check; otherwise the
    phases alternate as before."""
    den = gmm.denoiser
    init = build("dpmpp-2m", 3, den.sigma_min, den.sigma_max)
    b = learned.make_batch(gmm, 60, 0, None, None)
    ref = learned.reference_target(gmm, b, den.sigma_max)
    tr, he = learned._split(b, slice(0, 40)), learned._split(b, slice(40, 60))
    per_round = (6 + 4) * 8 * init.nfe
    cfg = LearnConfig(optimizer="adam", rounds=2, coef_steps=6, grid_steps=4, minibatch=8, patience=None,
                      evals=per_round, budget=None)  # ½: 3 + 2 steps, whatever the wall clock
    _, info = learn(init, den, tr, ref[:40], he, ref[40:], replace(cfg, joint_below=4), family="dpmpp-2m")
    assert info["joint_phases"] and info["steps"] == 2 * (3 + 2)
    assert [t for t, _ in info["phases"]] == ["init", "round 1 joint", "round 2 joint"]
    _, info = learn(init, den, tr, ref[:40], he, ref[40:], replace(cfg, joint_below=2), family="dpmpp-2m")
    assert not info["joint_phases"] and [t for t, _ in info["phases"]][1:3] == ["round 1 coef", "round 1 grid"]


# -------------------------------------------------------------------------------------------------------------
# Levenberg–Marquardt (--optimizer lm; "auto" at 2 NFE)


def test_perturbed_endpoints_rerun_only_what_a_change_reaches(gmm, monkeypatch):
    """``_perturbed_endpoints`` (the LM Jacobian's runs: each perturbed plan resumed from the base run's state at the
    first row it changes) gives what running every plan from the start gives, for coefficients of every row and
    the σ gaps with the coupled grid. The GMM runs in float64 and each sample's arithmetic is the same sequence of
    operations either way, so ≤ 1e-12 of the endpoint's size (a few hundred float64 ulps) fails on any wrong
    resume point, history or reused network output (every perturbation here moves the endpoint by > 1e-9, 1000× the
    tolerance; most by 1e-5 to 1e-2). It also
    makes fewer network calls: a row-e coefficient costs the calls of rows ≥ e (≥ e + 1 for c / q)."""
    den = gmm.denoiser
    b = learned.make_batch(gmm, 10, 2, None, None)
    calls, real = [], learned.call_denoiser

    def counting(den_, u, *a, **k):
        calls.append(u.shape[0])
        return real(den_, u, *a, **k)

    for fam, nfe in (("dpmpp-2m", 4), ("ddim", 3)):
        params = learned._Params(build(fam, nfe, den.sigma_min, den.sigma_max), 2)
        assert params.couple(fam)
        v = params.vector()
        vecs = v.repeat(len(v) + 1, 1)
        vecs[torch.arange(1, len(v) + 1), torch.arange(len(v))] += 1e-3
        calls.clear()
        monkeypatch.setattr(learned, "call_denoiser", counting)
        got, base = learned._perturbed_endpoints(params, vecs, den, b)
        shared = sum(calls)
        calls.clear()
        want = torch.stack(learned._side_by_side([params.rows(False, at=w) for w in vecs], params.init.sigma_init * b.z,
                                                 2, den, b))
        monkeypatch.setattr(learned, "call_denoiser", real)
        assert sum(calls) == len(vecs) * nfe * 10 and shared < 0.75 * sum(calls), (shared, sum(calls))
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max()), fam
        again, _ = learned._perturbed_endpoints(params, vecs[[0, 3, 1]], den, b, base)  # the base run reused
        assert float((again - got[[0, 3, 1]]).abs().max()) <= 1e-12 * float(want.abs().max())
        moved = (want[1:] - want[0]).flatten(1).abs().amax(1)
        assert float(moved.min()) > 1e-9  # every column is resolved: ≥ 1000× the tolerance above


def test_auto_uses_lm(gmm):
    """The default optimizer ("auto") with the L2 loss is Levenberg–Marquardt at every NFE, on all parameters at
    once, on LM_SAMPLE_ROWS // NFE samples (within [8, 32]) per iteration, ``lm_rounds`` rounds of ``lm_steps``
    iterations whatever ``patience`` says, never worse than the start on the held-out split; "rows" runs the σ's and
    then each row as blocks; LD3's loss keeps the first-order phases."""
    assert LearnConfig().optimizer == "auto" and LearnConfig().lm_blocks == "joint"
    pv = fit_learned(gmm, "dpmpp-2m", 2, LearnConfig(budget=None, lm_rounds=1, lm_steps=2), batch=40,
                     heldout=20).provenance
    assert pv["optimizer"] == "lm" and pv["steps"] == 2 and pv["heldout_rmse"] <= pv["heldout_rmse_init"]
    assert pv["lm_blocks"] == 1 and pv["lm_batch"] == 32
    for nfe in (4, 5):
        pv = fit_learned(gmm, "dpmpp-2m", nfe, LearnConfig(budget=None, lm_rounds=3, patience=1), batch=40,
                         heldout=20).provenance
        assert pv["optimizer"] == "lm" and pv["lm_blocks"] == 1 and pv["steps"] == 3 and not pv["stopped_early"]
        assert pv["lm_batch"] == learned.LM_SAMPLE_ROWS // nfe
        assert [t for t, _ in pv["phases"]] == ["init", "round 1 lm", "round 2 lm", "round 3 lm"]
        assert pv["heldout_rmse"] <= pv["heldout_rmse_init"]
    pv = fit_learned(gmm, "dpmpp-2m", 4, LearnConfig(budget=None, lm_rounds=2, lm_blocks="rows"), batch=40,
                     heldout=20).provenance
    assert pv["lm_blocks"] == 1 + 4 and pv["steps"] == 2 * 5 and pv["lm_batch"] == learned.LM_ROWS_BATCH
    pv = fit_learned(gmm, "dpmpp-2m", 2, LearnConfig(budget=None, rounds=1, loss="ld3"), batch=40,
                     heldout=20).provenance
    assert pv["optimizer"] == "auto" and "round 1 lm" not in [t for t, _ in pv["phases"]]
    for kw, match in ((dict(optimizer="lm", loss="ld3"), "--optimizer lm"), (dict(lm_steps=0), "--lm-steps"),
                      (dict(lm_batch=0), "--lm-batch"), (dict(lm_blocks="auto"), "--lm-blocks"),
                      (dict(lm_rounds=0), "--lm-rounds")):
        with pytest.raises(FitError, match=match):
            LearnConfig(**kw).check()


# -------------------------------------------------------------------------------------------------------------
# the feature term (LearnConfig.features)


@pytest.fixture(scope="module")
def digits():
    return load("digits")


def test_features_are_the_digits_encoder_and_leave_no_hook(digits):
    """``Denoiser.features`` on the digits UNet is its encoder up to the middle blocks (``dmd2.unet_bottleneck``,
    written out by hand) with the null label, whatever the batch's labels: the same float32 operations in the same
    order, so equal. The hook that stops the forward pass is removed, also when the network raises."""
    from fewstep.runtime.digits_net import NULL_LABEL
    from fewstep.training.dmd2 import unet_bottleneck

    den = digits.denoiser
    mod = den.feature_module()
    assert mod is den.model.mid[-1]
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sig = torch.full((5,), 0.5, dtype=torch.float64)
    got = den.features(x, sig, torch.arange(5))
    _, _, c_in, t = den.preconditioning(sig, x.ndim, x.dtype)
    want = unet_bottleneck(den.model, x * c_in, t, torch.full((5,), NULL_LABEL))
    assert got.shape == (5, want[0].numel()) and torch.equal(got, want.reshape(5, -1))
    assert not mod._forward_hooks
    with pytest.raises(RuntimeError):
        den.features(torch.randn(2, 3, 8, 8), sig[:2])  # wrong channel count: the stem raises before the hook
    assert not mod._forward_hooks


def test_features_refused_without_a_network(gmm):
    """The exact GMM has no network, so no features: one FitError naming the flag, before any work."""
    with pytest.raises(FitError, match="--features.*no network with a middle block"):
        fit_learned(gmm, "ddim", 2, LearnConfig(features=0.5, budget=None, lm_rounds=1), batch=8, heldout=4)


def test_feature_term_gradient_matches_central_differences(digits):
    """Adam's objective with the feature term, on a float64 copy of the digits UNet: autograd through the hook's
    early exit against a central difference along a random direction. In float64 the difference's truncation
    (h² · f''' ≈ 1e-10 relative at h = 1e-5) and rounding (ε/h ≈ 1e-11) sit far below the 1e-6 asserted; a
    dropped or detached feature term moves the derivative by more than the gap asserted between the two."""
    import copy

    from fewstep.runtime.digits_net import make_denoiser

    den = make_denoiser(copy.deepcopy(digits.denoiser.model).double(), digits.denoiser.sigma_data)
    plan = build("dpmpp-2m", 2, den.sigma_min, den.sigma_max)
    params = learned._Params(plan, 1)
    g = torch.Generator().manual_seed(3)
    b = Batch(torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64), torch.arange(6), None, torch.float64)
    with torch.no_grad():
        ref = learned.endpoint(params, den, b, b.z, b.cond)
    ref = ref + 0.05 * torch.randn(ref.shape, generator=g, dtype=torch.float64)
    u = torch.randn(params.delta.shape, generator=g, dtype=torch.float64)

    def derivs(cfg):
        obj = learned._Objective(params, den, b, ref, cfg, 1.0, 1.0)
        params.delta.grad = None
        obj().backward()
        auto = float((params.delta.grad * u).sum())
        h, d0 = 1e-5, params.delta.detach().clone()
        vals = []
        for sgn in (1, -1):
            with torch.no_grad():
                params.delta.copy_(d0 + sgn * h * u)
                vals.append(float(obj()))
        with torch.no_grad():
            params.delta.copy_(d0)
        return auto, (vals[0] - vals[1]) / (2 * h)

    auto, fd = derivs(LearnConfig(features=0.8, reg=0.0))
    assert abs(auto - fd) <= 1e-6 * abs(fd)
    plain, _ = derivs(LearnConfig(reg=0.0))
    assert abs(auto - plain) > 1e-3 * abs(fd)


def test_feature_term_fit_on_digits(digits):
    """Joint LM with the feature term: the held-out score (pixel MSE ÷ the start's + w · feature MSE ÷ the
    start's, MSEs over every entry; 1 + w at the start) picks the result, and is below the start's. Recomputed
    here from the returned plan through the reference executor and ``Denoiser.features`` directly, it equals the
    provenance's to the float32 rounding of the network: the executor and the fit's ``run_rows`` differ by
    ~1e-6 of the state (float32 ulps), ~1e-7 of each MSE; 1e-4 leaves 1000× room and is far below any change of
    plan or term (a wrong scale or a dropped term moves the score by ≥ 1e-2)."""
    from fewstep.training.fitcore import make_batch

    w, n_fit, n_held, seed = 0.8, 24, 12, 4
    cfg = LearnConfig(features=w, lm_rounds=3, lm_batch=16, budget=None)
    plan = fit_learned(digits, "dpmpp-2m", 2, cfg, batch=n_fit, heldout=n_held, seed=seed)
    pv = plan.provenance
    assert pv["optimizer"] == "lm" and pv["learn_config"]["features"] == w and pv["winner"] == "learned"
    assert pv["heldout_score"] < 1 + w
    den = digits.denoiser
    full = make_batch(digits, n_fit + n_held, seed, None, None)
    held = learned._split(full, slice(n_fit, n_fit + n_held))
    ref = learned.cached_reference(digits, full, n_fit + n_held, seed, None, None, plan.sigma_init)[n_fit:]
    sig = torch.full((n_held,), 0.5, dtype=torch.float64)
    with torch.no_grad():
        x = run(plan, den, held)
        fx, fr = (den.features(v.float(), sig, held.cond).double() for v in (x, ref))
    m1, f1 = float((x - ref).pow(2).mean()), float((fx - fr).pow(2).mean())
    mse0, fmse0 = pv["heldout_scales"]
    assert m1 / mse0 + w * f1 / fmse0 == pytest.approx(pv["heldout_score"], rel=1e-4)
    assert rms(x, ref) == pytest.approx(pv["heldout_rmse"], rel=1e-4)
