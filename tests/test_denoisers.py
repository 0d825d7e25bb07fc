"""Denoiser adapters against exact answers, and the diffusers adapter against the unet itself.

Parameterisations: a raw network that predicts ε / v / x0 / flow velocity EXACTLY from the
GMM teacher (with its own, independent t → σ map) must give back the GMM's D through the
adapter. Diffusers: tiny random unets, saved and loaded from disk, against
c_skip·x + c_out·unet(c_in·x, t) written out here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from fewstep.runtime.denoisers import (
    EDMDenoiser,
    FlowDenoiser,
    VPEpsDenoiser,
    VPVDenoiser,
    VPX0Denoiser,
)
from fewstep.runtime.gmm import GMM

F64 = torch.float64
F64_U = 2.0**-53  # unit roundoff of float64
N_TRAIN = 1000


def linear_table(n=N_TRAIN, start=1e-4, end=0.02):
    """DDPM's linear β table in numpy float64, written independently of the adapters."""
    return np.cumprod(1 - np.linspace(start, end, n))


def table_sigmas(ac):
    return np.sqrt((1 - ac) / ac)


def t_to_sigma_np(t, ac):
    """Independent inverse of σ → t: linear interpolation of log σ over integer t."""
    ls = np.log(table_sigmas(ac))
    return torch.as_tensor(np.exp(np.interp(t.detach().numpy(), np.arange(len(ls)), ls)), dtype=F64)


def col(s, x):
    return s.reshape(-1, *([1] * (x.ndim - 1)))


def t_tolerance(log_sigmas) -> float:
    """Bound on |σ_to_t(σ) − t| for a table σ, or for the float64 round trip t → σ → t.

    log σ reaches σ_to_t with ≤ 8 roundings of a value ≤ L = max|log σ| (t_to_sigma's interpolation 3, its exp
    and the log 1 each, numpy's log vs torch's of the same σ 2, the subtraction log σ − lo 1): ≤ 8·u·L absolute.
    Dividing by the interval's width hi − lo ≥ Δ_min turns that into ≤ 8·u·L/Δ_min of t; the final
    (idx − 1) + frac rounds at |t| < N: ≤ u·N. Safety ×4. DDPM's linear table: L = 5.1, Δ_min = 5.0e-3,
    N = 1000: 4.1e-12 (t reads one ulp of 999, 1.1e-13, at worst).
    """
    ls = torch.as_tensor(log_sigmas, dtype=F64)
    return 4 * F64_U * (8 * float(ls.abs().max()) / float(ls.diff().min()) + len(ls))


def exact_bound(x, eta):
    """Per-sample bound on |D_adapter − D_gmm| when the raw network is the GMM written exactly (float64).

    Rounding: the adapter (c_in·x, c_skip·x + c_out·F) and the raw network (VP↔VE or flow↔VE, ε / v / x0 from D)
    do ≤ 40 roundings between them, each on a value ≤ max|x| (x = x0 + σ·n reaches σ_max·|n|; D = x − σ·ε cancels
    it back to data size, so the error is u·|x|, not u·|D|). σ: the raw network maps t back to its own
    σ' = σ·(1 + η) with an independent formula, and D moves by ≤ 2η·|x| (x − D ≈ σ·n carries all of D's σ
    dependence at first order). Safety ×4. ``eta`` is per sample (a tensor) or one number.
    """
    xm = x.abs().reshape(len(x), -1).max(1).values
    return 4 * (40 * F64_U + 2 * torch.as_tensor(eta, dtype=F64)) * xm


def vp_eta(ac, sigmas):
    """η of the VP adapter → RawVP: t is rounded at |t| < N (u·N) and read back through log σ's slope, the width
    Δ of the table interval around σ, plus ≤ 6 roundings of |log σ| ≤ L in the logs, exps and interpolations."""
    ls = torch.as_tensor(np.log(table_sigmas(ac)), dtype=F64)
    wid = ls.diff()
    i = torch.searchsorted(ls, sigmas.log().contiguous()).clamp(1, len(ls) - 1)
    delta = torch.maximum(wid[i - 1], wid[i.clamp(max=len(wid) - 1)])
    return F64_U * (len(ls) * delta + 6 * float(ls.abs().max()))


def per_sample_err(a, b):
    return (a - b).abs().reshape(len(a), -1).max(1).values


@pytest.fixture(scope="module")
def gmm():
    return GMM.random(dim=3, k=4, seed=0)


