"""The fitting core shared by D-ODE (``dode.py``), IIA (``iia.py``) and learned timesteps (``timesteps.py``).

A fitted method adds, at a few *slots* of the plan, a linear combination Σ_j φ_j·F_j of *features*
— differences of quantities the run already has (the state X_e before row e, the
evaluation point U_e, the denoiser output D_e, ε_e = (U_e − D_e)/σ_e). A slot sits either
on a row's state update (``where="x"``) or on a row's evaluation point (``where="u"``, D-EDM's
predictor λ). Features are plain functions of a *view* of the run, written once and
evaluated two ways:

- numerically (``run``): the float64 run with the corrections applied; the greedy fit reads
  each slot's uncorrected value Q₀ and its features there and solves the small least-squares
  problem min_φ Σ_batch ‖T − Q₀ − Σ φ_j F_j‖² (normal equations in float64, ``lstsq``);
- symbolically (``compile_plan``): the same run replayed on ``runtime/solvers/trace.Trace``,
  whose linear algebra rewrites every feature (past states, ε's of earlier rows) into the
  Plan's row coefficients. Nothing here knows solver names; a test checks that the compiled
  Plan reproduces the numeric corrected run.

A *step* of a plan is a maximal run of rows whose last row changes x (a row with c = 1,
q = 0, g = 0 — Heun's predictor — leaves x alone); the step grid σ_0 > … > σ_n = 0 is read
back from the plan (first row of each step, then 0). Fine targets are built with the same
solver family on a grid that contains the student's σ's exactly (``subdivide``).

The fitting batch is drawn as `fewstep eval` draws its inputs (``make_batch``) and scored against the
same reference solve (``reference_target``); ``safeguard`` keeps the fitted corrections only as far as they
help on it. The dispatcher behind `fewstep fit` is ``fit.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import FewstepError
from ..runtime.executor import call_denoiser
from ..runtime.plan import MAX_HISTORY, Plan, Row
from ..runtime.solvers.trace import Lin, Trace
from .metrics import rmse


class FitError(FewstepError):
    """Bad fitting arguments (unknown method, batch < 1, …)."""


# ---------------------------------------------------------------------------------------
# plan structure


def steps_of(plan: Plan) -> list[list[int]]:
    """Rows grouped into σ-grid steps: each step ends with the row that changes x."""
    steps, cur = [], []
    for e, r in enumerate(plan.rows):
        cur.append(e)
        if not (r.c == 1.0 and all(v == 0.0 for v in r.q) and r.g == 0.0):
            steps.append(cur)
            cur = []
    if cur:
        raise FitError(f"plan {plan.name!r}: its last row leaves x unchanged; not a σ-grid solver plan")
    return steps


def grid_of(plan: Plan) -> np.ndarray:
    """The step grid σ_0 > … > σ_n = 0 the plan was built on."""
    return np.array([plan.rows[s[0]].sigma for s in steps_of(plan)] + [0.0], dtype=np.float64)


def subdivide(grid: Sequence[float], m: int, rho: float = 7.0) -> np.ndarray:
    """Split every interval of ``grid`` into ``m`` equal parts in σ^(1/ρ) (EDM's variable, which
    also reaches σ = 0); the result contains every σ of ``grid`` exactly."""
    g = np.asarray(grid, dtype=np.float64)
    out = [g[0]]
    for a, b in zip(g[:-1], g[1:]):
        ta, tb = a ** (1 / rho), b ** (1 / rho)
        out.extend(((ta + (tb - ta) * np.arange(1, m) / m) ** rho).tolist())
        out.append(b)  # exact, not re-computed through the power
    return np.array(out)


def with_guidance(plan: Plan, guidance: float | None) -> Plan:
    """The plan with every row carrying the CFG scale it is fitted for (None: leave as is)."""
    if guidance is None:
        return plan
    return plan.replace(rows=tuple(_row(r, guidance=float(guidance)) for r in plan.rows))


def _row(r: Row, **kw) -> Row:
    return dataclasses.replace(r, **kw)


def scaled(slots: Sequence[Slot], alpha: float) -> list[Slot]:
    """The slots with every fitted φ scaled by α (the run is linear in φ, its Plan rows are not: rewriting a
    past state divides by φ-dependent coefficients, so α is applied here and the Plan recompiled)."""
    return [dataclasses.replace(s, phi=None if s.phi is None else alpha * s.phi) for s in slots]


# ---------------------------------------------------------------------------------------
# slots, features and views


@dataclass
class Slot:
    """Σ_j φ_j·F_j(view, anchor) added to row ``row``'s x update (where="x") or evaluation point ("u")."""

    where: str
    row: int
    anchor: int  # the row the features are written around (= row, or row − 1 for a predictor's λ)
    feats: list[Callable]
    target: int  # step-grid index of the state this slot's quantity should match
    phi: np.ndarray | None = None
    names: list[str] = field(default_factory=list)


