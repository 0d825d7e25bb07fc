"""Learned plans: every coefficient of every row and the σ grid, by gradient descent (S4S-Alt, LD3's soft loss).

S4S (Frankel et al., ICML 2025) learns a linear multistep solver's coefficients to match a strong teacher from
pure noise; S4S-Alt alternates coefficients and timesteps. A Plan's rows *are* a linear multistep solver, so
here the parameters are the rows themselves (a, p, c, q of every row within the history K, and the distinct
σ's), initialised cheaply (``fast_init``: a heuristic grid and D-ODE on 16 samples; or any closed-form fit of
``fit.fit``, e.g. timesteps + D-ODE, which costs 45–416 CPU s on digits) and optimised through the reference
executor's own loop (``executor.run_rows``) to match the reference solve from the same noise:

- with the L2 loss (the default "auto"; ``--optimizer lm``): Levenberg–Marquardt (``_lm_phase``), the loss
  being a sum of squares in 9–73 parameters (2–10 NFE): a forward-difference Jacobian from side-by-side forward
  runs that resume where each perturbation first acts (``_perturbed_endpoints``), all parameters at once on a
  fresh minibatch per iteration (``--lm-blocks rows``: the σ's, then each row); it needs forward runs only, at
  batch sizes where a digits call costs per sample;
- with LD3's loss (or ``--optimizer adam|lbfgs``): coefficient phase (σ's fixed), then grid phase
  (``grid_first``: the other way round), ``rounds`` times, with Adam or L-BFGS (``_lbfgs``, one minibatch per
  phase; "auto": L-BFGS in phases long enough for its curvature pairs to pay, Adam below; the step size
  optionally decays, ``lr_decay``); in the grid phase the base solver's rows move with the σ's
  (``_Params.couple``) and the fitted corrections stay, so the grid phase does what the rebuilt-per-grid
  Nelder–Mead does, from one gradient per step;
- cost: the network's forward and backward are 97 % of a fit (the rest is Python), so the knobs are network
  evaluations: minibatch 16, a budget ``evals`` for all steps, ``patience`` phases without a held-out gain, the
  fast init's candidate grids run side by side (``_run_many``); and a wall-clock ``budget`` (10 s) for the whole
  fit, which returns the held-out best reached in time;
- loss: endpoint L2, or LD3's soft loss (Tong et al., ICLR 2025): the student may start from any point of a
  small ball around its noise (per-sample offset δ, ‖δ‖_rms ≤ ``slack``, learned with the plan) and must land on
  the teacher's endpoint of the unperturbed noise;
- a regulariser ``reg``·mean(((coef − coef₀)/scale)²) toward the closed-form rows (the base solver's rows plus
  its fitted corrections) keeps the multistep coefficients from ringing;
- rows stay a valid Plan: σ's are ``σ_init·exp(−cumsum(exp θ))`` over the distinct σ's, so positive and in the
  init plan's order (rows sharing a σ keep sharing it), and p/q never reach past the history K ≤ 10;
- early stopping on a held-out split of the fitting noise (the ``heldout`` samples after the ``batch`` fitting
  samples of the same Philox seed); the result is the best of {the start, every phase's end} on that
  split, so never worse than the start there. Provenance ``winner`` says which ("closed-form": the start was
  kept, whichever init it came from; ``init_method`` names it).

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
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from types import SimpleNamespace

import numpy as np
import torch

from ..errors import FewstepError
from ..runtime.executor import call_denoiser, run_rows
from ..runtime.plan import MAX_HISTORY, Plan, Row, atomic_write_bytes
from .fitcore import Batch, FitError, check_int, make_batch, reference_target, rms, run, with_guidance

METHODS = ("learned", "plan")  # "plan": the name issue 20 uses
LOSSES = ("l2", "ld3")
# lm: Levenberg–Marquardt (_lm_phase); auto: LM with the L2 loss, else L-BFGS in phases of ≥ LBFGS_MIN_EVALS
# evaluations, else Adam
OPTIMIZERS = ("adam", "lbfgs", "auto", "lm")
LM_BLOCKS = ("joint", "rows")
LM_ROWS_BATCH = 32  # samples per block phase of "rows" (LearnConfig.lm_batch)
# Joint LM's samples per iteration (LearnConfig.lm_batch None): LM_SAMPLE_ROWS // NFE within [8, 32], so an
# iteration's Jacobian (P + 1 runs of ≤ NFE rows, P ≈ 7·NFE parameters) costs ~7·LM_SAMPLE_ROWS·NFE sample-rows:
# digits DPM-Solver++(2M)-4, 10 s budget, fit seeds 0 / 2 / 3 / 4 / 5, 12 rounds: 24 samples as good as 32 (mean
# test RMSE 0.0452 vs 0.0455, scratch; fit_learned_notes.md, "Levenberg–Marquardt II"), and cheaper per iteration.
LM_SAMPLE_ROWS = 96
LBFGS_MIN_EVALS = 10
LR_DECAYS = ("none", "cosine", "rounds")
REFERENCE_CACHE_VERSION = 1  # bump when the reference solve changes


@dataclass(frozen=True)
class LearnConfig:
    """How the plan is learned (every field is a `fewstep fit` flag; saved in the provenance)."""

    loss: str = "l2"  # "l2" | "ld3"
    slack: float = 0.05  # LD3 ball radius: RMS of the per-sample offset of z
    reg: float = 1e-2  # weight of the pull toward the closed-form rows
    rounds: int = 3  # coefficient + grid phases
    coef_steps: int = 10
    grid_steps: int = 10
    lr: float = 2e-2  # Adam, in units of each coefficient's scale (see _Params)
    # Adam, on the log-σ gap parameters. With the grid coupled to the base rows (``couple``) a fast init needs
    # big moves: 1e-1 took digits DPM-Solver++(2M)-4 to held-out RMSE 0.057, 1e-2 to 0.080 (fit_learned_notes.md).
    grid_lr: float = 1e-1
    # Both step sizes are scaled by min(1, lr_nfe / NFE): E rows move together, so the endpoint moves ~E times
    # as far per step; at 10 NFE (digits) 2e-2 / 1e-1 made the first phase worse, 5e-3 / 2e-2 improved every one.
    lr_nfe: int | None = 4
    # "auto": Levenberg–Marquardt with the L2 loss at every NFE (digits DPM-Solver++(2M), 10 s budget: test RMSE
    # 0.045 against Adam's 0.060 at 4 NFE, 0.017 against 0.022 at 10; fit_learned_notes.md), Adam / L-BFGS with LD3.
    optimizer: str = "auto"
    minibatch: int | None = 16  # samples per Adam step (None: the whole fitting batch)
    # Levenberg–Marquardt (--optimizer lm; "auto" picks it with the L2 loss): ``lm_rounds`` rounds of ``lm_steps``
    # iterations per block of parameters, a held-out check after each round; the rounds stop at ``lm_rounds`` or
    # the budget, not at ``patience`` (one round is an iteration on a fresh minibatch, so its held-out error is
    # noisy; the held-out best is kept). Blocks: "joint", all parameters at once; "rows", the σ's, then each row's
    # coefficients from the last row to the first (block coordinate descent). ``lm_batch`` samples of the fitting
    # batch per block phase, a fresh draw each (None: LM_SAMPLE_ROWS // NFE within [8, 32] for "joint",
    # LM_ROWS_BATCH for "rows"). With the Jacobian's step 1e-3 (LM_FD_STEP) joint beat rows at 4 NFE: digits
    # DPM-Solver++(2M), fit seeds 0 / 2 / 3 / 4 / 5, mean test RMSE 0.0452 vs 0.0511 (fit_learned_notes.md).
    lm_rounds: int = 12
    lm_steps: int = 1
    lm_batch: int | None = None
    lm_blocks: str = "joint"
    # Wall-clock seconds: for the whole ``fit_learned`` call when it starts from the fast init (its cost is part
    # of the fit), else for the optimisation alone (a closed-form or given start was paid for separately). A step
    # is not started where it and the last held-out check would end past it, and the held-out best so far is
    # returned. 10 = issue 20's target; fits end past it by at most a step's jitter. 9.5 cut digits
    # DPM-Solver++(2M)-6 before its last (and best) phase on an idle box, test RMSE 0.0348 → 0.0381
    # (fit_learned_notes.md). None: no limit (a fit's result then does not depend on the machine's load).
    budget: float | None = 10.0
    # Network evaluations (one sample through one row, forward + backward) for all gradient steps together;
    # every phase's steps shrink alike to fit. 1800 ≈ 4 CPU s on digits (2.2 ms each at minibatch 16,
    # fit_learned_notes.md), about what is left of 10 s after the fast init and the held-out checks.
    evals: int | None = 1800
    history: int | None = None  # K of the learned rows (None: max(init's K, min(E − 1, 2)))
    patience: int | None = 2  # stop after this many phases in a row without a held-out gain (None: never)
    couple: bool = True  # the grid phase moves the base solver's rows with the σ's (_Params.couple)
    warmup: int = 3  # Adam steps of linear learning-rate warm-up at the start of every phase
    # Step-size schedule: "none" keeps Adam's step; "cosine" takes it to 0 along half a cosine over each phase's
    # steps after the warm-up, so a phase ends with small steps instead of jumping around the optimum it reached;
    # "rounds" scales round r of R by (1 + cos(π·r/R))/2 (3 rounds: 1, 0.75, 0.25): later rounds refine.
    lr_decay: str = "none"
    # Weight of the spread term (``_spread_loss``): per sample, the pixel standard deviation of the endpoint
    # against the reference's; counters L2's shrinkage toward the mean (blur). The fast default's 2-NFE digits
    # are not blurred (their FD excess is feature spread), and there it raised FD (fit_learned_notes.md).
    spread: float = 0.0
    # Weight of the feature term: the endpoint's and the reference's features in the teacher's own network
    # (``Denoiser.features``: its middle block, at noise level ``feature_sigma``, unconditional), their mean
    # square difference relative to the start's, beside the pixel L2 (relative to its start's too, so the weight
    # means the same on every model). L2 alone leaves the 2-NFE digits plans at FD within ±0.3 of the reference
    # solve's, depending on the fit seed's draw; the model's features weigh the errors a classifier sees
    # (fit_learned_notes.md, "A feature term"). 0: off.
    features: float = 0.0
    feature_sigma: float = 0.5
    grid_first: bool = False  # each round runs the grid phase before the coefficient phase
    # Where the evaluation budget shrinks a phase below this many steps, each round runs its coefficient and grid
    # steps as one joint phase (both step sizes as configured; one held-out check per round instead of two). A
    # phase of ≤ ``warmup`` steps never takes a full step, and at 8–10 NFE on digits a held-out check (50·NFE
    # forward calls) cost as much as a 2-step phase (fit_learned_notes.md). 0: always alternate.
    joint_below: int = 0

    def check(self) -> LearnConfig:
        if self.loss not in LOSSES:
            raise FitError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise FitError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "lm" and self.loss != "l2":
            raise FitError("--optimizer lm fits the L2 loss (LD3's per-sample offsets are too many parameters for "
                           "its Jacobian); use --loss l2 or another optimizer")
        if self.lr_decay not in LR_DECAYS:
            raise FitError(f"--lr-decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")
        if not (math.isfinite(self.feature_sigma) and self.feature_sigma > 0):
            raise FitError(f"--feature-sigma must be a finite number > 0, got {self.feature_sigma}")
        for name in ("slack", "reg", "lr", "grid_lr", "spread", "features"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise FitError(f"--{name.replace('_', '-')} must be a finite number ≥ 0, got {v}")
        for name in ("rounds", "coef_steps", "grid_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise FitError(f"--{name.replace('_', '-')} must be an integer ≥ 0, got {v!r}")
        if self.lm_blocks not in LM_BLOCKS:
            raise FitError(f"--lm-blocks must be one of {', '.join(LM_BLOCKS)}, got {self.lm_blocks!r}")
        for name in ("lm_rounds", "lm_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise FitError(f"--{name.replace('_', '-')} must be an integer ≥ 1, got {v!r}")
        if self.lm_batch is not None and (isinstance(self.lm_batch, bool) or self.lm_batch < 1):
            raise FitError(f"--lm-batch must be ≥ 1, got {self.lm_batch!r}")
        if self.minibatch is not None and self.minibatch < 1:
            raise FitError(f"--minibatch must be ≥ 1, got {self.minibatch}")
        if self.lr_nfe is not None and (isinstance(self.lr_nfe, bool) or self.lr_nfe < 1):
            raise FitError(f"--lr-nfe must be ≥ 1, got {self.lr_nfe!r}")
        if self.evals is not None and (isinstance(self.evals, bool) or self.evals < 1):
            raise FitError(f"--evals must be ≥ 1, got {self.evals!r}")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise FitError(f"--budget must be > 0 seconds, got {self.budget}")
        if self.patience is not None and (isinstance(self.patience, bool) or self.patience < 1):
            raise FitError(f"--patience must be ≥ 1, got {self.patience!r}")
        if isinstance(self.joint_below, bool) or not isinstance(self.joint_below, int) or self.joint_below < 0:
            raise FitError(f"--joint-below must be an integer ≥ 0, got {self.joint_below!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise FitError(f"--warmup must be an integer ≥ 0, got {self.warmup!r}")
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

        self.family = None  # set by ``couple``: the grid phase then moves the base solver's rows with the σ's
        self.jac = torch.zeros(len(vals), self.theta.numel(), dtype=torch.float64)
        self.anchor = self.theta.detach().clone()

    def coefs(self, delta=None, theta=None) -> torch.Tensor:
        """The coefficient vector at (``delta``, ``theta``), default the current parameters."""
        delta = self.delta if delta is None else delta
        theta = self.theta if theta is None else theta
        return self.coef0 + self.scale * delta + self.jac @ (theta - self.anchor)

    def _build_coefs(self, theta: np.ndarray) -> np.ndarray | None:
        """The coefficient vector of the base family's plan on the grid that ``theta`` gives (None: that plan does
        not have the init's row structure, so nothing is coupled)."""
        from ..runtime.solvers import get

        top = math.log(self.init.sigma_init)
        logs = top - np.cumsum(np.exp(theta))
        sig = np.exp(np.concatenate([[top], logs]) if self.fixed_top else logs)
        from .fitcore import compile_plan

        try:
            built = get(self.family).build(np.append([sig[self.row_sig[e]] for e in self.grid_rows], 0.0))
            ss = {r.s for r in self.init.rows}
            if len(ss) == 1 and any(r.s not in ss for r in built.rows):
                # the init was compiled in the s = 1 history form (fitcore.to_plan): the same rows re-expressed
                built = compile_plan(built, (), s=next(iter(ss)))
            rows = built.rows
        except (ValueError, ArithmeticError, FewstepError):
            return None
        if len(rows) != len(self.init.rows):
            return None
        out = np.zeros(len(self.coef0))
        for e, (r, r0, (i0, np_, nq)) in enumerate(zip(rows, self.init.rows, self.layout)):
            if r.s != r0.s or r.sigma != sig[self.row_sig[e]] or len(r.p) > np_ or len(r.q) > nq:
                return None
            out[i0] = r.a
            out[i0 + 1:i0 + 1 + len(r.p)] = r.p
            out[i0 + 1 + np_] = r.c
            out[i0 + 2 + np_:i0 + 2 + np_ + len(r.q)] = r.q
        return out

    def couple(self, family: str | None) -> bool:
        """Linearise the base family's rows in the grid parameters around the current θ (finite differences, step
        1e-4 in log-gap units: the rows are smooth in the σ's, so the O(h) error is ~1e-4 of a coefficient's own
        change, far below an optimiser step), keeping ``coefs()`` unchanged. A grid phase with fixed a, c, p, q
        moves the σ's under coefficients computed for other σ's (DPM-Solver's step ratios), which on digits
        2 NFE stalled at held-out RMSE 0.16–0.17 where the rebuilt-per-grid Nelder–Mead reaches 0.11. Returns
        whether the rows are coupled (False: the init's rows are not the family's structure; σ's move alone)."""
        if family is None or self.theta.numel() == 0:
            return False
        self.family = family
        from .fitcore import FitError, grid_of

        try:
            grid = grid_of(self.init)[:-1]
        except FitError:
            return False
        sig0 = sorted({r.sigma for r in self.init.rows}, reverse=True)
        if any(g not in sig0 for g in grid):
            return False
        self.grid_rows = [next(e for e, r in enumerate(self.init.rows) if r.sigma == g) for g in grid]
        th = self.theta.detach().numpy().copy()
        b0 = self._build_coefs(th)
        if b0 is None:
            return False
        jac = np.zeros((len(b0), len(th)))
        for j in range(len(th)):
            t1 = th.copy()
            t1[j] += 1e-4
            b1 = self._build_coefs(t1)
            if b1 is None:
                return False
            jac[:, j] = (b1 - b0) / 1e-4
        with torch.no_grad():
            now = self.coefs()
            self.jac = torch.from_numpy(jac)
            self.anchor = self.theta.detach().clone()
            self.coef0 = now - self.scale * self.delta
        return True

    def sigmas(self, theta=None) -> torch.Tensor:
        top = math.log(self.init.sigma_init)
        logs = top - torch.cumsum(torch.exp(self.theta if theta is None else theta), 0)
        if self.fixed_top:
            logs = torch.cat([logs.new_tensor([top]), logs])
        return torch.exp(logs)

    def rows(self, free: bool, at: torch.Tensor | None = None):
        """Rows for ``run_rows``: coefficients as ``_Free`` tensors and σ's as 0-dim tensors (free), or all floats;
        at the flat parameter vector ``at`` (``vector()``'s layout) instead of the current parameters."""
        nd = self.delta.numel()
        delta, theta = (None, None) if at is None else (at[:nd], at[nd:])
        c, sig = self.coefs(delta, theta), self.sigmas(theta)
        if not free:
            sig = sig.tolist()
        out = []
        for e, (i0, np_, nq) in enumerate(self.layout):
            v = [_Free(c[i]) for i in range(i0, i0 + 2 + np_ + nq)] if free else c[i0:i0 + 2 + np_ + nq].tolist()
            r = self.init.rows[e]
            out.append(SimpleNamespace(sigma=sig[self.row_sig[e]], a=v[0], p=tuple(v[1:1 + np_]), c=v[1 + np_],
                                       q=tuple(v[2 + np_:]), g=0.0, s=r.s, guidance=r.guidance))
        return out

    def vector(self) -> torch.Tensor:
        """The free parameters as one flat vector [δ, θ] (what ``rows(at=…)`` and ``set_vector`` take)."""
        return torch.cat([self.delta.detach(), self.theta.detach()])

    def set_vector(self, v: torch.Tensor) -> None:
        with torch.no_grad():
            self.delta.copy_(v[:self.delta.numel()])
            self.theta.copy_(v[self.delta.numel():])

    def plan(self, name: str, provenance: dict) -> Plan:
        with torch.no_grad():
            rows = [Row(sigma=float(r.sigma), a=r.a, p=tuple(r.p), c=r.c, q=tuple(r.q), g=0.0, guidance=r.guidance,
                        s=r.s) for r in self.rows(free=False)]
        return Plan(name=name, sigma_init=self.init.sigma_init, rows=tuple(rows), provenance=provenance)

    def state(self):
        return self.delta.detach().clone(), self.theta.detach().clone(), self.coef0, self.jac, self.anchor

    def load(self, state) -> None:
        with torch.no_grad():
            self.delta.copy_(state[0])
            self.theta.copy_(state[1])
        self.coef0, self.jac, self.anchor = state[2:]


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


