"""`fewstep fit`'s dispatcher: D-ODE, IIA and learned timesteps, each a transformation of a Plan.

Fitting changes only a Plan's coefficients (and, for timesteps, its σ's), so a fitted
sampler is a Plan like any other and runs everywhere a Plan runs. The machinery the methods
share (slots, views, the numeric and symbolic runs, least squares, the safeguard) is ``fitcore.py``;
the methods are ``dode.py``, ``iia.py`` and ``timesteps.py``; this module picks and combines them.

``fit`` draws the fitting batch as `fewstep eval` does (Philox ``seed``, digits classes evenly or
``cls``), writes the CFG scale into every row, and keeps the fit only as far as it helps: all fitted
corrections are scaled by the α ∈ {1, ¾, ½, ¼, 0} with the smallest endpoint RMSE against the reference
solve of the fitting batch (``fitcore.safeguard``; α = 0 is the base).
Provenance: teacher, teacher_hash (checked by `fewstep sample/eval --plan`), method, base_solver,
batch, fine (D-ODE teacher factor / IIA sub-steps M), seed, guidance, class, fit_seconds,
fewstep_version, fit_rmse_base / fit_rmse (fitting batch vs reference), alpha, and the fitted
coefficients (``lambdas`` / ``coefficients``) or learned ``sigmas``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..runtime.plan import Plan
from . import dode, iia, timesteps
from .fitcore import FitError, check_int, make_batch, reference_target, rms, run, safeguard, with_guidance


@dataclass(frozen=True)
class CoefMethod:
    """A coefficient method: ``fit(plan, family, den, batch, fine) -> (fitted plan, info with "slots")`` and its
    paper defaults ``defaults(family) -> (batch, fine)`` (METHODS.md)."""

    fit: Callable
    defaults: Callable[[str], tuple[int, int]]


def _dode(plan, family, den, batch, fine, form=None):
    return dode.fit_dode(plan, family, den, batch, factor=fine, form=form)


def _iia(plan, family, den, batch, fine, variant):
    return iia.fit_iia(plan, family, den, batch, variant=variant, m=fine)


def _dode_defaults(family: str) -> tuple[int, int]:
    return 100, 10  # D-ODE: 100 samples, a 10× teacher


def _iia_method(variant: str) -> CoefMethod:
    return CoefMethod(partial(_iia, variant=variant), partial(iia.defaults, variant))


# Method name → how to fit it (order: `fewstep fit --help`).
COEF_METHODS: dict[str, CoefMethod] = {
    "dode": CoefMethod(_dode, _dode_defaults),
    "dode-data": CoefMethod(partial(_dode, form="data"), _dode_defaults),
    "dode-eps": CoefMethod(partial(_dode, form="eps"), _dode_defaults),
    **{v: _iia_method(v) for v in ("iia", "iia-ddim", "iia-edm", "iia-edm0", "iia-edm1", "biia-edm", "iia-dpmpp",
                                   "iia-guided")},
}
METHODS = (*COEF_METHODS, "timesteps")


def parse_method(method: str) -> tuple[bool, str | None]:
    """'timesteps', a coefficient method, or 'timesteps+<coefficient method>' → (timesteps?, coef method)."""
    if not isinstance(method, str) or not method:
        raise FitError(f"--method: expected one of {', '.join(METHODS)} (or timesteps+METHOD)")
    parts = method.split("+")
    bad = [p for p in parts if p not in METHODS]
    if bad:
        raise FitError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}, combined with '+' "
                       f"(e.g. timesteps+iia)")
    coef = [p for p in parts if p != "timesteps"]
    if len(coef) > 1 or len(parts) - len(coef) > 1:
        raise FitError(f"--method {method!r}: at most one coefficient method and 'timesteps'")
    return "timesteps" in parts, (coef[0] if coef else None)


@dataclass(frozen=True)
class FitConfig:
    """What ``fit`` fits: ``solver`` at ``nfe`` evaluations with ``method`` (every field is a `fewstep fit` flag).

    ``method``: one of ``METHODS`` or ``timesteps+<coefficient method>`` (timesteps are learned for the plain
    solver, coefficients fitted on that grid, then both refined jointly: ``joint_evals`` coefficient fits,
    default 2·NFE + 8). ``timestep_evals`` caps the Nelder–Mead objective evaluations. ``batch``/``fine``
    default per method (METHODS.md: D-ODE 100 samples and a 10× teacher; IIA-DDIM 16 / M = 3, IIA-EDM 200 /
    M = 3, guided 20 / M = 10; timesteps 100). ``guidance`` is written into every row.
    """

    solver: str
    nfe: int
    method: str
    batch: int | None = None
    fine: int | None = None
    cls: int | None = None
    guidance: float | None = None
    seed: int = 0
    schedule: str | None = None
    timestep_evals: int | None = None
    joint_evals: int | None = None

    def check(self) -> FitConfig:
        """The config with the solver's canonical name and plain ints; FitError / SolverError on bad values."""
        from ..runtime.solvers import fittable, get

        parse_method(self.method)
        nfe = check_int(self.nfe, "NFE")
        family = get(self.solver).name  # raises SolverError naming the choices
        if family not in fittable():
            raise FitError(f"fitting supports the deterministic one-update-per-step families "
                           f"{', '.join(fittable())}; got {family!r}")
        batch = None if self.batch is None else check_int(self.batch, "batch")
        fine = None if self.fine is None else check_int(self.fine, "fine")
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise FitError(f"guidance must be finite, got {self.guidance}")
        seed = check_int(self.seed, "seed", 0)
        return dataclasses.replace(self, solver=family, nfe=nfe, batch=batch, fine=fine, seed=seed)