class View:
    """The quantities of a run, by row index; ``X(e)`` is the state before row e.

    Row −1 stands for the start: D(−1) = U(−1) = X(0) = σ_init·z (D-ODE's public code uses x_T as
    the "previous output"), ε(−1) = z.
    """

    def __init__(self, plan: Plan):
        self.plan = plan
        self.xs, self.us, self.ds = [], [], []

    def sig(self, e: int) -> float:
        return self.plan.rows[e].sigma if e >= 0 else self.plan.sigma_init

    def X(self, e: int):
        return self.xs[max(e, 0)]

    def U(self, e: int):
        return self.us[e] if e >= 0 else self.xs[0]

    def D(self, e: int):
        return self.ds[e] if e >= 0 else self.xs[0]

    def eps(self, e: int):
        return (self.U(e) - self.D(e)) / self.sig(e) if e >= 0 else self.xs[0] / self.plan.sigma_init


def _add(q, slot: Slot, v: View):
    for phi, f in zip(slot.phi, slot.feats):
        if phi != 0.0:
            q = q + float(phi) * f(v, slot.anchor)
    return q


def _comb(terms, hist, start):
    out = start
    for coef, k in terms:
        if coef != 0.0:
            out = out + coef * hist[-k]
    return out


def compile_plan(plan: Plan, slots: Sequence[Slot], name: str | None = None, provenance: dict | None = None,
                 s: float | None = None) -> Plan:
    """Replay ``plan`` on a Trace with the fitted slots added; the result is an ordinary Plan.

    ``s`` re-expresses every row's history entry as h = D − s·U (same samples, different bookkeeping):
    features on past ε's (noise-form D-ODE, BIIA, IIA-EDM r = 1) reach past *states*, which a bounded
    history can only hold as s = 1 entries (−σ·ε̂). ``to_plan`` tries the plan's own s, then s = 1."""
    by = {(s.where, s.row): s for s in slots}
    tr = Trace(plan.sigma_init)
    v = View(plan)
    x, hist = tr.x, []
    for e, row in enumerate(plan.rows):
        v.xs.append(x)
        u = _comb(((p, k) for k, p in enumerate(row.p, 1)), hist, row.a * x)
        if ("u", e) in by:
            u = _add(u, by["u", e], v)
        v.us.append(u)
        d = tr.eval(u, row.sigma, s=row.s if s is None else s, guidance=row.guidance)
        v.ds.append(d)
        hist.append(d - row.s * u)
        xn = _comb(((q, k + 1) for k, q in enumerate(row.q)), hist, row.c * x if row.c != 0.0 else Lin())
        if ("x", e) in by:
            xn = _add(xn, by["x", e], v)
        x = tr.update(xn, noise=row.g)
    out = tr.plan(name or plan.name, provenance if provenance is not None else plan.provenance)
    return out


def _conditioning(plan: Plan) -> tuple[int, float]:
    return plan.history, max(max(map(abs, (r.a, r.c, *r.p, *r.q))) for r in plan.rows)


