"""Solvers group A: DDIM, EDM Heun, DPM-Solver++(2M/3M), DDPM ancestral.

(a) convergence order against the exact GMM teacher; DDPM's one-step transition and the
    distribution it samples;
(b) peers: diffusers' schedulers stepping the same raw VP ε-model on the same σ's, float64;
(c) the DESIGN §2 worked examples as exact coefficient checks, and NFE bookkeeping.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from peers import F32_U, F64_U, linear_alphas_cumprod, rounding_bound, vp_gmm

from fewstep.runtime import sample, schedules
from fewstep.runtime.gmm import GMM
from fewstep.runtime.reference import reference_endpoint
from fewstep.runtime.solvers import SolverError, build, dpmpp
from fewstep.runtime.solvers.ddim import ddim
from fewstep.runtime.solvers.ddpm import ddpm
from fewstep.runtime.solvers.dpmpp import dpmpp_2m, dpmpp_3m
from fewstep.runtime.solvers.heun import heun

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


# ---------------------------------------------------------------------------------------
# (a) order on the exact GMM teacher
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher():
    """A smooth 3-D mixture, 300 noises and the exact endpoints.

    GMM.default()'s narrow, well-separated modes keep every method pre-asymptotic up to
    ~64 NFE (DDIM's slope was 0.8–0.85 there); four components of std 0.5–0.8 reach the
    asymptotic regime by ~16 steps. 400 RK4 steps: the reference differs from an 800-step
    one by 1e-8 RMS, below the smallest error fitted here (~1.5e-5) by three decades.
    """
    rng = np.random.default_rng(0)
    gmm = GMM(rng.normal(0, 1.0, (4, 3)), rng.uniform(0.5, 0.8, (4, 3)))
    z = torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = reference_endpoint(gmm, z, SIGMA_MAX, SIGMA_MIN, steps=400)
    return gmm, z, ref


def _rmse(a, b) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def _observed_order(teacher, make_plan, nfes):
    gmm, z, ref = teacher
    errs = [_rmse(sample(make_plan(n), gmm, z), ref) for n in nfes]
    slope = -np.polyfit(np.log(nfes), np.log(errs), 1)[0]
    return float(slope), errs


def _grid(schedule, n):
    return schedules.make(schedule, n, SIGMA_MIN, SIGMA_MAX)


def _registry_plan(name, schedule):
    return lambda nfe: build(name, nfe, SIGMA_MIN, SIGMA_MAX, schedule=schedule)


# NFE ranges where each method is in its asymptotic regime on this teacher. Fitted slopes (this setup):
# DDIM 1.00, Heun 2.22, 2M 2.24 (EDM) / 2.02 (logSNR), 3M 2.17, 3M-Taylor 3.08 (logSNR).
# Why the windows hold on any machine: the slopes are deterministic float64 functions of fixed seeds;
# rounding moves each error (≥ 1.4e-5) by ~1e-13 relative, the slope by < 1e-12, while the nearest
# window edge is ≥ 0.33 away (3M: 2.17 vs 2.5; DDIM 1.00 vs 0.65; 3M-Taylor 3.08 vs 2.65). The windows come
# from the analytic order ± pre-asymptotic slack and still fail on a lost order: DDIM's 1.00 on the
# same grids is 0.65 below every second-order window, a second-order 3M-Taylor would miss 2.65.
@pytest.mark.parametrize(
    "name, schedule, nfes, order",
    [
        ("ddim", "edm", [16, 32, 64], 1),
        ("heun", "edm", [17, 33, 65], 2),
        ("dpmpp-2m", "edm", [16, 32, 64], 2),
        ("dpmpp-2m", "logsnr", [16, 32, 64], 2),
    ],
)
def test_order_on_gmm(teacher, name, schedule, nfes, order):
    slope, errs = _observed_order(teacher, _registry_plan(name, schedule), nfes)
    assert errs[-1] > 1e-6, errs  # far above the reference's own error (1e-8)
    # Passes robustly, fails if the method loses one order.
    assert order - 0.35 <= slope <= order + 0.6, (slope, errs)


def test_order_dpmpp_3m_is_two(teacher):
    """DPM-Solver++(3M) as implemented by its authors, diffusers and k-diffusion is second order.

    Its D2 = (D1_0 − D1_1)/(r0 + r1) is h²·x̂0''/2, but the φ₃ weight it multiplies belongs to
    h²·x̂0'' (in the small-h limit the step is h·[D + Δ/2 + Δ²/3], Adams–Bashforth 3 needs 5Δ²/12),
    so the local error stays O(h³). Measured here (logSNR grid): local slopes fall from 2.31 to
    2.06 between 24 and 128 NFE; on EDM grids it is still below 2 at 128 NFE (fitted 1.48). We
    keep the peer formula (test_peer_dpmsolver matches diffusers to round-off) and pin its
    order, so a change to either is noticed.
    """
    slope, errs = _observed_order(teacher, _registry_plan("dpmpp-3m", "logsnr"), [32, 64, 128])
    assert errs[-1] > 1e-6, errs
    assert 1.65 <= slope <= 2.5, (slope, errs)


def test_order_dpmpp_3m_taylor_is_three(teacher):
    """With D2 doubled (the Taylor term it stands for) the same multistep method is third order."""
    slope, errs = _observed_order(
        teacher, lambda n: dpmpp.dpmpp_3m_taylor(_grid("logsnr", n)), [32, 64, 128]
    )
    assert errs[-1] > 1e-6, errs
    assert slope >= 3 - 0.35, (slope, errs)


# ---------------------------------------------------------------------------------------
# (a) DDPM: the one-step transition (exact) and the distribution it samples
# ---------------------------------------------------------------------------------------


def _vp_sigmas(ac: torch.Tensor, timesteps) -> np.ndarray:
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t) in float64 for each discrete timestep."""
    a = ac[torch.as_tensor(timesteps).long()].to(torch.float64)
    return ((1 - a) / a).sqrt().numpy()


def _ddpm_scheduler(n):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDPMScheduler(clip_sample=False, variance_type="fixed_small")
    sch.alphas_cumprod = linear_alphas_cumprod()  # float64: diffusers' own table is float32
    sch.set_timesteps(n)
    return sch


def test_ddpm_transition_matches_diffusers_posterior(monkeypatch):
    """Each row's x' = c·x + q·D + g·ε is DDPMScheduler's posterior step (fixed_small) mapped to VE."""
    n = 10
    sch = _ddpm_scheduler(n)
    from diffusers.schedulers import scheduling_ddpm

    ac = sch.alphas_cumprod
    ts = sch.timesteps
    sig = np.append(_vp_sigmas(ac, ts), 0.0)
    plan = ddpm(sig)
    assert plan.nfe == n and plan.stochastic_rows == list(range(n - 1))
    assert all(r.g > 0 for r in plan.rows[:-1]) and plan.rows[-1].g == 0.0
    g = torch.Generator().manual_seed(1)
    for i, t in enumerate(ts):
        row, s, s_next = plan.rows[i], sig[i], sig[i + 1]
        x = s * torch.randn(4, 2, generator=g, dtype=torch.float64)
        eps = torch.randn(4, 2, generator=g, dtype=torch.float64)
        e = torch.randn(4, 2, generator=g, dtype=torch.float64)
        d = x - s * eps  # the denoiser output an ε-model implies
        # diffusers draws the variance noise itself: hand it ours.
        monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, e=e, **k: e)
        a_t, a_prev = 1 / (1 + s**2), 1 / (1 + s_next**2)
        sch._step_index = None
        out_vp = sch.step(eps, t, x * math.sqrt(a_t)).prev_sample
        out_ve = out_vp / math.sqrt(a_prev)
        ours = row.c * x + row.q[0] * d + row.g * e
        assert len(row.q) == 1 and row.a == 1.0 and row.p == ()
        # Both sides: ≤ 32 float64 roundings on terms of size ≤ 2·s·M (x = s·z, d = x − s·ε, g ≤ s),
        # M = the largest draw: |Δ| ≤ 64·u·s·M ≈ 3e-14·s. Another β or variance type moves a coefficient
        # by ≥ 1e-3 relative, ~1e10 times that.
        m = max(float(x.abs().max()) / s, float(eps.abs().max()), float(e.abs().max()))
        torch.testing.assert_close(ours, out_ve, rtol=0, atol=64 * F64_U * s * m)
        # and the posterior in closed form (Ho et al. 2020, eq. 7), independent of diffusers
        beta = 1 - a_t / a_prev
        mean_x0 = math.sqrt(a_prev) * beta / (1 - a_t)
        mean_xt = math.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)
        std = math.sqrt((1 - a_prev) / (1 - a_t) * beta)
        # ≤ 8 roundings each; 1 − a_prev = 1 − 1/(1 + s'²) cancels with condition 1/s'² (1e4 into σ = 0.01:
        # 1.1e-12 there, 1e-15 elsewhere), so rel = 2·8·u·(1 + 1/s'²); abs only for the last row's exact zeros.
        exact = dict(rel=16 * F64_U * (1 + (1 / s_next**2 if s_next else 0)), abs=1e-300)
        assert row.q[0] == pytest.approx(mean_x0 / math.sqrt(a_prev), **exact)
        assert row.c == pytest.approx(mean_xt * math.sqrt(a_t) / math.sqrt(a_prev), **exact)
        assert row.g == pytest.approx(std / math.sqrt(a_prev), **exact)