def noisy(gmm, sigmas, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = gmm.sample_data(len(sigmas), seed=seed)
    return x0 + col(sigmas, x0) * torch.randn(x0.shape, generator=g, dtype=F64)


def vp_test_sigmas(ac):
    """Off-grid σ's across the whole table plus a few grid σ's, float64."""
    s = table_sigmas(ac)
    off = np.exp(np.linspace(np.log(s[0]) + 1e-6, np.log(s[-1]) - 1e-6, 50))
    return torch.as_tensor(np.concatenate([off, s[[0, 1, 17, 500, 998, 999]]]), dtype=F64)


# --- exact raw networks built from the GMM ------------------------------------------------
class RawVP(nn.Module):
    """The GMM as a VP network predicting ε, v or x0 from (x_t, integer-scale t)."""

    def __init__(self, gmm, ac, prediction):
        super().__init__()
        self.gmm, self.ac, self.prediction = gmm, ac, prediction

    def forward(self, x_t, t, cond=None):
        sigma = t_to_sigma_np(t, self.ac)
        s = col(sigma, x_t)
        alpha = 1 / (1 + s**2).sqrt()
        x = x_t / alpha  # VP → VE state
        d = self.gmm(x, sigma, cond)
        eps = (x - d) / s
        return {"epsilon": eps, "v_prediction": alpha * eps - s * alpha * d, "sample": d}[self.prediction]


class RawFlow(nn.Module):
    """The GMM as a flow network: v = z − x0 at x_t = (1−t)·x0 + t·z, time input t·t_scale."""

    def __init__(self, gmm, t_scale):
        super().__init__()
        self.gmm, self.t_scale = gmm, t_scale

    def forward(self, x_t, t, cond=None):
        tt = t / self.t_scale
        sigma = tt / (1 - tt)
        s = col(sigma, x_t)
        x = x_t * (1 + s)
        d = self.gmm(x, sigma, cond)
        return (x - d) / s - d


def edm_table1(sigma, sd):
    """Karras et al. (2022) Table 1, EDM column: c_skip, c_out, c_in, c_noise."""
    return (sd**2 / (sigma**2 + sd**2), sigma * sd / torch.sqrt(sigma**2 + sd**2),
            1 / torch.sqrt(sigma**2 + sd**2), torch.log(sigma) / 4)


class RawEDM(nn.Module):
    """The GMM as an EDM network F with D = c_skip·x + c_out·F, time input c_noise."""

    def __init__(self, gmm, sd):
        super().__init__()
        self.gmm, self.sd = gmm, sd

    def forward(self, x_in, c_noise, cond=None):
        sigma = torch.exp(4 * c_noise)
        c_skip, c_out, c_in, _ = (col(c, x_in) for c in edm_table1(sigma, self.sd))
        x = x_in / c_in
        return (self.gmm(x, sigma, cond) - c_skip * x) / c_out


# --- parameterisations against the exact D ------------------------------------------------
@pytest.mark.parametrize("cls,prediction", [(VPEpsDenoiser, "epsilon"), (VPVDenoiser, "v_prediction"),
                                            (VPX0Denoiser, "sample")])
def test_vp_parameterisations_are_exact(gmm, cls, prediction):
    ac = linear_table()
    den = cls(RawVP(gmm, ac, prediction), torch.as_tensor(ac))
    sigmas = vp_test_sigmas(ac)
    x = noisy(gmm, sigmas)
    bound = exact_bound(x, vp_eta(ac, sigmas))  # ≤ 1.9e-11 here (η ≤ 4.7e-14)
    assert (per_sample_err(den(x, sigmas), gmm(x, sigmas)) <= bound).all()
    # the bound sees a raw network trained on another table (β_end off by 0.1 %)
    wrong = cls(RawVP(gmm, linear_table(end=0.02002), prediction), torch.as_tensor(ac))
    assert (per_sample_err(wrong(x, sigmas), gmm(x, sigmas)) > bound).any()
    # σ_min, σ_max: √((1 − ᾱ)/ᾱ) on the same table, correctly rounded −, /, √ in numpy and torch alike: equal;
    # rel 1e-15 (9u) leaves room for one last-bit difference, far below any other table
    assert den.sigma_min == pytest.approx(table_sigmas(ac)[0], rel=1e-15)
    assert den.sigma_max == pytest.approx(table_sigmas(ac)[-1], rel=1e-15)


def test_flow_parameterisation_is_exact(gmm):
    den = FlowDenoiser(RawFlow(gmm, 1000.0), t_scale=1000.0)
    sigmas = torch.logspace(-3, 3, 61, dtype=F64)
    x = noisy(gmm, sigmas)
    # σ' = tt/(1 − tt) from the rounded tt = t/1000 errs by η ≈ 3u·(1 + σ) relative, but with x_t = x/(1 + σ)
    # fixed it moves D only by ≈ η·|x|/(1 + σ)² ≤ 3u·|x|: η = 2u covers it in exact_bound's 2η·|x|. ≤ 2.5e-11 here.
    bound = exact_bound(x, 2 * F64_U)
    assert (per_sample_err(den(x, sigmas), gmm(x, sigmas)) <= bound).all()
    wrong = FlowDenoiser(RawFlow(gmm, 1000.0), t_scale=999.0)  # a wrong time scale must fail the bound
    assert (per_sample_err(wrong(x, sigmas), gmm(x, sigmas)) > bound).any()
    # σ = t/(1−t): the model's time input is t·t_scale; σ/(1 + σ)·1000 is 3 roundings of values ≤ 1000
    # (≤ 3·1.1e-13), 1e-12 ≈ 3× that
    t = den.sigma_to_t(torch.tensor([1.0, 3.0], dtype=F64))
    assert t.tolist() == pytest.approx([500.0, 750.0], abs=1e-12)


def test_edm_matches_table1_and_is_exact(gmm):
    sd = 0.7
    den = EDMDenoiser(RawEDM(gmm, sd), sigma_data=sd)
    sigmas = torch.logspace(math.log10(0.002), math.log10(80), 57, dtype=F64)
    c_skip, c_out, c_in, c_noise = edm_table1(sigmas, sd)
    # the same formulas in another order: ≤ 6 roundings each side (u = 1.1e-16): 1.3e-15; 1e-14 ≈ 7× that
    for got, want in zip((*den.get_scalings(sigmas), den.sigma_to_t(sigmas)), (c_skip, c_out, c_in, c_noise)):
        assert torch.allclose(got, want, rtol=1e-14, atol=0)
    x = noisy(gmm, sigmas)
    # RawEDM's σ' = exp(4·(log σ)/4): η ≤ u·(|log σ| + 1) (the log's error, ×4/4 exact, exp's own): ≤ 5.4u
    bound = exact_bound(x, F64_U * (sigmas.log().abs() + 1))  # ≤ 3.3e-12 here
    assert (per_sample_err(den(x, sigmas), gmm(x, sigmas)) <= bound).all()
    wrong = EDMDenoiser(RawEDM(gmm, sd), sigma_data=0.5)  # σ_data not the network's: fails the bound
    assert (per_sample_err(wrong(x, sigmas), gmm(x, sigmas)) > bound).any()


def test_vp_eps_scalings_match_table1():
    # Karras et al. Table 1, VP column: c_skip = 1, c_out = −σ, c_in = 1/√(σ² + 1)
    den = VPEpsDenoiser(None, torch.as_tensor(linear_table()))
    s = torch.logspace(-2, 2, 9, dtype=F64)
    c_skip, c_out, c_in = den.get_scalings(s)
    assert torch.equal(c_skip, torch.ones_like(s))
    assert torch.equal(c_out, -s)
    assert torch.allclose(c_in, 1 / torch.sqrt(s**2 + 1), rtol=1e-15, atol=0)  # same 4 ops, same order: ≤ 4u·0


# --- σ ↔ t on a discrete table ------------------------------------------------------------
def test_sigma_t_round_trip_and_integer_grid():
    ac = linear_table()
    den = VPEpsDenoiser(None, torch.as_tensor(ac))
    grid = torch.as_tensor(table_sigmas(ac), dtype=F64)
    tol = t_tolerance(den.log_sigmas)  # 4.1e-12 (derivation in t_tolerance)
    t = den.sigma_to_t(grid)
    assert (t - torch.arange(N_TRAIN, dtype=F64)).abs().max().item() < tol
    # …and it can fail: σ off by 1e-9 relative moves t by ≥ 1e-9/Δ_max = 2.5e-9 (σ_max + 1e-9 is clamped: left out)
    assert (den.sigma_to_t(grid[:-1] * (1 + 1e-9)) - torch.arange(N_TRAIN - 1, dtype=F64)).abs().min().item() > tol
    # fractional t → σ → t, and the t → σ map agrees with an independent interpolation: both interpolate
    # log σ with ≤ 3 roundings of |log σ| ≤ 5.1 and exponentiate (exp's relative error = the argument's absolute
    # error + u): ≤ 2·(3·5.1 + 1)·u = 3.6e-15 relative; 1e-13 is 28× that
    tf = torch.linspace(0, N_TRAIN - 1, 4001, dtype=F64)
    s = den.t_to_sigma(tf)
    assert torch.allclose(s, t_to_sigma_np(tf, ac), rtol=1e-13, atol=0)
    assert (den.sigma_to_t(s) - tf).abs().max().item() < tol
    # outside the table: clamped to its ends
    assert den.sigma_to_t(torch.tensor([1e-5, 1e4], dtype=F64)).tolist() == [0.0, N_TRAIN - 1]
    # the table is σ bookkeeping: a half-precision cast of the module must not round it
    den.half()
    assert (den.sigma_to_t(grid) - torch.arange(N_TRAIN, dtype=F64)).abs().max().item() < tol


def test_bad_table_is_refused():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPEpsDenoiser(None, torch.tensor([0.9, 0.95, 0.5], dtype=F64))


# --- classifier-free guidance -------------------------------------------------------------
class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.batches = inner, []

    def forward(self, x, t, cond=None):
        self.batches.append(x.shape[0])
        return self.inner(x, t, cond)


def test_cfg_is_one_batched_call(gmm):
    raw = Counting(RawEDM(gmm, 0.5))
    den = EDMDenoiser(raw, null_label=gmm.null_label)
    b = 5
    sigmas = torch.tensor([0.05, 0.3, 1.0, 4.0, 20.0], dtype=F64)
    x = noisy(gmm, sigmas, seed=3)
    labels = torch.tensor([0, 1, 2, 3, 1])
    w = 2.5
    guided = den(x, sigmas, labels, guidance=w)
    assert raw.batches == [2 * b]
    d_u = den(x, sigmas, torch.full_like(labels, gmm.null_label))
    d_c = den(x, sigmas, labels)
    assert raw.batches == [2 * b, b, b]
    # Each D (batched or not) is within exact_bound of the GMM's own D (η of RawEDM's σ' as in the EDM test);
    # the combination scales that by 1 + 2w and adds its 3 roundings of values ≤ (1 + 2w)·max|D|. The batched
    # call and the separate ones are each that close to the GMM's guided D, so within twice it of each other.
    bound = (1 + 2 * w) * (exact_bound(x, F64_U * (sigmas.log().abs() + 1))
                           + 3 * F64_U * per_sample_err(d_c.abs() + d_u.abs(), 0 * d_c))
    assert (per_sample_err(guided, d_u + w * (d_c - d_u)) <= 2 * bound).all()
    # the guided result really differs from the conditional one (the check can fail)
    assert (guided - d_c).abs().max().item() > 1e-3
    raw.batches.clear()
    plain = den(x, sigmas, labels, guidance=1.0)
    assert raw.batches == [b]
    assert torch.equal(plain, d_c)
    # and the exact answer: GMM's own guided D
    assert (per_sample_err(guided, gmm(x, sigmas, labels, guidance=w)) <= bound).all()


def test_cfg_without_null_conditioning_raises(gmm):
    den = VPEpsDenoiser(RawVP(gmm, linear_table(), "epsilon"), torch.as_tensor(linear_table()))
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="unconditional"):
        den(x, torch.ones(2, dtype=F64), torch.tensor([0, 1]), guidance=3.0)