def to_plan(plan: Plan, slots: Sequence[Slot]) -> Plan:
    """``compile_plan`` in the plan's own history form and with s = 1; the one reading fewer past entries, then the
    one with smaller coefficients (own form on a tie). Both describe the same samples, but not equally well in
    float32: DPM-Solver++(3M) with ε-form D-ODE at 10 NFE (GMM) has K = 9 and coefficients up to 4.8e4 in the data
    form, K = 8 and ≤ 1.1e3 with s = 1 (benchmarks/results/fit_history_precision.md). FitError if neither fits
    the Plan's history bound."""
    from ..runtime.plan import PlanError

    best, err = None, None
    for s in (None, 1.0):
        try:
            cand = compile_plan(plan, slots, s=s)
        except PlanError as exc:
            err = exc
            continue
        if best is None or _conditioning(cand) < _conditioning(best):
            best = cand
    if best is None:
        raise FitError(f"the fitted corrections are not expressible with a history of ≤ {MAX_HISTORY} entries "
                       f"({err}); corrections on past states need NFE ≤ {MAX_HISTORY + 1}, or use the solver's "
                       "own form (--method dode)") from None
    return best


# ---------------------------------------------------------------------------------------
# the numeric run


def net_dtype(den) -> torch.dtype:
    """The network runs in its own dtype; the exact GMM (no parameters) runs in float64."""
    ps = list(den.parameters())
    return ps[0].dtype if ps else torch.float64


@dataclass
class Batch:
    """The fitting batch: initial noise (float64), labels, guidance, and the network's dtype."""

    z: torch.Tensor
    cond: torch.Tensor | None
    guidance: float | None
    dtype: torch.dtype


def evaluate_den(den, u: torch.Tensor, sigma: float, batch: Batch, w) -> torch.Tensor:
    sig = torch.full((u.shape[0],), sigma, dtype=batch.dtype)
    with torch.no_grad():
        return call_denoiser(den, u.to(batch.dtype), sig, batch.cond, w).to(torch.float64)


def run(plan: Plan, den, batch: Batch, slots: Sequence[Slot] = (), fit_slot: Callable | None = None,
        x0: torch.Tensor | None = None, record: bool = False):
    """Run ``plan`` in float64 with ``slots`` applied. A slot whose φ is None is fitted on the spot:
    ``fit_slot(slot, q0, feats, view) -> φ`` (greedy: later rows see the corrected run).

    Returns the final state, and with ``record`` the view and the state after every step."""
    by = {(s.where, s.row): s for s in slots}
    ends = {st[-1] for st in steps_of(plan)}
    v = View(plan)
    x = plan.sigma_init * batch.z if x0 is None else x0
    hist, after_step = [], [x]
    for e, row in enumerate(plan.rows):
        if row.g != 0.0:
            raise FitError(f"plan {plan.name!r}: row {e} is stochastic; fitting needs a deterministic solver")
        v.xs.append(x)
        u = _comb(((p, k) for k, p in enumerate(row.p, 1)), hist, row.a * x)
        if ("u", e) in by:
            u = _apply(by["u", e], u, v, fit_slot)
        v.us.append(u)
        d = evaluate_den(den, u, row.sigma, batch, row.guidance if row.guidance is not None else batch.guidance)
        v.ds.append(d)
        hist.append(d - row.s * u if row.s != 0.0 else d)
        xn = _comb(((q, k + 1) for k, q in enumerate(row.q)), hist, row.c * x)
        if ("x", e) in by:
            xn = _apply(by["x", e], xn, v, fit_slot)
        if e in ends:
            after_step.append(xn)
        x = xn
        del hist[:-MAX_HISTORY]
    if record:
        return x, v, after_step
    return x


def _apply(slot: Slot, q0, v: View, fit_slot):
    if slot.phi is None:
        feats = [f(v, slot.anchor) for f in slot.feats]
        slot.phi = np.asarray(fit_slot(slot, q0, feats, v), dtype=np.float64)
    return _add(q0, slot, v)


