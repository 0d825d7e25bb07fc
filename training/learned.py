"""Learned plans: every coefficient of every row and the σ grid, by gradient descent (S4S-Alt, LD3's soft loss).

S4S (Frankel et al., ICML 2025) learns a linear multistep solver's coefficients to match a strong teacher from
pure noise; S4S-Alt alternates coefficients and timesteps. A Plan's rows *are* a linear multistep solver, so
here the parameters are the rows themselves (a, p, c, q of every row within the history K, and the distinct
σ's), initialised from the closed-form fit (``fit.fit``, default timesteps + D-ODE) and optimised through the
reference executor's own loop (``executor.run_rows``) to match the reference solve from the same noise:

- coefficient phase (σ's fixed), then grid phase (coefficients fixed), ``rounds`` times, with Adam or L-BFGS;
- loss: endpoint L2, or LD3's soft loss (Tong et al., ICLR 2025): the student may start from any point of a
  small ball around its noise (per-sample offset δ, ‖δ‖_rms ≤ ``slack``, learned with the plan) and must land on
  the teacher's endpoint of the unperturbed noise;
- a regulariser ``reg``·mean(((coef − coef₀)/scale)²) toward the closed-form rows (the base solver's rows plus
  its fitted corrections) keeps the multistep coefficients from ringing;
- rows stay a valid Plan: σ's are ``σ_init·exp(−cumsum(exp θ))`` over the distinct σ's, so positive and in the
  init plan's order (rows sharing a σ keep sharing it), and p/q never reach past the history K ≤ 10;
- early stopping on a held-out split of the fitting noise (the ``heldout`` samples after the ``batch`` fitting
  samples of the same Philox seed); the result is the best of {closed-form fit, every phase's end} on that
  split, so never worse than the closed-form fit there. Provenance ``winner`` says which.

The reference solve of the fitting + held-out noise is computed once and kept on disk
(``$FEWSTEP_CACHE``, default ``~/.cache/fewstep``) under the hash of what it depends on: the teacher's content
hash, σ_init (the plan family's start), the noise seed, sample count, class, guidance and the solve's steps.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch

from ..runtime.executor import call_denoiser, run_rows
from ..runtime.plan import MAX_HISTORY, Plan, Row, atomic_write_bytes
from .fitcore import Batch, FitError, check_int, make_batch, reference_target, rms, run, with_guidance

METHODS = ("learned", "plan")  # "plan": the name issue 20 uses
LOSSES = ("l2", "ld3")
OPTIMIZERS = ("adam", "lbfgs")
REFERENCE_CACHE_VERSION = 1  # bump when the reference solve changes


@dataclass(frozen=True)
class LearnConfig:
    """How the plan is learned (every field is a `fewstep fit` flag; saved in the provenance)."""

    loss: str = "l2"  # "l2" | "ld3"
    slack: float = 0.05  # LD3 ball radius: RMS of the per-sample offset of z
    reg: float = 1e-2  # weight of the pull toward the closed-form rows
    rounds: int = 2  # coefficient + grid phases
    coef_steps: int = 20
    grid_steps: int = 10
    lr: float = 2e-2  # Adam, in units of each coefficient's scale (see _Params)
    grid_lr: float = 1e-2  # Adam, on the log-σ gap parameters (5e-2 overshot on digits DDIM-4, 2e-3 too slow: GMM)
    optimizer: str = "adam"
    minibatch: int | None = 32  # samples per Adam step (None: the whole fitting batch)
    budget: float | None = None  # wall-clock seconds for the optimisation (None: no limit)
    history: int | None = None  # K of the learned rows (None: max(init's K, min(E − 1, 2)))

    def check(self) -> LearnConfig:
        if self.loss not in LOSSES:
            raise FitError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise FitError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        for name in ("slack", "reg", "lr", "grid_lr"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise FitError(f"--{name.replace('_', '-')} must be a finite number ≥ 0, got {v}")
        for name in ("rounds", "coef_steps", "grid_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise FitError(f"--{name.replace('_', '-')} must be an integer ≥ 0, got {v!r}")
        if self.minibatch is not None and self.minibatch < 1:
            raise FitError(f"--minibatch must be ≥ 1, got {self.minibatch}")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise FitError(f"--budget must be > 0 seconds, got {self.budget}")
        if self.history is not None and not 0 <= self.history <= MAX_HISTORY:
            raise FitError(f"--history must be in 0..{MAX_HISTORY}, got {self.history}")
        return self


# ---------------------------------------------------------------------------------------
# the reference solve, cached on disk


def cache_dir() -> str:
    return os.environ.get("FEWSTEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fewstep")


def reference_key(teacher, n: int, seed: int, cls, guidance, sigma_init: float) -> str:
    from ..runtime.reference import REFERENCE_STEPS

    fields = {"v": REFERENCE_CACHE_VERSION, "teacher": teacher.content_hash, "n": n, "seed": seed, "class": cls,
              "guidance": guidance, "sigma_init": float(sigma_init).hex(),
              "steps": REFERENCE_STEPS.get(teacher.kind, 100)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def cached_reference(teacher, batch: Batch, n: int, seed: int, cls, guidance, sigma_init: float,
                     say: Callable[[str], None] = lambda s: None) -> torch.Tensor:
    """``fitcore.reference_target`` of ``batch``, read from / written to the disk cache."""
    path = os.path.join(cache_dir(), "reference", reference_key(teacher, n, seed, cls, guidance, sigma_init) + ".npy")
    if os.path.exists(path):
        try:
            arr = np.load(path, allow_pickle=False)
            if arr.shape == tuple(batch.z.shape) and arr.dtype == np.float64 and np.all(np.isfinite(arr)):
                return torch.from_numpy(arr)
        except (OSError, ValueError):
            pass  # a damaged entry is recomputed and overwritten
    say(f"reference solve for {n} samples (cached for later fits)")
    ref = reference_target(teacher, batch, sigma_init)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, ref.numpy(), allow_pickle=False)
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass  # an unwritable cache only costs time
    return ref


# ---------------------------------------------------------------------------------------
# the parameters and the differentiable run


class _Free:
    """A learned coefficient as ``run_rows`` reads it: it multiplies like its tensor and is never skipped by the
    loop's ``!= 0`` / ``!= 1`` shortcuts, so an entry that is 0 now still gets a gradient."""

    __slots__ = ("t",)
    __hash__ = None

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __ne__(self, other):
        return True

    def __eq__(self, other):
        return False

    def __mul__(self, other):
        return self.t * other

    __rmul__ = __mul__