# --- scheduler configs → tables -----------------------------------------------------------
diffusers = pytest.importorskip("diffusers")
from fewstep.runtime.diffusers_adapter import (  # noqa: E402
    DiffusersUNet,
    alphas_cumprod_from_config,
    from_diffusers,
    load_diffusers,
)

U32 = 2.0**-24  # float32 unit roundoff


def float32_table_bound(betas: np.ndarray) -> np.ndarray:
    """Relative error bound of diffusers' float32 ᾱ_i = Π_{j≤i} fl(1 − β̃_j) against the exact product.

    β̃_j is β_j evaluated in float32: linspace (≤ 2 ulp of its largest end), then at most a square,
    a sigmoid and an affine map (≤ 2 ulp each, plus twice the linspace error through the square), so
    |β̃_j − β_j| ≤ 8u·β_j + 12u·β_max for every built-in schedule (u = 2⁻²⁴). Factor j then carries
    the relative error (8u·β_j + 12u·β_max)/(1 − β_j) + u (the rounding of 1 − β̃) and the running
    product one more u per multiply. A product of factors (1 + δ_j) is off by at most
    exp(Σ|δ_j|) − 1: the n·2⁻²⁴ growth of an n-term float32 product, with no first-order shortcut.
    """
    bmax = betas.max()
    per = (8 * U32 * betas + 12 * U32 * bmax) / (1 - betas) + 2 * U32
    return np.expm1(np.cumsum(per))