def lstsq(feats: Sequence[torch.Tensor], resid: torch.Tensor, ridge: float = 1e-12) -> np.ndarray:
    """argmin_φ Σ_batch ‖resid − Σ_j φ_j F_j‖²: the normal equations in float64.

    A relative ridge of 1e-12 keeps collinear features (e.g. D- and ε-differences of a Gaussian,
    which are parallel) solvable; it moves a well-posed solution by ~1e-12 relative."""
    f = torch.stack([t.reshape(-1).to(torch.float64) for t in feats])  # [J, N]
    r = resid.reshape(-1).to(torch.float64)
    g = (f @ f.T).numpy()
    b = (f @ r).numpy()
    scale = max(float(np.trace(g)) / len(g), 1e-300)
    if not np.all(np.isfinite(g)) or not np.all(np.isfinite(b)):
        return np.zeros(len(feats))
    return np.linalg.solve(g + ridge * scale * np.eye(len(g)), b)


def rms(x: torch.Tensor, target: torch.Tensor) -> float:
    """``metrics.rmse`` (fewstep's endpoint RMSE: per-sample RMS, averaged over samples), except that a run which
    diverged (NaN/inf) scores +inf: the safeguard and the Nelder–Mead searches rank it last instead of stopping."""
    if not bool(torch.isfinite(x).all()):
        return math.inf
    return rmse(x, target)


def safeguard(base: Plan, fitted: Plan, slots: Sequence[Slot], den, batch: Batch, target: torch.Tensor,
              alphas=(1.0, 0.75, 0.5, 0.25, 0.0), known: dict | None = None) -> tuple[Plan, dict]:
    """Scale all fitted corrections (``slots``, compiled as ``fitted``) by the α in ``alphas`` with the smallest
    endpoint error on the fitting batch (α = 0 is the base plan): fitting never makes the fitted batch's error
    worse. ``known``: {α: error} the caller already measured on this batch (not run again)."""
    errs = {}
    best, best_err = None, math.inf
    for a in alphas:
        p = fitted if a == 1.0 else base if a == 0.0 else to_plan(base, scaled(slots, a))
        err = known[a] if known and a in known else rms(run(p, den, batch), target)
        errs[a] = err
        if err < best_err - 1e-15 * max(1.0, abs(best_err) if math.isfinite(best_err) else 1.0):
            best, best_err = (a, p), err
    return best[1], {"alpha": best[0], "fit_rmse_base": errs[0.0], "fit_rmse_fitted": errs[1.0],
                     "fit_rmse_kept": best_err}


def check_int(v, name: str, lo: int = 1):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise FitError(f"{name} must be an integer ≥ {lo}, got {v!r}")
    return int(v)


def make_batch(teacher, n: int, seed: int, cls: int | None, guidance: float | None) -> Batch:
    """Fitting inputs as `fewstep eval` draws them: Philox z, classes evenly (digits) or ``cls``."""
    from ..runtime.sampling import check_guidance, make_inputs
    from ..runtime.solvers import build

    den = teacher.denoiser
    plan0 = build("ddim", 1, den.sigma_min, den.sigma_max)
    inp = make_inputs(teacher, plan0, n, seed, cls)
    check_guidance(teacher, guidance, inp.labels)
    return Batch(inp.z.to(torch.float64), inp.labels, guidance, net_dtype(den))


def reference_target(teacher, batch: Batch, sigma_max: float) -> torch.Tensor:
    """The high-accuracy ODE endpoint from the batch's z (the same solve `fewstep eval` scores against)."""
    from ..runtime.reference import REFERENCE_STEPS, reference_endpoint

    den = teacher.denoiser
    with torch.no_grad():
        return reference_endpoint(den, batch.z.to(batch.dtype), sigma_max, den.sigma_min,
                                  REFERENCE_STEPS.get(teacher.kind, 100), cond=batch.cond,
                                  guidance=batch.guidance).to(torch.float64)