class _Params:
    """The rows of ``init`` as one flat coefficient vector and log-σ gap parameters.

    Row e holds a, p[0 : min(e, K)], c, q[0 : min(e + 1, K + 1)]. A coefficient is ``coef₀ + scale·δ`` with
    scale = max(|coef₀|, 0.05), so Adam's step is about ``lr`` of each coefficient's own size (DDIM's c runs
    from 1 to 0.002 along a grid). σ's: the distinct values v_0 > v_1 > … of the init rows,
    log v_j = log v_{j−1} − exp(θ_j) from log σ_init; a v_0 equal to σ_init stays fixed.
    """

    def __init__(self, init: Plan, k: int):
        self.init, self.k = init, k
        self.layout, vals = [], []
        for e, r in enumerate(init.rows):
            np_, nq = min(e, k), min(e + 1, k + 1)
            p = [r.coef_p(i) for i in range(1, np_ + 1)]
            q = [r.coef_q(i) for i in range(nq)]
            i0 = len(vals)
            vals += [r.a, *p, r.c, *q]
            self.layout.append((i0, np_, nq))
        self.coef0 = torch.tensor(vals, dtype=torch.float64)
        self.scale = self.coef0.abs().clamp_min(0.05)
        self.delta = torch.zeros_like(self.coef0, requires_grad=True)
        sig = sorted({r.sigma for r in init.rows}, reverse=True)
        self.fixed_top = sig[0] == init.sigma_init
        self.row_sig = [sig.index(r.sigma) for r in init.rows]
        logs = np.log(np.array([init.sigma_init] + sig))
        gaps = -np.diff(logs)
        if self.fixed_top:
            gaps = gaps[1:]
        self.theta = torch.tensor(np.log(np.maximum(gaps, 1e-12)), dtype=torch.float64, requires_grad=True)

    def coefs(self) -> torch.Tensor:
        return self.coef0 + self.scale * self.delta

    def sigmas(self) -> torch.Tensor:
        top = math.log(self.init.sigma_init)
        logs = top - torch.cumsum(torch.exp(self.theta), 0)
        if self.fixed_top:
            logs = torch.cat([logs.new_tensor([top]), logs])
        return torch.exp(logs)

    def rows(self, free: bool):
        """Rows for ``run_rows``: coefficients as ``_Free`` tensors (free) or floats, σ's as 0-dim tensors."""
        c, sig = self.coefs(), self.sigmas()
        out = []
        for e, (i0, np_, nq) in enumerate(self.layout):
            v = [_Free(c[i]) for i in range(i0, i0 + 2 + np_ + nq)] if free else c[i0:i0 + 2 + np_ + nq].tolist()
            r = self.init.rows[e]
            out.append(SimpleNamespace(sigma=sig[self.row_sig[e]], a=v[0], p=tuple(v[1:1 + np_]), c=v[1 + np_],
                                       q=tuple(v[2 + np_:]), g=0.0, s=r.s, guidance=r.guidance))
        return out

    def plan(self, name: str, provenance: dict) -> Plan:
        with torch.no_grad():
            rows = [Row(sigma=float(r.sigma), a=r.a, p=tuple(r.p), c=r.c, q=tuple(r.q), g=0.0, guidance=r.guidance,
                        s=r.s) for r in self.rows(free=False)]
        return Plan(name=name, sigma_init=self.init.sigma_init, rows=tuple(rows), provenance=provenance)

    def state(self):
        return self.delta.detach().clone(), self.theta.detach().clone()

    def load(self, state) -> None:
        with torch.no_grad():
            self.delta.copy_(state[0])
            self.theta.copy_(state[1])


