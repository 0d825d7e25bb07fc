"""D-ODE (Kim, Tang & Yu, CVPR 2024): one fitted λ per network evaluation, as a Plan transformation.

The fitted run is ``x_{i+1} = Solver(x_i, …) + λ_e·(out_e − out_{e−1})`` (METHODS.md), where
``out`` is the model output in the form the method uses:

- data form: out_e = D_e (the paper's choice for data-prediction solvers: DDIM-x0, EDM, DPM-Solver++);
- noise form: out_e = ε_e = (U_e − D_e)/σ_e (DDIM-ε, iPNDM, DEIS); by default a plan's rows pick
  the form they keep in their history (s = 1 rows are written on ε, s = 0 rows on D).

out_{−1} is the initial state x_T (z in the noise form), as in the public code. The additive form
and "replace out_e by (1+λ')out_e − λ'out_{e−1}" span the same correction direction, so they fit
the same x_{i+1}; only λ's scale differs (λ = λ'·(the weight the solver gives out_e)).

Mapped onto Plan rows (``fitcore.to_plan`` does the algebra):
- data form, s = 0 rows: q_0 += λ, q_1 −= λ (DESIGN §2's D-DDIM row);
- noise form: ε_e and ε_{e−1} are rewritten through U = a·x + Σ p·h and the previous state, which
  changes c and the q's of the row;
- a predictor row (its update leaves x alone and the next row evaluates at a·x + p·h_e, EDM-Heun's
  Euler probe) puts its λ on the *next row's evaluation point* (its a and p): D-EDM's 2N−1 λ's.

Teacher: the same family with ``factor``× the steps on ``fitcore.subdivide(grid, factor)``, which
contains the student's σ's exactly; targets are its states at the student's grid points. The fit is
greedy along the student's own corrected run, λ_e = Σ_B⟨Δ_e, r_e⟩ / Σ_B⟨Δ_e, Δ_e⟩ in float64,
r_e = target − (the uncorrected quantity).
"""

from __future__ import annotations

from ..runtime.plan import Plan
from ..runtime.solvers import get
from .fitcore import Batch, FitError, Slot, grid_of, lstsq, run, steps_of, subdivide, to_plan


def _diff_data(v, e):
    return v.D(e) - v.D(e - 1)


def _diff_eps(v, e):
    return v.eps(e) - v.eps(e - 1)


def slots_for(plan: Plan, form: str | None = None) -> list[Slot]:
    """One slot per evaluation: on the state update, or on the next evaluation point for a predictor."""
    slots = []
    for i, rows in enumerate(steps_of(plan)):
        for e in rows:
            f = form or ("eps" if plan.rows[e].s != 0.0 else "data")
            feat = {"data": _diff_data, "eps": _diff_eps}.get(f)
            if feat is None:
                raise FitError(f"D-ODE form must be 'data' or 'eps', got {f!r}")
            where, row = ("x", e) if e == rows[-1] else ("u", e + 1)
            slots.append(Slot(where, row, e, [feat], i + 1, names=[f"lambda_{e}"]))
    return slots


def teacher_states(plan: Plan, solver: str, den, batch: Batch, factor: int):
    """States of the ``factor``× teacher at the student's step grid (index 0 = the start)."""
    fine = subdivide(grid_of(plan), factor)
    teacher = get(solver).build(fine)
    _, _, states = run(teacher, den, batch, record=True)
    return states[::factor], teacher.nfe


def fit_dode(plan: Plan, solver: str, den, batch: Batch, factor: int = 10, form: str | None = None,
             targets=None):
    """Greedy closed-form λ's; returns (fitted plan, info; info["slots"]: the fitted slots). ``targets`` (the
    states at the step grid,
    index 0 = start) replaces the teacher run (tests pass exact flows)."""
    teacher_nfe = None
    if targets is None:
        targets, teacher_nfe = teacher_states(plan, solver, den, batch, factor)
    slots = slots_for(plan, form)

    def fit_slot(slot, q0, feats, v):
        return lstsq(feats, targets[slot.target] - q0)

    run(plan, den, batch, slots, fit_slot)
    fitted = to_plan(plan, slots)
    forms = sorted({("eps" if plan.rows[s.anchor].s != 0.0 else "data") if form is None else form for s in slots})
    return fitted, {"slots": slots, "dode_form": "+".join(forms), "teacher_nfe": teacher_nfe,
                    "fine_factor": factor,
                    "lambdas": [float(s.phi[0]) for s in slots]}
