"""Learned timesteps: optimise a Plan's σ grid at a fixed NFE (beyond the papers; peers LD3, DMN, GITS).

Parameterisation: σ_0 = σ_max is fixed; the n − 1 log-σ gaps of the grid σ_0 > … > σ_{n−1} plus a
slack gap from σ_{n−1} down to σ_min are softmax(θ)·log(σ_max/σ_min), so every θ ∈ R^n gives a valid,
strictly decreasing grid inside [σ_min, σ_max] (the last σ > 0 is free: at 2–3 NFE where the last
evaluation sits matters most). σ_n = 0 as always. The objective is the endpoint RMSE against the
high-accuracy reference solve on the fitting batch; it is minimised derivative-free by Nelder–Mead
(our own, ~40 lines) from the base schedule, with a budget of evaluations. The plan is rebuilt with
the same solver family on each candidate grid, so the result is an ordinary Plan.

With D-ODE / IIA (``timesteps+dode``): the grid is learned for the plain solver first, the
coefficients are fitted on it, and then grid and coefficients are optimised *jointly*
(``refine_joint``): Nelder–Mead over the grid again, each candidate grid scored with its own
closed-form coefficient fit. Each joint evaluation costs one coefficient fit (D-ODE: a 10×-step
teacher solve), so its budget is small (2n + 8 by default) and it starts from the sequential
answer, which it never makes worse on the fitting batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..runtime.plan import Plan, PlanError
from ..runtime.solvers import get
from .fitcore import Batch, grid_of, rms, run, with_guidance

DEFAULT_BATCH = 100
SLACK = 1e-3  # initial slack gap (fraction of the log range) when the base grid ends at σ_min


def grid_from(theta: np.ndarray, sigma_max: float, sigma_min: float) -> np.ndarray:
    w = np.exp(theta - theta.max())
    gaps = w / w.sum() * math.log(sigma_max / sigma_min)
    sig = sigma_max * np.exp(-np.concatenate([[0.0], np.cumsum(gaps[:-1])]))
    sig[0] = sigma_max
    return np.append(sig, 0.0)


def theta_from(grid: np.ndarray, sigma_min: float) -> np.ndarray:
    pos = np.asarray(grid[:-1], dtype=np.float64)
    gaps = np.append(-np.diff(np.log(pos)), math.log(pos[-1] / sigma_min))
    total = math.log(pos[0] / sigma_min)
    gaps = np.maximum(gaps, SLACK * total)
    return np.log(gaps)


def nelder_mead(f, x0: np.ndarray, step: float = 0.5, max_evals: int = 200, tol: float = 1e-7):
    """Minimise f from x0 (standard coefficients 1, 2, ½, ½; adaptive ones for n > 2, Gao & Han 2012)."""
    n = len(x0)
    a, g, c, s = (1.0, 1 + 2 / n, 0.75 - 1 / (2 * n), 1 - 1 / n) if n > 2 else (1.0, 2.0, 0.5, 0.5)
    pts = [np.array(x0, dtype=np.float64)] + [x0 + step * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    evals = n + 1
    while evals < max_evals:
        order = np.argsort(vals)
        pts, vals = [pts[i] for i in order], [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * max(abs(vals[0]), 1e-30):
            break
        cen = np.mean(pts[:-1], axis=0)
        xr = cen + a * (cen - pts[-1])
        fr = f(xr)
        evals += 1
        if fr < vals[0]:
            xe = cen + g * (xr - cen)
            fe = f(xe)
            evals += 1
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = cen + c * ((xr if fr < vals[-1] else pts[-1]) - cen)
            fc = f(xc)
            evals += 1
            if fc < min(fr, vals[-1]):
                pts[-1], vals[-1] = xc, fc
            else:  # shrink towards the best point
                for i in range(1, n + 1):
                    pts[i] = pts[0] + s * (pts[i] - pts[0])
                    vals[i] = f(pts[i])
                evals += n
    i = int(np.argmin(vals))
    return pts[i], vals[i], evals


def fit_timesteps(plan: Plan, solver: str, den, batch: Batch, ref: torch.Tensor, guidance: float | None = None,
                  max_evals: int | None = None):
    """Returns (plan on the learned grid, info). Never worse than ``plan`` on the fitting batch."""
    grid = grid_of(plan)
    n = len(grid) - 1
    sigma_max, sigma_min = float(grid[0]), float(getattr(den, "sigma_min", grid[-2]))
    sigma_min = min(sigma_min, float(grid[-2]))
    family = get(solver)
    base_err = rms(run(plan, den, batch), ref)
    if n < 2:  # one step: the grid is [σ_max, 0], nothing to learn
        return plan, {"evals": 0, "learned": False}

    def build(theta):
        return with_guidance(family.build(grid_from(theta, sigma_max, sigma_min)), guidance)

    def objective(theta):
        try:
            err = rms(run(build(theta), den, batch), ref)
        except (PlanError, ValueError):
            return math.inf
        return err if math.isfinite(err) else math.inf

    theta0 = theta_from(grid, sigma_min)
    budget = max_evals or (40 + 30 * n)
    theta, err, evals = nelder_mead(objective, theta0, max_evals=budget)
    if not err < base_err:
        return plan, {"evals": evals, "learned": False, "fit_rmse_base_grid": base_err}
    out = build(theta)
    prov = dict(plan.provenance)
    out = out.replace(name=plan.name, provenance=prov)
    return out, {"evals": evals, "learned": True, "fit_rmse_base_grid": base_err, "fit_rmse_learned_grid": err,
                 "sigmas": [float(v) for v in grid_from(theta, sigma_max, sigma_min)]}


def refine_joint(plan: Plan, solver: str, den, fit_coef, guidance: float | None = None,
                 max_evals: int | None = None, start: tuple | None = None):
    """Grid and coefficients together: minimise over θ the fitting-batch error of ``fit_coef`` applied to
    ``solver`` (its family) on grid(θ), from ``plan``'s grid. ``fit_coef(p) → (fitted plan, info with
    fit_rmse_kept)``; ``start``: its result for ``plan`` when the caller has it (one coefficient fit less).
    Returns (best plan, info); never worse than ``plan``'s own fitted error."""
    grid = grid_of(plan)
    n = len(grid) - 1
    fam = get(solver)
    sigma_max, sigma_min = float(grid[0]), min(float(getattr(den, "sigma_min", grid[-2])), float(grid[-2]))
    start_plan, start_info = start or fit_coef(with_guidance(fam.build(np.asarray(grid)), guidance))
    start = start_info["fit_rmse_kept"]
    if n < 2:
        return start_plan, {"joint_evals": 1, "joint_improved": False, "fit_rmse_sequential": start, **start_info}
    best = {"err": start, "plan": start_plan, "info": start_info}

    def objective(theta):
        try:
            fitted, info = fit_coef(with_guidance(fam.build(grid_from(theta, sigma_max, sigma_min)), guidance))
        except (PlanError, ValueError):
            return math.inf
        err = info["fit_rmse_kept"]
        if not math.isfinite(err):
            return math.inf
        if err < best["err"]:
            best.update(err=err, plan=fitted, info=info)
        return err

    _, _, evals = nelder_mead(objective, theta_from(np.asarray(grid), sigma_min), step=0.25,
                              max_evals=max_evals or (2 * n + 8))
    return best["plan"], {**best["info"], "joint_evals": evals + 1, "joint_improved": best["err"] < start,
                          "fit_rmse_sequential": start}