def zero_snr_float32_bound(ac: np.ndarray, betas: np.ndarray) -> np.ndarray:
    """The same bound through diffusers' float32 zero-terminal-SNR rescale (Lin et al. 2023, Alg. 1).

    s_j = √ᾱ_j carries δ_j = s_j·(r_j/2 + u) (r: the product's bound above). The shift s_i − s_T
    cancels: its relative error is (δ_i + δ_T)/(s_i − s_T) + u, which grows without bound as i → T;
    the scale s_0/(s_0 − s_T) adds (δ_0 + δ_T)/(s_0 − s_T) + r_0/2 + 3u, the square doubles the sum,
    +u. diffusers then divides consecutive entries and multiplies them back: the ratios telescope,
    so what is left is that squared error at i (and at 0) plus, per entry, the division, the
    1 − α and 1 − β roundings (the first exact by Sterbenz while α ≥ ½, else u·β/α) and the multiply.
    """
    r = float32_table_bound(betas)
    s = np.sqrt(ac)
    delta = s * (r / 2 + U32)
    rho_scale = (delta[0] + delta[-1]) / (s[0] - s[-1]) + r[0] / 2 + 3 * U32
    with np.errstate(divide="ignore"):
        rho = (delta + delta[-1]) / (s - s[-1]) + U32 + rho_scale
    sq = 2 * rho + U32
    t2 = (s - s[-1]) ** 2
    alpha = np.concatenate([t2[:1], t2[1:] / t2[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        step = 3 * U32 + U32 * np.where(alpha < 0.5, (1 - alpha) / alpha, 0.0)
    return np.expm1(sq + sq[0] + np.cumsum(step))


SCHEDULES = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="sigmoid"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True),
    dict(beta_schedule="linear", num_train_timesteps=100),
]


def _table_error_and_bound(kw, ours_kw=None):
    """(relative error of our float64 table against diffusers' float32 one, its float32 bound)."""
    sched = diffusers.DDPMScheduler(**kw)
    ref = sched.alphas_cumprod.to(F64)
    ours = alphas_cumprod_from_config({**sched.config, **(ours_kw or {})})
    assert ours.dtype == F64 and ours.shape == ref.shape
    plain = alphas_cumprod_from_config({**sched.config, "rescale_betas_zero_snr": False}).numpy()
    betas = 1 - plain / np.concatenate([[1.0], plain[:-1]])
    if kw.get("rescale_betas_zero_snr"):
        assert ref[-1].item() == 0.0 and ours[-1].item() == 2.0**-24  # σ_T = ∞ is moved to a finite σ
        bound = zero_snr_float32_bound(plain, betas)[:-1]
        ours, ref = ours[:-1], ref[:-1]
    else:
        bound = float32_table_bound(betas)
    return ((ours - ref).abs() / ref).numpy(), bound


@pytest.mark.parametrize("kw", SCHEDULES)
def test_beta_tables_match_diffusers(kw):
    # diffusers builds the table in float32, ours in float64: every entry within the float32 bound
    rel, bound = _table_error_and_bound(kw)
    assert np.all(rel <= bound), (np.argmax(rel / bound), (rel / bound).max())
    # …and the float64 table is the exact one: against a numpy cumprod of the same β's
    if kw["beta_schedule"] == "linear" and "num_train_timesteps" not in kw:
        ours = alphas_cumprod_from_config(diffusers.DDPMScheduler(**kw).config)
        assert np.allclose(ours.numpy(), linear_table(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("kw", [SCHEDULES[1], SCHEDULES[4], SCHEDULES[3]])
def test_beta_table_bound_fails_a_wrong_schedule(kw):
    """The bound is not vacuous: β_end off by 0.1 %, or a rescale forgotten, breaks it."""
    rel, bound = _table_error_and_bound(kw, {"beta_end": kw.get("beta_end", 0.02) * 1.001})
    assert np.any(rel > bound)
    if kw.get("rescale_betas_zero_snr"):
        sched = diffusers.DDPMScheduler(**kw)
        ours = alphas_cumprod_from_config({**sched.config, "rescale_betas_zero_snr": False})[:-1].numpy()
        ref = sched.alphas_cumprod.to(F64)[:-1].numpy()
        assert np.any(np.abs(ours - ref) / ref > _table_error_and_bound(kw)[1])


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="beta_schedule"):
        alphas_cumprod_from_config({"beta_schedule": "quartic"})
    # hostile numbers: one line naming the field, before a table of 10^12 entries or a √ of a negative
    for cfg, msg in [({"num_train_timesteps": 10**12}, "num_train_timesteps must be an integer"),
                     ({"num_train_timesteps": "1000"}, "num_train_timesteps"),
                     ({"beta_schedule": "scaled_linear", "beta_start": -1}, r"beta_start must be a number in \[0, 1\)"),
                     ({"beta_end": float("nan")}, "beta_end"), ({"trained_betas": [0.5, "x"]}, "trained_betas")]:
        with pytest.raises(ValueError, match=msg):
            alphas_cumprod_from_config(cfg)
    unet = tiny_unet()
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler"}
    for cfg, msg in [({**flow, "num_train_timesteps": 1}, "num_train_timesteps"),  # was a ZeroDivisionError
                     ({**flow, "shift": -1.0}, "shift must be a positive number"),
                     ({**flow, "flow_shift": float("inf")}, "flow_shift"),
                     ({"_class_name": "EDMEulerScheduler", "sigma_min": float("nan")}, "sigma_min")]:
        with pytest.raises(ValueError, match=msg):
            from_diffusers(unet, cfg)
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(unet, {"_class_name": "DDPMScheduler", "prediction_type": "score"})
    with pytest.raises(FileNotFoundError, match="scheduler"):
        from_diffusers(unet, tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_diffusers(tmp_path)
    unet.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="scheduler_config"):
        load_diffusers(tmp_path / "bare")
    with pytest.raises(ValueError, match="null_label"):
        from_diffusers(unet, {}, null_label=3)  # an unconditional unet has no class labels
    # A config that is not its weights' is refused before the model is built at full size.
    cfg_path = tmp_path / "bare" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for edit, msg in [({"block_out_channels": [40000, 80000]}, "far larger than its weights"),
                      ({"layers_per_block": 10**6}, "far larger than its weights"),
                      ({"block_out_channels": [c * 2 for c in cfg["block_out_channels"]]}, r"conv_in\.weight is")]:
        cfg_path.write_text(json.dumps({**cfg, **edit}))
        with pytest.raises(ValueError, match=msg):
            load_diffusers(tmp_path / "bare", {"beta_schedule": "linear"})
    with pytest.raises(ValueError, match="not supported"):
        from_diffusers(unet, {"_class_name": "ScoreSdeVeScheduler"})


def test_missing_diffusers_is_named(tmp_path, monkeypatch):
    tiny_unet().save_pretrained(tmp_path / "unet")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match="diffusers"):
        load_diffusers(tmp_path, {"beta_schedule": "linear"})


def test_runtime_import_needs_no_diffusers():
    code = ("import sys; import fewstep.runtime, fewstep.runtime.denoisers, fewstep.runtime.diffusers_adapter; "
            "assert 'diffusers' not in sys.modules, 'diffusers imported'")
    # cwd away from the repo root, whose un-built fewstep/ folder `-c` would import first
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.abspath(__file__)))