def _spread_loss(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """mean over samples of (std(x_i) − std(ref_i))², the std over each sample's own entries (its contrast).

    Why it counters the pull to the mean: write a sample's centred endpoint as s·u (unit direction u, scale s)
    and the reference's as r̃. Endpoint L2 ‖s·u − r̃‖² is minimised at s = ‖r̃‖·cos(u, r̃): whatever direction the
    plan cannot reproduce shrinks the sample's contrast by that cosine (digits learned at 2 NFE from the
    closed-form start: recall up, precision down). Adding w·(s − ‖r̃‖)² moves the minimiser to
    ‖r̃‖·(cos + w)/(1 + w), so w = 1 halves the shrinkage; it changes nothing where the plan matches the reference
    (cos = 1). std = ‖x̃‖/√dim, so the term is in the same units as the L2 term's mean square."""
    d = x.shape[0]
    sx = x.to(torch.float64).reshape(d, -1).std(1, unbiased=False)
    sr = ref.reshape(d, -1).std(1, unbiased=False)
    return (sx - sr).pow(2).mean()


def _features(den, x: torch.Tensor, cond, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """[N, F] float64: ``den.features`` of the states ``x`` [N, …] at noise level ``sigma`` (``cond`` indexed along
    the batch like ``x``), in calls of at most SIDE_BY_SIDE_ENTRIES entries; differentiable where ``x`` is."""
    n = x.shape[0]
    per = max(1, SIDE_BY_SIDE_ENTRIES // max(1, x[0].numel()))
    out = []
    for i in range(0, n, per):
        j = min(n, i + per)
        ci = None if cond is None else cond[torch.arange(i, j)]
        sig = torch.full((j - i,), float(sigma), dtype=torch.float64)
        out.append(den.features(x[i:j].to(dtype), sig, ci).to(torch.float64))
    return torch.cat(out)


class _Heldout:
    """The held-out check: RMSE of the endpoint against the reference and the score that picks the best phase:
    the RMSE itself, or with the feature term the objective without its regulariser (pixel MSE relative to the
    start's plus W · feature MSE relative to the start's)."""

    def __init__(self, den, batch: Batch, ref: torch.Tensor, cfg: LearnConfig):
        self.den, self.batch, self.ref, self.cfg = den, batch, ref, cfg
        self.mse0 = self.fmse0 = 1.0
        self.fref = (_features(den, ref, batch.cond, cfg.feature_sigma, batch.dtype) if cfg.features else None)

    def start(self, x0: torch.Tensor) -> tuple[float, float]:
        """Takes the start's endpoint as the terms' scales (``_Objective`` uses the same); returns its check."""
        mse = float(_mse(x0, self.ref))
        self.mse0 = mse if math.isfinite(mse) and mse > 0 else 1.0
        if self.fref is not None:
            f = float(_mse(self._feat(x0), self.fref))
            self.fmse0 = f if math.isfinite(f) and f > 0 else 1.0
        return self.score(x0)

    def _feat(self, x):
        return _features(self.den, x, self.batch.cond, self.cfg.feature_sigma, self.batch.dtype)

    def score(self, x: torch.Tensor) -> tuple[float, float]:
        err = rms(x, self.ref)
        if not math.isfinite(err):
            return err, math.inf
        if self.fref is None:  # no feature term: the RMSE itself picks (per-sample RMS, not the global MSE)
            return err, err
        s = float(_mse(x, self.ref)) / self.mse0
        s += self.cfg.features * float(_mse(self._feat(x), self.fref)) / self.fmse0
        return err, (s if math.isfinite(s) else math.inf)

    def __call__(self, params: _Params) -> tuple[float, float]:
        with torch.no_grad():
            return self.score(endpoint(params, self.den, self.batch, self.batch.z, self.batch.cond))


# ---------------------------------------------------------------------------------------
# the optimisation


class _Adam:
    """Adam (Kingma & Ba 2015) on a few tensors. torch.optim's constructor imports torch._dynamo: 7.7 s of a
    GMM fit measured here on the loaded 2-core box, for a loop whose steps take milliseconds."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, scales=None):
        self.params, self.lr, self.betas, self.eps, self.t = list(params), lr, betas, eps, 0
        self.scales = [1.0] * len(self.params) if scales is None else list(scales)  # per tensor: its step / lr
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        for p, m, v, sc in zip(self.params, self.m, self.v, self.scales):
            if p.grad is None:
                continue
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            p.sub_(self.lr * sc * (m / (1 - b1 ** self.t)) / ((v / (1 - b2 ** self.t)).sqrt() + self.eps))


class _Objective:
    """The training loss of ``params`` on ``train`` (relative to the init's, plus the regulariser) and, for LD3,
    the per-sample offsets of the student's noise inside the slack ball (z units, RMS ≤ ``slack``)."""

    def __init__(self, params: _Params, den, train: Batch, ref: torch.Tensor, cfg: LearnConfig, mse0: float,
                 fmse0: float = 1.0):
        self.params, self.den, self.train, self.ref, self.cfg = params, den, train, ref, cfg
        # the feature term (``LearnConfig.features``): the reference's features, once; ``fmse0`` is the start's
        # held-out feature MSE, its scale as ``mse0`` is the pixel term's
        self.fnorm = max(fmse0, 1e-30)
        self.fref = None
        if cfg.features:
            with torch.no_grad():
                self.fref = _features(den, ref, train.cond, cfg.feature_sigma, train.dtype)
        self.shift = torch.zeros_like(train.z, requires_grad=True) if cfg.loss == "ld3" else None
        # Relative to the init's loss, so ``reg`` means the same on every model. ``mse0`` is the init's held-out
        # MSE, which the caller has anyway: another run over the training batch only to normalise cost 100·NFE
        # network calls, up to 1 s of a 10-NFE digits fit (fit_learned_notes.md).
        self.norm = max(mse0, 1e-30)

    def __call__(self, idx=None) -> torch.Tensor:
        t = self.train
        z = t.z if idx is None else t.z[idx]
        cond = t.cond if idx is None or t.cond is None else t.cond[idx]
        r = self.ref if idx is None else self.ref[idx]
        if self.shift is not None:
            z = z + (self.shift if idx is None else self.shift[idx])
        x = endpoint(self.params, self.den, t, z, cond)
        loss = _mse(x, r) / self.norm
        if self.cfg.spread:
            loss = loss + self.cfg.spread * _spread_loss(x, r) / self.norm
        if self.fref is not None:
            fx = _features(self.den, x, cond, self.cfg.feature_sigma, t.dtype)
            loss = loss + self.cfg.features * _mse(fx, self.fref if idx is None else self.fref[idx]) / self.fnorm
        if self.cfg.reg:
            loss = loss + self.cfg.reg * (self.params.delta ** 2).mean()
        return loss

    def project(self) -> None:
        if self.shift is not None:
            with torch.no_grad():
                d = self.shift.reshape(self.shift.shape[0], -1)
                rms_ = d.pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-30)
                d.mul_(torch.clamp(self.cfg.slack / rms_, max=1.0))


def _uses_lbfgs(cfg: LearnConfig, nsteps: int) -> bool:
    # "auto": L-BFGS where a phase has ≥ LBFGS_MIN_EVALS evaluations. Its curvature comes from past steps, so
    # with fewer (line-search trials included) it is little more than gradient descent on one minibatch. On
    # digits at 10 per phase (NFE 2) it gave lower FD than Adam in 6 of 6 fits (RMSE ±3 %); at 5 (NFE 4) it
    # lost in RMSE in both cells (fit_learned_notes.md).
    return cfg.optimizer == "lbfgs" or (cfg.optimizer == "auto" and nsteps >= LBFGS_MIN_EVALS)


def _lm_blocks(cfg: LearnConfig, params: _Params) -> list[torch.Tensor]:
    """The parameter blocks of one LM round, as masks over ``params.vector()`` (see ``LearnConfig.lm_blocks``)."""
    nd, total = params.delta.numel(), params.vector().numel()
    if cfg.lm_blocks == "joint":
        return [torch.ones(total, dtype=torch.bool)]
    out = []
    if total > nd:
        out.append(torch.arange(total) >= nd)
    for i0, np_, nq in reversed(params.layout):
        out.append((torch.arange(total) >= i0) & (torch.arange(total) < i0 + 2 + np_ + nq))
    return out


def _uses_lm(cfg: LearnConfig) -> bool:
    return cfg.optimizer == "lm" or (cfg.optimizer == "auto" and cfg.loss == "l2")


def _lbfgs(f: Callable[[], torch.Tensor], var: list, max_evals: int, memory: int = 10) -> int:
    """Minimise ``f()`` over the tensors ``var`` by L-BFGS (Nocedal & Wright, alg. 7.4: two-loop recursion,
    ``memory`` pairs) with a backtracking Armijo line search, in at most ``max_evals`` evaluations of f and its
    gradient, line-search trials included; returns the evaluations used. The first step is
    min(1, 1/‖g‖₁) along −g (as torch.optim.LBFGS), later ones start at 1 (the quasi-Newton step, scaled by
    sᵀy/yᵀy). Written out because torch.optim's constructor imports torch._dynamo: 3.0 CPU s per process here,
    a third of the whole fit's budget."""

    def evaluate():
        for p in var:
            p.grad = None
        loss = f()
        loss.backward()
        return float(loss.detach()), torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                       for p in var])

    def move(step: torch.Tensor) -> None:
        with torch.no_grad():
            o = 0
            for p in var:
                p.add_(step[o:o + p.numel()].view_as(p))
                o += p.numel()

    fx, g = evaluate()
    evals, pairs = 1, []
    while evals < max_evals:
        d = -g
        alphas = []
        for s_, y_, rho in reversed(pairs):
            a = rho * float(s_ @ d)
            d = d - a * y_
            alphas.append(a)
        if pairs:
            s_, y_, _ = pairs[-1]
            d = d * (float(s_ @ y_) / float(y_ @ y_))
        for (s_, y_, rho), a in zip(pairs, reversed(alphas)):
            d = d + (a - rho * float(y_ @ d)) * s_
        gtd = float(g @ d)
        if not gtd < 0:
            break
        t = 1.0 if pairs else min(1.0, 1.0 / max(float(g.abs().sum()), 1e-30))
        accepted, x0 = False, [p.detach().clone() for p in var]
        while evals < max_evals:
            move(t * d)
            f1, g1 = evaluate()
            evals += 1
            if math.isfinite(f1) and f1 <= fx + 1e-4 * t * gtd:
                accepted = True
                break
            with torch.no_grad():  # back to the point exactly (x + td − td can differ in the last bit)
                for p, v in zip(var, x0):
                    p.copy_(v)
            t *= 0.5
        if not accepted:
            break
        s_, y_ = t * d, g1 - g
        sy = float(s_ @ y_)
        if sy > 1e-12 * float(y_ @ y_):  # keep only pairs with positive curvature (H stays positive definite)
            pairs = (pairs + [(s_, y_, 1.0 / sy)])[-memory:]
        fx, g = f1, g1
    for p in var:
        p.grad = None
    return evals


# Forward-difference step of the Levenberg–Marquardt Jacobian, in parameter units (_lm_phase). The network runs in
# float32, so a difference carries its rounding (~1e-6 of the state) over h: against a float64 central-difference
# Jacobian (digits DPM-Solver++(2M)-4, benchmarks/results/fit_lm_jacobian.md) h = 1e-4 was off by 4 % (median
# column) and 1e-3 by 0.5 %, 1e-2 by 0.7 % (there the O(h) truncation dominates). Columns of small effect were
# pure noise at 1e-4 (×30 off), and a Gauss–Newton step divides by their size: with 1e-3 joint LM went from worse
# than by-row blocks to better (fit_learned_notes.md).
LM_FD_STEP = 1e-3
LM_THETA_MIN, LM_THETA_MAX = math.log(1e-6), math.log(10.0)  # bounds of an LM candidate's log σ gaps
LM_DAMPING = (0.1, 1.0, 10.0)  # the damping factors tried side by side at every LM iteration (× the current λ)


def _residuals(obj: _Objective, x: torch.Tensor, idx: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """Per candidate (``x[i]``, the samples ``idx`` of the fitting batch run with the flat parameters ``vecs[i]``):
    the residual vector r whose ‖r‖² is ``_Objective``'s L2 loss: endpoint error, the spread and feature terms and
    the pull toward the closed-form rows."""
    cfg, m, n = obj.cfg, x.shape[0], x.shape[1]
    ref = obj.ref[idx]
    d = x.to(torch.float64) - ref.unsqueeze(0)
    parts = [d.reshape(m, -1) / math.sqrt(d[0].numel() * obj.norm)]
    if obj.fref is not None:
        t = obj.train
        cond = None if t.cond is None else t.cond[idx[torch.arange(m * n) % n]]
        with torch.no_grad():
            fx = _features(obj.den, x.reshape(m * n, *x.shape[2:]), cond, cfg.feature_sigma, t.dtype)
        fd = fx.reshape(m, n, -1) - obj.fref[idx].unsqueeze(0)
        parts.append(fd.reshape(m, -1) * math.sqrt(cfg.features / (fd[0].numel() * obj.fnorm)))
    if cfg.spread:
        sx = x.to(torch.float64).reshape(m, n, -1).std(2, unbiased=False)
        sr = ref.reshape(n, -1).std(1, unbiased=False)
        parts.append((sx - sr) * math.sqrt(cfg.spread / (n * obj.norm)))
    nd = obj.params.delta.numel()
    if cfg.reg and nd:
        parts.append(vecs[:, :nd] * math.sqrt(cfg.reg / nd))
    return torch.cat(parts, 1)


def _lm_phase(obj: _Objective, free: torch.Tensor, iters: int, gen, deadline: float | None, clock: dict,
              recouple: Callable[[], None] | None = None, say: Callable[[str], None] = lambda s: None,
              batch_size: int | None = None) -> tuple[int, bool]:
    """``iters`` Levenberg–Marquardt iterations (Marquardt 1963) on the parameters where ``free`` is True; returns
    (iterations taken, ran out of time).

    The loss is a sum of squares in a few dozen parameters (digits DPM-Solver++(2M)-4: 22 coefficients and 3 σ
    gaps; 10 NFE: 64 and 9), the case Gauss–Newton is made for: where Adam needed ~200 minibatch steps (~40 CPU s) to
    take digits 4-NFE held-out RMSE below 0.05, a damped Gauss–Newton step uses the curvature of every parameter
    pair at once.
    The Jacobian is taken by forward differences (step ``LM_FD_STEP``): the P + 1 perturbed plans run side by side
    (``_side_by_side``, one network call per row on (P + 1)·minibatch samples), forward only, where a call costs
    per sample (0.5 ms for a digits sample at batch ≥ 64 against 2.4 ms for forward + backward at 16), and each
    perturbed plan reruns only the rows its change reaches (``_perturbed_endpoints``). Accuracy: see LM_FD_STEP
    (0.5 % per column at its step; a search direction, then checked by its actual loss). Each iteration solves
    (JᵀJ + λ·diag(JᵀJ)) s = −Jᵀr for the damping factors ``LM_DAMPING``·λ, runs those candidates side by side on
    the same minibatch, and keeps the best if it lowers the loss (λ follows it); else λ grows 100× and nothing
    moves. The samples (``batch_size`` of the fitting batch, None: all) are drawn once per phase, so accept /
    reject compares like with like."""
    params, t = obj.params, obj.train
    durations = clock.setdefault("lm", [])
    n = t.z.shape[0]
    idx = torch.arange(n)
    if batch_size is not None and batch_size < n:
        idx = torch.randperm(n, generator=gen)[:batch_size]
    sub = Batch(t.z[idx], None if t.cond is None else t.cond[idx], t.guidance, t.dtype)
    cols = free.nonzero().reshape(-1)
    nd = params.delta.numel()
    lam = clock.get("lm_lambda", 1e-2)

    def losses(vecs: torch.Tensor, base=None):
        """Residuals at vecs[0] (the current point) and vecs[1:]; with the current point's run ``base``."""
        x, base = _perturbed_endpoints(params, vecs, obj.den, sub, base)
        return _residuals(obj, x, idx, vecs), base

    for it in range(iters):
        start = time.perf_counter()
        if deadline is not None and durations and start + statistics.median(durations) > deadline:
            return it, True
        if recouple is not None:
            recouple()
        v = params.vector()
        vecs = v.repeat(len(cols) + 1, 1)
        vecs[torch.arange(1, len(cols) + 1), cols] += LM_FD_STEP
        r, base = losses(vecs)
        if not bool(torch.isfinite(r[0]).all()):
            return it, False  # the current point diverges on this minibatch: nothing to linearise around
        jac = (r[1:] - r[0]) / LM_FD_STEP  # [P, R]
        a, g = jac @ jac.T, jac @ r[0]
        diag = a.diagonal().clamp_min(1e-12 * float(a.diagonal().max().clamp_min(1e-300)))
        cands = []
        for f in LM_DAMPING:
            try:
                step = torch.linalg.solve(a + lam * f * torch.diag(diag), -g)
            except RuntimeError:  # singular even with damping: skip this factor
                continue
            w = v.clone()
            w[cols] += step
            # an undamped step can throw a log-gap far out: e^θ ∈ [1e-6, 10] keeps every σ of the plan positive,
            # distinct and finite in float64 (≥ σ_init·e^(−10·E))
            w[nd:] = w[nd:].clamp(LM_THETA_MIN, LM_THETA_MAX)
            cands.append((lam * f, w))
        f0 = float(r[0].pow(2).sum())
        if cands:
            # the candidates differ from the current point only where ``free`` is: each resumes where it first differs
            rc = losses(torch.stack([v] + [w for _, w in cands]), base)[0][1:]
            fc = rc.pow(2).sum(1)
            fc = torch.where(torch.isfinite(fc), fc, torch.full_like(fc, math.inf))
            b = int(fc.argmin())
            if float(fc[b]) < f0:
                params.set_vector(cands[b][1])
                lam = max(cands[b][0], 1e-8)
            else:
                lam = min(lam * 100, 1e8)
        clock["lm_lambda"] = lam
        say(f"lm iteration {it + 1}/{iters}: training loss {f0:.4g} -> {min(f0, float(fc.min()) if cands else f0):.4g} "
            f"(damping {lam:.2g}, {time.perf_counter() - start:.1f} s)")
        durations.append(time.perf_counter() - start)
    return iters, False


def _phase(obj: _Objective, var: list, lr: float, nsteps: int, gen, deadline: float | None,
           scales=None, clock: dict | None = None) -> tuple[int, bool]:
    """``nsteps`` optimiser steps on ``var`` (Adam's step for ``var[i]``: lr·``scales[i]``); returns (steps taken,
    ran out of time). With a ``deadline``, a step is not started when the median duration of the fit's steps so far
    (``clock["steps"]``; the fit's first step always runs) says it would end past it: the median, because one step
    of a process that the scheduler set aside (a niced fit on a busy box) can take seconds."""
    clock = {} if clock is None else clock
    durations = clock.setdefault("steps", [])
    cfg, n = obj.cfg, obj.train.z.shape[0]
    scales = [1.0] * len(var) if scales is None else list(scales)
    if obj.shift is not None:
        var, scales = var + [obj.shift], scales + [1.0]
    if _uses_lbfgs(cfg, nsteps):
        # One minibatch per phase (a deterministic objective for the line search); ``nsteps`` bounds the function
        # evaluations, line-search trials included, so the evaluation budget means the same as for Adam.
        idx = None
        if cfg.minibatch is not None and cfg.minibatch < n:
            idx = torch.randperm(n, generator=gen)[:cfg.minibatch]
        done = _lbfgs(lambda: obj(idx), var, nsteps)
        obj.project()
        return done, deadline is not None and time.perf_counter() > deadline
    opt = _Adam(var, lr=lr, scales=scales)
    for i in range(nsteps):
        # Warm-up: Adam's first steps move every parameter by about lr whatever its gradient's size, which
        # knocks a well-tuned long plan off its optimum (fit_learned_notes.md).
        opt.lr = lr * min(1.0, (i + 1) / cfg.warmup) if cfg.warmup else lr
        if cfg.lr_decay == "cosine" and i >= cfg.warmup:
            # half a cosine over the steps after the warm-up: the last step still moves (1 − cos(π/m))/2 of lr
            m = nsteps - cfg.warmup
            opt.lr *= 0.5 * (1 + math.cos(math.pi * (i - cfg.warmup) / m))
        start = time.perf_counter()
        if deadline is not None and durations and start + statistics.median(durations) > deadline:
            return i, True
        idx = None
        if cfg.minibatch is not None and cfg.minibatch < n:
            idx = torch.randperm(n, generator=gen)[:cfg.minibatch]
        opt.zero_grad()
        obj(idx).backward()
        opt.step()
        obj.project()
        durations.append(time.perf_counter() - start)
    return nsteps, False


def _learn_params(init: Plan, cfg: LearnConfig) -> _Params:
    """The parameters ``learn`` optimises: ``init``'s rows with history K = ``cfg.history`` (default
    max(init's K, min(E − 1, 2))), never below the init's own."""
    k = cfg.history if cfg.history is not None else max(init.history, min(init.nfe - 1, 2))
    return _Params(init, max(k, init.history))


def learn(init: Plan, den, train: Batch, ref: torch.Tensor, held: Batch, held_ref: torch.Tensor,
          cfg: LearnConfig, say: Callable[[str], None] = lambda s: None, seed: int = 0, family: str | None = None,
          deadline: float | None = None):
    """Optimise ``init``'s rows on ``train``; returns (best plan on ``held``, info). ``init`` itself is a
    candidate, so the result is never worse than it on ``held`` (as the run_rows endpoint measures it: in RMSE, or
    with the feature term in the objective's pixel + feature score, ``_Heldout``).
    ``deadline`` (a ``time.perf_counter()`` value) replaces ``cfg.budget`` counted from now."""
    cfg = cfg.check()
    t0 = time.perf_counter()
    if deadline is None and cfg.budget is not None:
        deadline = t0 + cfg.budget
    params = _learn_params(init, cfg)
    if cfg.features and den.feature_module() is None:
        raise FitError(f"--features: the {type(den).__name__} teacher has no network with a middle block "
                       f"({', '.join(den.FEATURE_MODULES + den.FEATURE_BLOCK_LISTS)}) to take features from; "
                       "use --features 0")
    check = _Heldout(den, held, held_ref, cfg)
    with torch.no_grad():
        x0 = endpoint(params, den, held, held.z, held.cond)
        init_err, init_score = check.start(x0)
    # Every phase ends with a held-out check like this one: steps stop early enough for it to fit the budget.
    check_seconds = time.perf_counter() - t0
    stop_at = None if deadline is None else deadline - check_seconds
    clock = {}
    n_train = train.z.shape[0]
    obj = _Objective(params, den, train, ref, cfg, check.mse0, check.fmse0)
    gen = torch.Generator().manual_seed(seed)
    best = {"err": init_err, "score": init_score, "state": params.state(), "phase": "init"}
    history, steps, out_of_time, stale, coupled = [("init", init_err)], 0, False, 0, False
    # The evaluation budget shrinks every phase alike (rounded up) and keeps all rounds: on digits
    # DPM-Solver++(2M)-4, 3 rounds of 7 steps reached held-out RMSE 0.056, 2 rounds of 10 only 0.069, though each
    # phase also costs a held-out check (50·NFE forward calls; fit_learned_notes.md). Rounding down instead (the
    # budget kept exactly: 18 steps instead of 24 at 6 NFE, 14 instead of 18 at 8) made digits DPM-Solver++(2M)-6
    # worse on the held-out split in a scratch run (0.0351 → 0.0417): 3-step phases end inside the 3-step warm-up.
    per_round = (cfg.coef_steps + cfg.grid_steps) * min(cfg.minibatch or n_train, n_train) * init.nfe
    rounds, frac = cfg.rounds, 1.0
    if cfg.evals is not None and rounds * per_round > cfg.evals:
        frac = cfg.evals / (rounds * per_round)
    kinds = ("grid", "coef") if cfg.grid_first else ("coef", "grid")
    n_coef, n_grid = (math.ceil(frac * v) for v in (cfg.coef_steps, cfg.grid_steps))
    joint = 0 < min(n_coef, n_grid) < cfg.joint_below and params.theta.numel() > 0
    if joint:
        kinds = ("joint",)
    use_lm, blocks, lm_batch = _uses_lm(cfg), [], None
    if use_lm:
        kinds, blocks = ("lm",), _lm_blocks(cfg, params)
        lm_batch = cfg.lm_batch
        if lm_batch is None:
            lm_batch = max(8, min(32, LM_SAMPLE_ROWS // init.nfe)) if len(blocks) == 1 else LM_ROWS_BATCH
        rounds = cfg.lm_rounds
    for rnd, kind in [(rnd, kind) for rnd in range(rounds) for kind in kinds]:
        nsteps = {"coef": n_coef, "grid": n_grid, "joint": n_coef + n_grid, "lm": cfg.lm_steps}[kind]
        if out_of_time or nsteps == 0 or (kind == "grid" and params.theta.numel() == 0):
            continue
        if cfg.patience is not None and stale >= cfg.patience and not use_lm:
            break
        if kind != "coef":
            coupled = params.couple(family) or coupled
        lr_scale = 1.0 if cfg.lr_nfe is None else min(1.0, cfg.lr_nfe / init.nfe)
        if cfg.lr_decay == "rounds":
            lr_scale *= 0.5 * (1 + math.cos(math.pi * rnd / rounds))
        if kind == "joint":
            var, scales = [params.delta, params.theta], [cfg.lr, cfg.grid_lr]
        else:
            var, scales = ([params.delta], [cfg.lr]) if kind == "coef" else ([params.theta], [cfg.grid_lr])
        if kind == "lm":
            done = 0
            for free in blocks:
                # the base rows are re-linearised at every iteration's point (the σ's move far in a few steps)
                d, out_of_time = _lm_phase(obj, free, nsteps, gen, stop_at, clock, lambda: params.couple(family),
                                           say, lm_batch)
                done += d
                if out_of_time:
                    break
        else:
            done, out_of_time = _phase(obj, var, lr_scale, nsteps, gen, stop_at, scales, clock)
        steps += done
        if done == 0:  # out of time before this phase's first step: nothing new to check
            break
        err, score = check(params)
        tag = f"round {rnd + 1} {kind}"
        history.append((tag, err))
        if score < best["score"]:
            best.update(err=err, score=score, state=params.state(), phase=tag)
            stale = 0
        else:
            stale += 1
        say(f"learned {tag}: held-out RMSE {err:.4g} (start {init_err:.4g}, best {best['err']:.4g}) "
            f"{time.perf_counter() - t0:.1f} s")
        out_of_time = out_of_time or (stop_at is not None and time.perf_counter() > stop_at)
    params.load(best["state"])
    won = best["phase"] != "init"
    plan = params.plan(init.name, dict(init.provenance)) if won else init
    info = {"winner": "learned" if won else "closed-form", "heldout_rmse_init": init_err,
            "heldout_rmse": best["err"], "heldout_score": best["score"] if cfg.features else None,
            # the score's scales: the start's held-out pixel and feature MSE (means over every entry)
            "heldout_scales": [check.mse0, check.fmse0] if cfg.features else None,
            "best_phase": best["phase"], "steps": steps, "history_k": params.k,
            "out_of_budget": out_of_time,
            "grid_coupled": coupled, "optimizer": "lm" if use_lm else cfg.optimizer,
            "rounds": rounds, "lm_blocks": len(blocks) if use_lm else None,
            "lm_batch": min(lm_batch or n_train, n_train) if use_lm else None, "step_fraction": frac,
            "joint_phases": joint,
            "stopped_early": not use_lm and cfg.patience is not None and stale >= cfg.patience,
            "learn_seconds": round(time.perf_counter() - t0, 3),
            "phases": [[t, v] for t, v in history], "learn_config": asdict(cfg)}
    if won:
        info["sigmas"] = [float(v) for v in params.sigmas().detach()]
    return plan, info


# ---------------------------------------------------------------------------------------
# the `fewstep fit --method learned` entry point


def fast_init_batch(nfe: int) -> int:
    """Samples of the fast init: 16, fewer past 5 NFE so its cost (≈ 21·NFE·n forward calls) stays ≈ 1,700."""
    return max(8, min(16, 80 // nfe))


def fast_init(family: str, nfe: int, den, batch: Batch, ref: torch.Tensor, guidance: float | None = None,
              schedule: str | None = None, n: int | None = None) -> tuple[Plan, dict]:
    """The cheap start for ``learn`` (``--init-method fast``): a heuristic grid and D-ODE on ``n`` samples
    (``fast_init_batch``: 16 up to 5 NFE, 8 at 10).

    Grid: EDM's schedule over the family's step count, from σ_max down to σ_end ∈ {σ_min, 0.01, 0.03, 0.1, 0.3, 1}
    at ρ = 7, then ρ ∈ {3, 5, 10, 15} at the best σ_end, forward runs only (≤ 10·NFE·n calls); a candidate is kept
    only where it beats the base grid on the ``n`` samples. Base EDM spends the last evaluation at σ_min, where D
    is the identity: on digits DPM-Solver++(2M) the chosen grid's plain held-out RMSE is 0.21 / 0.14 / 0.035 at
    2 / 4 / 10 NFE against the base grid's 0.50 / 0.23 / 0.056 (the Nelder–Mead of ``timesteps`` costs 45–416
    CPU s on digits; the gradient phases refine the grid from here). It is compared on the same noises for every
    candidate (paired), and the candidates differ by 10–50 %, so a few samples rank them. D-ODE's λ's are then
    fitted on the ``n`` samples and kept if they help there (else the plain solver on that grid).
    Each λ is one scalar fitted by least squares over n·dim residual entries (6,272 for 8 digits), so 8–16
    samples pin it as well as D-ODE's 100: measured held-out RMSE 0.2441 / 0.1795 / 0.0376 (10 samples) vs
    0.2408 / 0.1795 / 0.0381 (100) at 2 / 4 / 10 NFE, at a tenth of the cost. Returns (plan, info)."""
    from ..runtime import schedules
    from ..runtime.solvers import build, get
    from . import dode
    from .fitcore import grid_of, safeguard

    base = with_guidance(build(family, nfe, den.sigma_min, den.sigma_max, schedule=schedule), guidance)
    steps = len(grid_of(base)) - 1
    n = fast_init_batch(nfe) if n is None else n
    small, sref = _split(batch, slice(0, min(n, batch.z.shape[0]))), ref[:n]
    info = {"grid": "base", "batch": small.z.shape[0]}
    smin, smax = float(den.sigma_min), float(grid_of(base)[0])
    best = {"rho": 7.0, "end": smin, "plan": base, "err": math.inf}

    def trials(grids) -> None:
        """Run the candidates (ρ, σ_end) side by side (``_run_many``) and keep, in order, each one that beats the
        best so far: what running them one after the other did, in one network call per row."""
        cands, keys = [], []
        for rho, end in grids:
            if rho is not None and not smin <= end < smax:
                continue
            cand = base if rho is None else with_guidance(get(family).build(schedules.edm(steps, end, smax, rho)),
                                                          guidance)
            if cand.nfe == nfe:
                cands.append(cand)
                keys.append((rho, end))
        for cand, (rho, end), x in zip(cands, keys, _run_many(cands, den, small)):
            e = rms(x, sref)
            if e < best["err"]:
                best.update(err=e, plan=cand if rho is None else cand.replace(name=base.name,
                                                                              provenance=base.provenance))
                if rho is not None:
                    best.update(rho=rho, end=end)
                    info["grid"] = f"edm rho {rho:g} to {end:.4g}"

    ends = (smin, 0.01, 0.03, 0.1, 0.3, 1.0) if steps > 1 else ()
    trials([(None, smin)] + [(7.0, end) for end in ends])
    if steps > 2:
        trials([(rho, best["end"]) for rho in (3.0, 5.0, 10.0, 15.0)])
    plan, err = best["plan"], best["err"]
    fitted, dinfo = dode.fit_dode(plan, family, den, small)
    # α ∈ {1, 0}: D-ODE kept unless the plain plan is better on the ``n`` samples (its error is known: not re-run)
    kept, sg = safeguard(plan, fitted, dinfo.pop("slots"), den, small, sref, alphas=(1.0, 0.0), known={0.0: err})
    info.update(dode_alpha=sg["alpha"], rmse_plain=err, rmse=sg["fit_rmse_kept"], lambdas=dinfo["lambdas"])
    return kept, info


def _run_many(plans: list[Plan], den, batch: Batch) -> list[torch.Tensor]:
    """``fitcore.run`` of each plan on ``batch`` (float64 state, the network in its dtype), the plans side by side:
    one network call per row on len(plans)·n samples, each plan's coefficients and σ per sample. On digits a call
    on 8 samples costs ~10 ms, 5 of them fixed overhead, so 7 grids of the fast init's 8–16 samples cost about
    half of running them one by one. Plans whose rows differ in shape (history, s, guidance) run one by one."""
    r0 = plans[0].rows if plans else ()
    same = all(len(p.rows) == len(r0) and all(
        len(a.p) == len(b.p) and len(a.q) == len(b.q) and a.s == b.s and a.g == 0.0 and b.g == 0.0
        and a.guidance == b.guidance for a, b in zip(p.rows, r0)) for p in plans)
    if len(plans) < 2 or not same:
        return [run(p, den, batch) for p in plans]
    z = batch.z
    return _side_by_side([p.rows for p in plans], torch.stack([p.sigma_init * z for p in plans]),
                         max(max(p.history for p in plans), 1), den, batch)


# Side-by-side runs are split so one network call holds at most this many latent entries (samples × entries per
# sample): 2048 digits samples, 8 SD 64² latents. Past a few hundred digits samples a call costs per sample
# (0.5 ms forward), so larger calls buy nothing and only hold memory.
SIDE_BY_SIDE_ENTRIES = 1 << 17


def _side_by_side(row_lists: list, x0: torch.Tensor, history: int, den, batch: Batch, hist=(), first_d=None,
                  record: list | None = None, outs: list | None = None) -> list[torch.Tensor]:
    """The rows of several plans of one shape (``row_lists[i][e]``: a, p, c, q, σ, s, guidance; g = 0) from the same
    noise ``batch``, one network call per row on all of them: every plan's coefficients and σ per sample.

    ``x0``: each plan's initial state [m, n, …], or one [n, …] for all. To resume runs part-way (the learned
    plan's Jacobian, ``_perturbed_endpoints``): ``hist``, the history entries [n, …] of the rows before, shared by
    all plans; ``first_d``, the network's output at the first row [n, …] where it is the same for all (its input
    is: it is not evaluated again). ``record`` / ``outs`` (one plan): get ``run_rows``'s (x, history) before every
    row / the network's output of every row."""
    z = batch.z
    n = z.shape[0]
    per_call = max(1, SIDE_BY_SIDE_ENTRIES // max(1, z[0].numel() * n))
    if len(row_lists) > per_call:
        out = []
        for i in range(0, len(row_lists), per_call):
            xi = x0 if x0.ndim == z.ndim else x0[i:i + per_call]
            out += _side_by_side(row_lists[i:i + per_call], xi, history, den, batch, hist, first_d)
        return out
    m = len(row_lists)
    bshape = (m * n,) + (1,) * (z.ndim - 1)
    rep = (m,) + (1,) * (z.ndim - 1)

    def col(vals):  # one value per plan → one per sample, broadcasting over the sample's entries
        return torch.tensor(vals, dtype=torch.float64).repeat_interleave(n)

    rows = []
    for e, r in enumerate(row_lists[0]):
        prs = [rl[e] for rl in row_lists]
        rows.append(SimpleNamespace(
            sigma=col([float(q.sigma) for q in prs]), a=_Free(col([q.a for q in prs]).reshape(bshape)),
            p=tuple(_Free(col([q.p[k] for q in prs]).reshape(bshape)) for k in range(len(r.p))),
            c=_Free(col([q.c for q in prs]).reshape(bshape)),
            q=tuple(_Free(col([q.q[k] for q in prs]).reshape(bshape)) for k in range(len(r.q))),
            s=r.s, g=0.0, guidance=r.guidance))
    # by index, not .repeat: a pipeline's conditioning is a NamedCond, which indexes every tensor along the batch
    cond = None if batch.cond is None else batch.cond[torch.arange(m * n) % n]
    view = SimpleNamespace(rows=rows, history=history)

    def evaluate(e, row, u):
        if e == 0 and first_d is not None:
            return first_d.repeat(rep)
        w = row.guidance if row.guidance is not None else batch.guidance
        with torch.no_grad():
            d = call_denoiser(den, u.to(batch.dtype), row.sigma.to(batch.dtype), cond, w).to(torch.float64)
        if outs is not None:
            outs.append(d)
        return d

    start = x0.repeat(rep) if x0.ndim == z.ndim else x0.reshape((m * n,) + tuple(z.shape[1:]))
    x = run_rows(view, start.to(torch.float64), evaluate, hist=[h.repeat(rep) for h in hist], record=record)
    return list(x.split(n))


def _perturbed_endpoints(params: _Params, vecs: torch.Tensor, den, batch: Batch, base=None):
    """Endpoints [m, n, …] of the plans at ``vecs[0]`` (the base point) and ``vecs[1:]`` (small perturbations of it,
    the Jacobian's columns). A perturbed plan reruns only what its change reaches: from the first row whose σ or
    coefficients differ from the base's, from the base run's state there, and without that row's network call
    where only its c / q differ (the network's input is the base's). A row-e coefficient thus costs E − e calls
    (or E − e − 1) instead of E: about half the Jacobian's network calls (2 NFE: 8 of 20 for DPM-Solver++(2M)).
    Returns (endpoints, the base run); pass that back as ``base`` for more perturbations of the same ``vecs[0]``
    on the same ``batch`` (it is not run again)."""
    hist_k = max(params.k, 1)
    if base is None:
        rec, outs, rows0 = [], [], params.rows(False, at=vecs[0])
        xb = _side_by_side([rows0], params.init.sigma_init * batch.z, hist_k, den, batch, record=rec, outs=outs)[0]
        base = (rows0, rec, outs, xb)
    rows0, rec, outs, xb = base
    res = [None] * len(vecs)
    res[0] = xb
    groups: dict = {}
    for i in range(1, len(vecs)):
        rows = params.rows(False, at=vecs[i])
        f = next((e for e, (r, b) in enumerate(zip(rows, rows0))
                  if (r.sigma, r.a, r.p, r.c, r.q) != (b.sigma, b.a, b.p, b.c, b.q)), None)
        if f is None:
            res[i] = xb
            continue
        same_in = (rows[f].sigma, rows[f].a, rows[f].p) == (rows0[f].sigma, rows0[f].a, rows0[f].p)
        groups.setdefault((f, same_in), []).append((i, rows[f:]))
    for (f, same_in), items in groups.items():
        x0, hist = rec[f]
        outs_f = _side_by_side([r for _, r in items], x0, hist_k, den, batch, hist,
                               first_d=outs[f] if same_in else None)
        for (i, _), x in zip(items, outs_f):
            res[i] = x
    return torch.stack(res), base


def _split(b: Batch, sl: slice) -> Batch:
    return Batch(b.z[sl], None if b.cond is None else b.cond[sl], b.guidance, b.dtype)


def fit_learned(teacher, solver: str, nfe: int, cfg: LearnConfig = LearnConfig(), init: Plan | None = None,
                init_method: str = "fast", batch: int = 100, heldout: int = 50, cls: int | None = None,
                guidance: float | None = None, seed: int = 0, schedule: str | None = None,
                progress: Callable[[str], None] | None = None, **fit_kw) -> Plan:
    """Learn ``solver`` at ``nfe`` on ``teacher``: start (``init_method``: "fast" = ``fast_init``, or a closed-form
    fit method; or the plan ``init``) on the first ``batch`` samples of seed ``seed``, then ``learn`` with the next
    ``heldout`` samples held out. The result is never worse than that start on the held-out samples.
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
    init_info = None
    if init is None and init_method == "fast":
        say("fast init: heuristic grid + D-ODE")
        init, init_info = fast_init(fam, nfe, den, train, ref, guidance, schedule)
        init_source = "fast"
    elif init is None:
        say(f"closed-form init: {init_method}")
        cache = {(teacher.content_hash, batch, seed, cls, guidance, base.sigma_init): (train, ref)}
        init = fit(teacher, FitConfig(fam, nfe, init_method, batch=batch, cls=cls, guidance=guidance, seed=seed,
                                      schedule=schedule, **fit_kw), progress=progress, cache=cache)
        init_source = init_method
    else:
        init_source = "given"
    init_seconds = time.perf_counter() - t_init
    # The fast init is part of the fit, so the budget counts from the fit's start; a closed-form or given start
    # was paid for separately, and the budget counts from the optimisation's start (``learn``).
    deadline = t0 + cfg.budget if cfg.budget is not None and init_source == "fast" else None
    plan, info = learn(init, den, train, ref, held, held_ref, cfg, say=say, seed=seed,
                       family=fam if cfg.couple else None, deadline=deadline)
    prov = dict(init.provenance)
    prov.update({
        "fitted": True, "method": "learned", "init_method": init_source, "init_seconds": round(init_seconds, 3),
        "init_fit_seconds": init.provenance.get("fit_seconds"), "init_plan_method": init.provenance.get("method"),
        "base_solver": fam, "teacher": teacher.name,
        "teacher_hash": teacher.content_hash, "batch": batch, "heldout": heldout, "seed": seed,
        "guidance": guidance, "class": cls, "fewstep_version": fewstep.__version__,
        "init_info": init_info, "fit_seconds": round(time.perf_counter() - t0, 3), **info,
    })
    tag = "learned" if cfg.loss == "l2" else f"learned-{cfg.loss}"
    return plan.replace(name=f"{fam}-{nfe}-{tag}", provenance=prov)