def endpoint(params: _Params, den, batch: Batch, z: torch.Tensor, cond) -> torch.Tensor:
    """The plan's endpoint from ``z`` through ``run_rows``, differentiable in every coefficient and σ."""
    rows = params.rows(free=True)
    view = SimpleNamespace(rows=rows, history=params.k)
    dt = batch.dtype
    n = z.shape[0]

    def evaluate(e, row, u):
        w = row.guidance if row.guidance is not None else batch.guidance
        return call_denoiser(den, u.to(dt), row.sigma.to(dt).expand(n), cond, w).to(u.dtype)

    return run_rows(view, params.init.sigma_init * z.to(dt), evaluate)


def _mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x.to(torch.float64) - ref).pow(2).mean()


def _heldout_rms(params: _Params, den, batch: Batch, ref) -> float:
    with torch.no_grad():
        return rms(endpoint(params, den, batch, batch.z, batch.cond), ref)


# ---------------------------------------------------------------------------------------
# the optimisation


class _Adam:
    """Adam (Kingma & Ba 2015) on a few tensors. torch.optim's constructor imports torch._dynamo: 7.7 s of a
    GMM fit measured here on the loaded 2-core box, for a loop whose steps take milliseconds."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = list(params), lr, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.sub_(self.lr * (m / (1 - b1 ** self.t)) / ((v / (1 - b2 ** self.t)).sqrt() + self.eps))


class _Objective:
    """The training loss of ``params`` on ``train`` (relative to the init's, plus the regulariser) and, for LD3,
    the per-sample offsets of the student's noise inside the slack ball (z units, RMS ≤ ``slack``)."""

    def __init__(self, params: _Params, den, train: Batch, ref: torch.Tensor, cfg: LearnConfig):
        self.params, self.den, self.train, self.ref, self.cfg = params, den, train, ref, cfg
        self.shift = torch.zeros_like(train.z, requires_grad=True) if cfg.loss == "ld3" else None
        with torch.no_grad():
            mse0 = float(_mse(endpoint(params, den, train, train.z, train.cond), ref))
        self.norm = max(mse0, 1e-30)  # relative to the init's loss, so ``reg`` means the same on every model

    def __call__(self, idx=None) -> torch.Tensor:
        t = self.train
        z = t.z if idx is None else t.z[idx]
        cond = t.cond if idx is None or t.cond is None else t.cond[idx]
        r = self.ref if idx is None else self.ref[idx]
        if self.shift is not None:
            z = z + (self.shift if idx is None else self.shift[idx])
        loss = _mse(endpoint(self.params, self.den, t, z, cond), r) / self.norm
        if self.cfg.reg:
            loss = loss + self.cfg.reg * (self.params.delta ** 2).mean()
        return loss

    def project(self) -> None:
        if self.shift is not None:
            with torch.no_grad():
                d = self.shift.reshape(self.shift.shape[0], -1)
                rms_ = d.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-30)
                d.mul_(torch.clamp(self.cfg.slack / rms_, max=1.0))