# --- diffusers unets ----------------------------------------------------------------------
def tiny_unet(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=kw.pop("out_channels", 1), block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, **kw).eval()


def tiny_cond_unet():
    torch.manual_seed(1)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2).eval()


def vp_grid_and_off_grid():
    """Four grid σ's (t = 0, 10, 500, 999) and four between grid points, with their exact t."""
    ac = linear_table()
    s = table_sigmas(ac)
    t_grid = np.array([0.0, 10.0, 500.0, 999.0])
    t_off = np.array([3.25, 120.5, 640.75, 998.5])
    ls = np.log(s)
    off = np.exp(np.interp(t_off, np.arange(N_TRAIN), ls))
    return (torch.as_tensor(np.concatenate([s[t_grid.astype(int)], off]), dtype=F64),
            torch.as_tensor(np.concatenate([t_grid, t_off]), dtype=F64))


# Adapter vs manual_vp (same batch): both hand the float32 UNet c_in·x rounded once from float64, so its
# input agrees bit for bit or by one float32 ulp where the float64 c_in differs in its last bit; the rest
# is float64 scaling (~1e-16; 0 to 2e-16 is what these tests read). The bound 1e-6 of max|D| = 16·2⁻²⁴
# admits that one ulp through a UNet with input-to-output gain ≤ 16; a wrong c_skip, c_out or c_in (or
# prediction type) changes D by O(1) at some σ of the grid, which spans 0.01 to 157.
def manual_vp(unet, x, sigma, t, prediction, **kw):
    """c_skip·x + c_out·unet(c_in·x, t), VP scalings written out for each prediction type."""
    s = col(sigma, x)
    c_in = 1 / torch.sqrt(1 + s**2)
    scalings = {"epsilon": (1.0, -s), "v_prediction": (1 / (1 + s**2), -s * c_in), "sample": (0.0, 1.0)}
    c_skip, c_out = scalings[prediction]
    with torch.no_grad():
        out = unet((c_in * x).float(), t.float(), **kw).sample.to(F64)
    return c_skip * x + c_out * out


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_pipeline_dir_round_trip(tmp_path, prediction):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDPMScheduler(beta_schedule="linear", prediction_type=prediction).save_config(tmp_path / "scheduler")
    den = load_diffusers(tmp_path)
    assert type(den) is {"epsilon": VPEpsDenoiser, "v_prediction": VPVDenoiser, "sample": VPX0Denoiser}[prediction]
    sigma, t = vp_grid_and_off_grid()
    assert (den.sigma_to_t(sigma) - t).abs().max().item() < t_tolerance(den.log_sigmas)  # grid σ's → integers
    x = 1.5 * torch.randn(len(sigma), 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = den(x, sigma)
    want = manual_vp(unet, x, sigma, t, prediction)
    assert (got - want).abs().max().item() < 1e-6 * want.abs().max().item()


def test_bare_unet_dir_with_config_dict_and_learned_variance(tmp_path):
    unet = tiny_unet(out_channels=2)  # DDPM-style learned variance: ε is the first half
    unet.save_pretrained(tmp_path)
    cfg = dict(diffusers.DDPMScheduler(prediction_type="v_prediction", variance_type="learned_range").config)
    den = load_diffusers(tmp_path, cfg)
    sigma, t = vp_grid_and_off_grid()
    x = torch.randn(len(sigma), 1, 8, 8, dtype=F64)
    with torch.no_grad():
        got = den(x, sigma)
        s = col(sigma, x)
        out = unet((x / torch.sqrt(1 + s**2)).float(), t.float()).sample[:, :1].to(F64)
    want = x / (1 + s**2) - s / torch.sqrt(1 + s**2) * out
    assert got.shape == x.shape
    assert (got - want).abs().max().item() < 1e-6 * want.abs().max().item()


def count_calls(unet):
    batches = []
    unet.register_forward_pre_hook(lambda m, args, kwargs: batches.append(args[0].shape[0]), with_kwargs=True)
    return batches


def test_class_conditional_unet_with_cfg():
    unet = tiny_unet(num_class_embeds=5)
    den = from_diffusers(unet, diffusers.DDPMScheduler(), null_label=4)
    batches = count_calls(unet)
    sigma, t = vp_grid_and_off_grid()
    b = len(sigma)
    x = torch.randn(b, 1, 8, 8, dtype=F64)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    w = 3.0
    with torch.no_grad():
        got = den(x, sigma, labels, guidance=w)
    assert batches == [2 * b]
    d_c = manual_vp(unet, x, sigma, t, "epsilon", class_labels=labels)
    d_u = manual_vp(unet, x, sigma, t, "epsilon", class_labels=torch.full_like(labels, 4))
    want = d_u + w * (d_c - d_u)
    # The float32 UNet sees a batch of 2B here and B in the manual calls: convolution rounding may
    # differ with the batch by up to the UNet's worst-case rounding, R·2⁻²⁴·max|ε̂| (R ≈ 70 roundings on
    # its longest path: 25 convs, 18 GroupNorm + SiLU, 8 residual adds); D = x − σ·ε̂ multiplies it by σ
    # (≤ 157 on this grid) and the guided combination by 1 + 2w: 3.7e-3 here (≈ 1e-5 of max|want| ≈ 390).
    # The guidance term itself must be far above it.
    eps_max = max(float(((x - d) / col(sigma, x)).abs().max()) for d in (d_c, d_u))
    bound = (1 + 2 * w) * 70 * 2.0**-24 * float(sigma.max()) * eps_max
    assert (got - want).abs().max().item() < bound
    assert (d_c - d_u).abs().max().item() > 1e-4  # labels matter
    assert w * (d_c - d_u).abs().max().item() > 10 * bound  # so the check can fail
    batches.clear()
    with torch.no_grad():
        plain = den(x, sigma, labels)
    assert batches == [b]
    assert (plain - d_c).abs().max().item() < 1e-6 * d_c.abs().max().item()


def test_cross_attention_unet_with_encoder_states(tmp_path):
    unet = tiny_cond_unet()
    unet.save_pretrained(tmp_path / "unet")
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_config(
        tmp_path / "scheduler")
    g = torch.Generator().manual_seed(2)
    uncond = torch.randn(1, 3, 8, generator=g)
    den = load_diffusers(tmp_path, uncond=uncond)
    batches = count_calls(den.model.unet)
    ac = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, N_TRAIN) ** 2)
    t = torch.tensor([0.0, 250.0, 999.0, 400.5], dtype=F64)
    sigma = t_to_sigma_np(t, ac)
    x = torch.randn(4, 1, 8, 8, dtype=F64, generator=g)
    cond = torch.randn(4, 3, 8, generator=g)
    w = 7.5
    with torch.no_grad():
        got = den(x, sigma, cond, guidance=w)
    assert batches == [8]
    d_c = manual_vp(unet, x, sigma, t, "epsilon", encoder_hidden_states=cond)
    d_u = manual_vp(unet, x, sigma, t, "epsilon", encoder_hidden_states=uncond.expand(4, 3, 8))
    want = d_u + w * (d_c - d_u)
    assert (got - want).abs().max().item() < 1e-6 * want.abs().max().item()
    assert (d_c - d_u).abs().max().item() > 1e-5
    with pytest.raises(ValueError, match="encoder hidden states"):
        den(x, sigma)