def fit(teacher, config: FitConfig, *, progress: Callable[[str], None] | None = None,
        cache: dict | None = None) -> Plan:
    """Fit ``config.solver`` at ``config.nfe`` evaluations on ``teacher`` with ``config.method``; the Plan.

    ``teacher``: a ``runtime.models.Model`` or a ``--model`` string. ``cache`` (a dict the caller keeps)
    reuses the fitting batch's reference solve across fits with the same inputs.
    """
    import fewstep

    from ..runtime.models import Model, load
    from ..runtime.solvers import build

    if not isinstance(teacher, Model):
        teacher = load(teacher)
    cfg = config.check()
    want_ts, coef = parse_method(cfg.method)
    family, guidance = cfg.solver, cfg.guidance
    den = teacher.denoiser
    t0 = time.perf_counter()
    base = with_guidance(build(family, cfg.nfe, den.sigma_min, den.sigma_max, schedule=cfg.schedule), guidance)
    method = COEF_METHODS[coef] if coef else None
    default_batch, default_fine = method.defaults(family) if method else (timesteps.DEFAULT_BATCH, None)
    n = cfg.batch or default_batch
    m = cfg.fine or default_fine
    say = progress or (lambda s: None)
    src = getattr(teacher, "cond_source", None)  # a pipeline's prompts / embeddings are part of the batch
    key = (teacher.content_hash, n, cfg.seed, cfg.cls, guidance, base.sigma_init,
           None if src is None else (repr(src.describe()), id(src)))
    if cache is not None and key in cache:
        b, ref = cache[key]
    else:
        b = make_batch(teacher, n, cfg.seed, cfg.cls, guidance)
        say(f"reference solve for {n} fitting samples")
        ref = reference_target(teacher, b, base.sigma_init)
        if cache is not None:
            cache[key] = (b, ref)
    info: dict = {}
    plan = base
    if want_ts:
        say("learning timesteps")
        plan, ts_info = timesteps.fit_timesteps(plan, family, den, b, ref, guidance=guidance,
                                                 max_evals=cfg.timestep_evals)
        info["timesteps"] = ts_info
    if coef:
        say(f"fitting {coef}")

        def fit_coef(p):
            fitted, cinfo = method.fit(p, family, den, b, m)
            kept, sg = safeguard(p, fitted, cinfo.pop("slots"), den, b, ref)
            return kept, {**cinfo, **sg}

        grids = [plan] if plan is base else [plan, base]
        fits = [fit_coef(p) for p in grids]
        # Sequential timesteps → coefficients can lose to coefficients alone (the grid was learned for the
        # uncorrected solver): keep whichever grid fits better on the fitting batch.
        k = min(range(len(fits)), key=lambda i: fits[i][1]["fit_rmse_kept"])
        plan = fits[k][0]
        info.update(fits[k][1])
        if want_ts:
            info["grid_kept"] = "learned" if k == 0 else "base"
            # Then grid and coefficients jointly, from the better of the two sequential answers.
            say("refining grid and coefficients jointly")
            plan, jinfo = timesteps.refine_joint(grids[k], family, den, fit_coef, guidance=guidance,
                                                 max_evals=cfg.joint_evals, start=fits[k])
            info.update(jinfo)
            info["timesteps_mode"] = "joint"
    err = rms(run(plan, den, b), ref)
    prov = dict(base.provenance)
    prov.update({
        "fitted": True, "method": cfg.method, "base_solver": family, "teacher": teacher.name,
        "teacher_hash": teacher.content_hash, "batch": n, "fine": m if coef else None, "seed": cfg.seed,
        "guidance": guidance, "class": cfg.cls, "fit_seconds": round(time.perf_counter() - t0, 3),
        "fewstep_version": fewstep.__version__, "fit_rmse": err, "fit_rmse_base": rms(run(base, den, b), ref),
        **info,
    })
    if want_ts:
        prov["schedule"] = "learned"
    if getattr(teacher, "cond_source", None) is not None:  # a pipeline's prompts / embeddings names
        prov["conditioning"] = teacher.cond_source.describe()
    tag = cfg.method.replace("+", "-")
    return plan.replace(name=f"{family}-{cfg.nfe}-{tag}", provenance=prov)