def _phase(obj: _Objective, var: list, lr: float, nsteps: int, gen, deadline: float | None) -> tuple[int, bool]:
    """``nsteps`` optimiser steps on ``var``; returns (steps taken, ran out of time)."""
    cfg, n = obj.cfg, obj.train.z.shape[0]
    if obj.shift is not None:
        var = var + [obj.shift]
    if cfg.optimizer == "lbfgs":
        opt = torch.optim.LBFGS(var, lr=1.0, max_iter=nsteps, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = obj(None)
            loss.backward()
            return loss

        opt.step(closure)
        obj.project()
        return nsteps, False
    opt = _Adam(var, lr=lr)
    for i in range(nsteps):
        idx = None
        if cfg.minibatch is not None and cfg.minibatch < n:
            idx = torch.randperm(n, generator=gen)[:cfg.minibatch]
        opt.zero_grad()
        obj(idx).backward()
        opt.step()
        obj.project()
        if deadline is not None and time.perf_counter() > deadline:
            return i + 1, True
    return nsteps, False


def learn(init: Plan, den, train: Batch, ref: torch.Tensor, held: Batch, held_ref: torch.Tensor,
          cfg: LearnConfig, say: Callable[[str], None] = lambda s: None, seed: int = 0):
    """Optimise ``init``'s rows on ``train``; returns (best plan on ``held``, info). ``init`` itself is a
    candidate, so the result is never worse than it on ``held`` (as the run_rows endpoint measures it)."""
    cfg = cfg.check()
    t0 = time.perf_counter()
    deadline = None if cfg.budget is None else t0 + cfg.budget
    k = cfg.history if cfg.history is not None else max(init.history, min(init.nfe - 1, 2))
    params = _Params(init, max(k, init.history))
    obj = _Objective(params, den, train, ref, cfg)
    gen = torch.Generator().manual_seed(seed)
    best = {"err": _heldout_rms(params, den, held, held_ref), "state": params.state(), "phase": "init"}
    init_err = best["err"]
    history, steps, out_of_time = [("init", init_err)], 0, False
    for rnd in range(cfg.rounds):
        for kind in ("coef", "grid"):
            nsteps = cfg.coef_steps if kind == "coef" else cfg.grid_steps
            if out_of_time or nsteps == 0 or (kind == "grid" and params.theta.numel() == 0):
                continue
            var, lr = ([params.delta], cfg.lr) if kind == "coef" else ([params.theta], cfg.grid_lr)
            done, out_of_time = _phase(obj, var, lr, nsteps, gen, deadline)
            steps += done
            err = _heldout_rms(params, den, held, held_ref)
            tag = f"round {rnd + 1} {kind}"
            history.append((tag, err))
            if math.isfinite(err) and err < best["err"]:
                best.update(err=err, state=params.state(), phase=tag)
            say(f"learned {tag}: held-out RMSE {err:.4g} (closed-form {init_err:.4g}, best {best['err']:.4g}) "
                f"{time.perf_counter() - t0:.1f} s")
            out_of_time = out_of_time or (deadline is not None and time.perf_counter() > deadline)
    params.load(best["state"])
    won = best["phase"] != "init"
    plan = params.plan(init.name, dict(init.provenance)) if won else init
    info = {"winner": "learned" if won else "closed-form", "heldout_rmse_init": init_err,
            "heldout_rmse": best["err"], "best_phase": best["phase"], "steps": steps, "history_k": params.k,
            "out_of_budget": out_of_time, "learn_seconds": round(time.perf_counter() - t0, 3),
            "phases": [[t, v] for t, v in history], "learn_config": asdict(cfg)}
    if won:
        info["sigmas"] = [float(v) for v in params.sigmas().detach()]
    return plan, info


# ---------------------------------------------------------------------------------------
# the `fewstep fit --method learned` entry point


def _split(b: Batch, sl: slice) -> Batch:
    return Batch(b.z[sl], None if b.cond is None else b.cond[sl], b.guidance, b.dtype)


def fit_learned(teacher, solver: str, nfe: int, cfg: LearnConfig = LearnConfig(), init: Plan | None = None,
                init_method: str = "timesteps+dode", batch: int = 100, heldout: int = 50, cls: int | None = None,
                guidance: float | None = None, seed: int = 0, schedule: str | None = None,
                progress: Callable[[str], None] | None = None, **fit_kw) -> Plan:
    """Learn ``solver`` at ``nfe`` on ``teacher``: closed-form fit (``init_method``, or the plan ``init``) on the
    first ``batch`` samples of seed ``seed``, then ``learn`` with the next ``heldout`` samples held out.
    ``fit_kw``: more ``fit.FitConfig`` fields for the closed-form stage (e.g. ``timestep_evals``)."""
    import fewstep

    from ..runtime.models import Model, load
    from ..runtime.solvers import build, get
    from .fit import FitConfig, fit

    if not isinstance(teacher, Model):
        teacher = load(teacher)
    cfg = cfg.check()
    nfe = check_int(nfe, "NFE")
    batch = check_int(batch, "batch")
    heldout = check_int(heldout, "heldout")
    seed = check_int(seed, "seed", 0)
    if guidance is not None and not math.isfinite(guidance):
        raise FitError(f"guidance must be finite, got {guidance}")
    fam = get(solver).name
    den = teacher.denoiser
    say = progress or (lambda s: None)
    t0 = time.perf_counter()
    base = with_guidance(build(fam, nfe, den.sigma_min, den.sigma_max, schedule=schedule), guidance)
    if init is not None:
        if init.nfe != nfe or init.sigma_init != base.sigma_init:
            raise FitError(f"--init plan {init.name!r}: {init.nfe} NFE from σ {init.sigma_init:g}; expected {nfe} "
                           f"NFE from σ {base.sigma_init:g}")
        if init.stochastic_rows:
            raise FitError(f"--init plan {init.name!r} is stochastic; learning needs a deterministic plan")
        want = init.provenance.get("teacher_hash")
        if want is not None and want != teacher.content_hash:
            raise FitError(f"--init plan {init.name!r} was fitted for another teacher ({want[:19]}…), "
                           f"not {teacher.name}")
        init = with_guidance(init, guidance)
    total = batch + heldout
    full = make_batch(teacher, total, seed, cls, guidance)
    full_ref = cached_reference(teacher, full, total, seed, cls, guidance, base.sigma_init, say)
    train, held = _split(full, slice(0, batch)), _split(full, slice(batch, total))
    ref, held_ref = full_ref[:batch], full_ref[batch:]
    t_init = time.perf_counter()
    if init is None:
        say(f"closed-form init: {init_method}")
        cache = {(teacher.content_hash, batch, seed, cls, guidance, base.sigma_init): (train, ref)}
        init = fit(teacher, FitConfig(fam, nfe, init_method, batch=batch, cls=cls, guidance=guidance, seed=seed,
                                      schedule=schedule, **fit_kw), progress=progress, cache=cache)
        init_source = init_method
    else:
        init_source = "given"
    init_seconds = time.perf_counter() - t_init
    plan, info = learn(init, den, train, ref, held, held_ref, cfg, say=say, seed=seed)
    fit_err = rms(run(plan, den, train), ref)
    prov = dict(init.provenance)
    prov.update({
        "fitted": True, "method": "learned", "init_method": init_source, "init_seconds": round(init_seconds, 3),
        "init_fit_seconds": init.provenance.get("fit_seconds"), "init_plan_method": init.provenance.get("method"),
        "base_solver": fam, "teacher": teacher.name,
        "teacher_hash": teacher.content_hash, "batch": batch, "heldout": heldout, "seed": seed,
        "guidance": guidance, "class": cls, "fewstep_version": fewstep.__version__,
        "fit_rmse": fit_err, "fit_rmse_base": rms(run(base, den, train), ref),
        "fit_seconds": round(time.perf_counter() - t0, 3), **info,
    })
    tag = "learned" if cfg.loss == "l2" else f"learned-{cfg.loss}"
    return plan.replace(name=f"{fam}-{nfe}-{tag}", provenance=prov)