def _gmm_moments(gmm):
    w, mu, var = gmm.weights, gmm.means, gmm.stds**2
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (torch.diag_embed(var) + mu[:, :, None] * mu[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def _sliced_w1(a, b, n_proj=64, seed=0):
    dirs = torch.randn(n_proj, a.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, pb = (a @ dirs.T).sort(0).values, (b @ dirs.T).sort(0).values
    return float((pa - pb).abs().mean())


def test_ddpm_samples_the_gmm():
    """200 ancestral steps sample GMM.default(): moments and sliced W1 within sampling noise.

    4000 samples: the mean's standard error is √(1.71/4000) = 0.021 per coordinate (atol 0.08 = 3.9 SE),
    a variance's ≈ √2·1.71/√4000 = 0.038 (atol 0.15 ≈ 4 SE); two exact sample sets of this size are
    0.027–0.036 apart in sliced W1 and DDPM's samples 0.027–0.041 from exact data (three seeds tried).
    Row noise scaled by 0.7 or 1.5 gives 0.17–0.19 and 0.11 and fails. With these seeds the test reads
    0.028 (mean), 0.081 (cov), 0.041 (W1; bound 0.06), 0.19 / 0.11 (controls; bound 0.09): every margin
    is ≥ 0.017, while the run is float64 with fixed seeds, so rounding on another machine moves these
    statistics by ~1e-12 and cannot cross a bound.
    """
    gmm = GMM.default()
    n, batch = 200, 4000
    plan = build("ddpm", n, SIGMA_MIN, SIGMA_MAX)
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(batch, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(len(plan.stochastic_rows), batch, 2, generator=gen, dtype=torch.float64)
    x = sample(plan, gmm, z, noise=noise)
    data = gmm.sample_data(batch, seed=3)
    mean, cov = _gmm_moments(gmm)
    assert torch.allclose(x.mean(0), mean, atol=0.08), (x.mean(0), mean)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.15), (torch.cov(x.T), cov)
    floor = _sliced_w1(gmm.sample_data(batch, seed=4), data)
    sw = _sliced_w1(x, data)
    assert sw < 0.06, (sw, floor)
    # Controls: the same check rejects samplers whose noise is off by −30% or +50%.
    for scale in (0.7, 1.5):
        off = plan.replace(rows=tuple(dataclasses.replace(r, g=scale * r.g) for r in plan.rows))
        assert _sliced_w1(sample(off, gmm, z, noise=noise), data) > 0.09, scale


# ---------------------------------------------------------------------------------------
# (b) peers: diffusers on the same raw VP ε-model and the same σ's
# ---------------------------------------------------------------------------------------

# Both sides evaluate one float64 network and the same algebra in a different order, so they may
# differ by rounding only: peers.rounding_bound (calls × 32 roundings × u × max|z|/max|out|, ×4) gives
# 1.4e-13 to 3.3e-13 here. Any real difference is orders above it: float32 anywhere ≥ 2⁻²⁴ ≈ 6e-8
# relative (the stock float32 runs below differ by 2.5e-7 to 8e-7), one wrong coefficient ≥ 1e-4.


def _peer_close(ours, theirs, z, sig, calls, u=F64_U, ops=32):
    """max|ours − theirs| / max|theirs| within the rounding bound; sig[-2] is the last call's σ."""
    bound = rounding_bound(u, calls, float(sig[-2]), float(z.abs().max()), float(theirs.abs().max()), ops)
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err <= bound, (err, bound)
    return err


@pytest.fixture(scope="module")
def vp():
    pytest.importorskip("diffusers")
    raw, den = vp_gmm()
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return raw, den, z


def _vp_start(sigma0, z):
    # fewstep starts at x = σ0·z in VE; the same point in VP is x·√ᾱ = σ0·z/√(1+σ0²). diffusers'
    # pipelines would start at z itself (1 + 2e-5 larger at σ0 = 157); we hand it our point.
    return sigma0 * z / math.sqrt(1 + sigma0**2)


def test_peer_ddim(vp):
    from diffusers import DDIMScheduler

    raw, den, z = vp
    n = 10
    sch = DDIMScheduler(clip_sample=False, set_alpha_to_one=True)
    sch.alphas_cumprod = linear_alphas_cumprod()
    sch.set_timesteps(n)
    ts = sch.timesteps
    # "leading" spacing: the last timestep is 0 and its prev timestep −100 < 0 reads
    # final_alpha_cumprod = 1, i.e. σ = 0: the last step returns x̂0.
    assert int(ts[-1]) - 1000 // n < 0 and float(sch.final_alpha_cumprod) == 1.0
    sig = np.append(_vp_sigmas(sch.alphas_cumprod, ts), 0.0)
    x = _vp_start(sig[0], z)
    for t in ts:
        x = sch.step(raw(x, t), t, x, eta=0.0).prev_sample
    _peer_close(sample(ddim(sig), den, z), x, z, sig, n)
    # the bound can fail: the same DDIM on σ's one part in 1e6 off lands outside it
    with pytest.raises(AssertionError):
        _peer_close(sample(ddim(sig * (1 + 1e-6)), den, z), x, z, sig, n)


class _Float64Torch:
    """`torch` as seen by diffusers' DPM-Solver module, with float32 meaning float64.

    DPMSolverMultistepScheduler.step casts the sample to float32 (and keeps σ's in float32),
    which bounds any comparison at ~1e-7. Swapping the module's `torch` makes that one cast a
    no-op so the comparison can be made at float64 round-off; the unpatched run is checked too.
    """

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("order, n", [(2, 10), (3, 10), (3, 16)])
def test_peer_dpmsolver(vp, monkeypatch, order, n):
    """DPMSolverMultistepScheduler(dpmsolver++, final_sigmas_type="zero", lower_order_final).

    n = 10 and 16 straddle diffusers' 15-step threshold for 3M's second-order penultimate step.
    """
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers import scheduling_dpmsolver_multistep as dpm_module

    raw, den, z = vp
    ac = linear_alphas_cumprod()

    def run(float64: bool):
        sch = DPMSolverMultistepScheduler(
            solver_order=order, algorithm_type="dpmsolver++", final_sigmas_type="zero", lower_order_final=True
        )
        sch.alphas_cumprod = ac
        sch.set_timesteps(n)
        ts = sch.timesteps
        sig = np.append(_vp_sigmas(ac, ts), 0.0)
        # diffusers' own σ's: from our float64 table, stored as float32 (one rounding, ≤ 2⁻²⁴ relative), ×2
        np.testing.assert_allclose(sch.sigmas.numpy(), sig, rtol=2.0**-23)
        if float64:
            sch.sigmas = torch.as_tensor(sig)
        x = _vp_start(sig[0], z)
        for t in ts:
            x = sch.step(raw(x, t), t, x).prev_sample
        return sig, x

    sig, theirs32 = run(False)
    ours = sample((dpmpp_2m if order == 2 else dpmpp_3m)(sig), den, z)
    # Stock diffusers rounds its VP state and its σ, α, λ, h and the update to float32: ≤ 8 float32
    # roundings per call on values of size ≤ |z| (the model and our side are float64).
    _peer_close(ours, theirs32, z, sig, n, u=F32_U, ops=8)
    with monkeypatch.context() as m:
        m.setattr(dpm_module, "torch", _Float64Torch())
        _, theirs = run(True)
    _peer_close(ours, theirs, z, sig, n)


def test_peer_heun(vp):
    from diffusers import HeunDiscreteScheduler

    raw, den, z = vp
    n = 6
    sch = HeunDiscreteScheduler(timestep_spacing="leading")  # integer timesteps: σ's are table entries
    sch.alphas_cumprod = linear_alphas_cumprod()
    sch.set_timesteps(n)
    ts = sch.timesteps
    # n steps make 2n − 1 model calls: [t0, t1, t1, …, t_{n−1}, t_{n−1}] — the last step to σ = 0 is Euler.
    assert len(ts) == 2 * n - 1 and float(ts[-1]) == float(ts[-2])
    sig = np.append(_vp_sigmas(sch.alphas_cumprod, torch.cat([ts[:1], ts[1::2]])), 0.0)
    both = torch.as_tensor(np.concatenate([sig[:1], np.repeat(sig[1:-1], 2), sig[-1:]]))
    np.testing.assert_allclose(sch.sigmas.numpy(), both.numpy(), rtol=2.0**-23)  # float32 copies: one rounding, ×2
    sch.sigmas = both  # the same σ's in float64
    x = sig[0] * z  # diffusers' Heun state is already the VE one
    for t in ts:
        # scale_model_input divides by √(σ²+1): the network sees the VP state, as VPEpsDenoiser's c_in
        x = sch.step(raw(sch.scale_model_input(x, t), t), t, x).prev_sample
    plan = heun(sig)
    assert plan.nfe == len(ts)
    _peer_close(sample(plan, den, z), x, z, sig, plan.nfe)


def test_peer_ddpm(vp):
    raw, den, z = vp
    n = 20
    sch = _ddpm_scheduler(n)
    ts = sch.timesteps
    sig = np.append(_vp_sigmas(sch.alphas_cumprod, ts), 0.0)
    plan = ddpm(sig)
    # diffusers draws one randn_tensor(shape, generator, dtype) per step with t > 0 (all but the last);
    # the same seed replayed in the same order gives our noise slices.
    gen = torch.Generator().manual_seed(7)
    x = _vp_start(sig[0], z)
    for t in ts:
        x = sch.step(raw(x, t), t, x, generator=gen).prev_sample
    replay = torch.Generator().manual_seed(7)
    noise = torch.stack([torch.randn(z.shape, generator=replay, dtype=torch.float64) for _ in plan.stochastic_rows])
    assert len(plan.stochastic_rows) == sum(int(t) > 0 for t in ts)
    _peer_close(sample(plan, den, z, noise=noise), x, z, sig, n)


# ---------------------------------------------------------------------------------------
# (c) DESIGN §2 worked examples and NFE bookkeeping
# ---------------------------------------------------------------------------------------

EXACT = dict(rel=1e-13, abs=1e-15)


def test_design_example_ddim():
    sig = _grid("edm", 7)
    plan = ddim(sig)
    assert plan.history == 0 and plan.nfe == 7
    for i, r in enumerate(plan.rows):
        ratio = sig[i + 1] / sig[i]
        assert r.sigma == sig[i] and r.a == 1.0 and r.p == () and r.g == 0.0 and r.s == 0.0
        assert r.c == pytest.approx(ratio, **EXACT)
        assert len(r.q) == 1 and r.q[0] == pytest.approx(1 - ratio, **EXACT)


def test_design_example_heun():
    sig = _grid("edm", 5)
    plan = heun(sig)
    assert plan.nfe == 2 * 5 - 1 and plan.history == 1
    for i in range(4):  # Heun steps σ → σ': rows 2i (predictor) and 2i + 1 (corrector)
        s, s2 = sig[i], sig[i + 1]
        pred, corr = plan.rows[2 * i], plan.rows[2 * i + 1]
        # the predictor only evaluates: x is updated once, by the corrector row
        assert pred.sigma == s and pred.a == 1.0 and pred.p == () and pred.c == 1.0 and not any(pred.q)
        # DESIGN §2: the second row evaluates at the Euler point, a = σ'/σ, p_1 = 1 − σ'/σ, σ_e = σ'
        assert corr.sigma == s2
        assert corr.a == pytest.approx(s2 / s, **EXACT) and corr.p[0] == pytest.approx(1 - s2 / s, **EXACT)
        # x + (σ'−σ)·½(d₁ + d₂) with d = (x − D)/σ: c = σ'/σ, q_0 = (σ−σ')/(2σ'), q_1 = (σ'−σ)(1/σ' − 2/σ)/2
        assert corr.c == pytest.approx(s2 / s, **EXACT)
        assert corr.q[0] == pytest.approx((s - s2) / (2 * s2), **EXACT)
        assert corr.q[1] == pytest.approx((s2 - s) * (1 / s2 - 2 / s) / 2, **EXACT)
    last = plan.rows[-1]  # Euler to σ = 0 returns D
    assert last.sigma == sig[-2] and last.a == 1.0 and not last.p
    assert last.c == pytest.approx(0.0, abs=1e-15) and last.q[0] == pytest.approx(1.0, **EXACT)


def test_dpmpp_rows():
    """2M's rows are Alg. 2 written as c, q; every step to σ = 0 returns D (c = 0, q = [1])."""
    sig = _grid("logsnr", 6)
    p2, p3 = dpmpp_2m(sig), dpmpp_3m(sig)
    assert p2.history == 1 and p3.history == 2
    for plan in (p2, p3):
        assert plan.rows[-1].c == 0.0 and plan.rows[-1].q == (1.0,)
        assert all(r.a == 1.0 and r.p == () and r.g == 0.0 for r in plan.rows)
        assert plan.rows[0].q[0] == pytest.approx(1 - sig[1] / sig[0], **EXACT)
    for i in range(1, 4):
        s, s2 = sig[i], sig[i + 1]
        h, r = math.log(s / s2), math.log(sig[i - 1] / s) / math.log(s / s2)
        phi = 1 - s2 / s
        row = p2.rows[i]
        assert row.c == pytest.approx(s2 / s, **EXACT)
        assert row.q[0] == pytest.approx(phi * (1 + 1 / (2 * r)), **EXACT) and h > 0
        assert row.q[1] == pytest.approx(-phi / (2 * r), **EXACT)
    # 3M: step 1 is 2M's; fewer than 15 steps, so the step into σ_min is second order too
    assert p3.rows[1] == p2.rows[1] and p3.rows[4] == p2.rows[4] and len(p3.rows[2].q) == 3


@pytest.mark.parametrize("name", ["ddim", "heun", "dpmpp-2m", "dpmpp-3m", "ddpm"])
@pytest.mark.parametrize("nfe", [1, 2, 3, 5, 9, 16])
def test_nfe_matches_registry(name, nfe):
    if name == "heun" and nfe % 2 == 0:
        with pytest.raises(SolverError, match="2n − 1"):
            build(name, nfe, SIGMA_MIN, SIGMA_MAX)
        return
    plan = build(name, nfe, SIGMA_MIN, SIGMA_MAX)
    assert plan.nfe == nfe and plan.name == f"{name}-{nfe}"
    assert plan.rows[0].sigma == SIGMA_MAX and plan.sigma_init == SIGMA_MAX
    assert plan.rows[-1].sigma == pytest.approx(SIGMA_MIN if nfe > 1 else SIGMA_MAX, rel=1e-12)