def test_flow_scheduler_config():
    unet = tiny_unet()
    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    den = from_diffusers(unet, sched)
    assert isinstance(den, FlowDenoiser) and den.t_scale == 1000.0
    # diffusers passes timesteps = t·1000 for its "sigmas" t; our σ = t/(1−t) must map to them
    # (its first t = 1 is σ = ∞, which no σ grid holds; diffusers computes timesteps in float32)
    sched.set_timesteps(7)
    tt = sched.sigmas[1:-1].to(F64)
    sigma = tt / (1 - tt)
    assert torch.allclose(den.sigma_to_t(sigma), sched.timesteps[1:].to(F64), rtol=1e-6, atol=0)
    # shift multiplies σ: the training range is t ∈ [1/N, (N−1)/N] shifted
    assert den.sigma_min == pytest.approx(3.0 / 999) and den.sigma_max == pytest.approx(3.0 * 999)
    x = torch.randn(len(sigma), 1, 8, 8, dtype=F64)
    with torch.no_grad():
        got = den(x, sigma)
        s = col(sigma, x)
        v = unet((x / (1 + s)).float(), (tt * 1000).float()).sample.to(F64)
    want = x / (1 + s) - s / (1 + s) * v
    assert (got - want).abs().max().item() < 1e-6 * want.abs().max().item()


def test_edm_scheduler_config():
    unet = tiny_unet()
    den = from_diffusers(unet, diffusers.EDMEulerScheduler(sigma_data=0.5))
    assert isinstance(den, EDMDenoiser)
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=F64)
    x = torch.randn(3, 1, 8, 8, dtype=F64)
    c_skip, c_out, c_in, c_noise = (col(c, x) if c.ndim else c for c in edm_table1(sigma, 0.5))
    with torch.no_grad():
        got = den(x, sigma)
        want = c_skip * x + c_out * unet((c_in * x).float(), c_noise.reshape(-1).float()).sample.to(F64)
    assert (got - want).abs().max().item() < 1e-6 * want.abs().max().item()


def test_unet_wrapper_checks_cond():
    net = DiffusersUNet(tiny_unet())
    with pytest.raises(ValueError, match="unconditional"):
        net(torch.zeros(1, 1, 8, 8), torch.zeros(1), torch.tensor([1]))
