"""Solvers as Plan builders.

Each builder is a plain function ``builder(sigmas) -> Plan`` over a σ grid
σ_0 > … > σ_n = 0 (see ``fewstep.runtime.schedules``), written on the symbolic state of
``trace.Trace``. ``build(name, nfe, ...)`` picks the grid that gives exactly ``nfe``
network evaluations. Nothing downstream of the Plan knows these names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import schedules as _schedules
from ..plan import MAX_ROWS, Plan
from .errors import SolverError


@dataclass(frozen=True)
class Solver:
    name: str
    build: Callable[[np.ndarray], Plan]  # σ grid (n + 1 values, ends in 0) → Plan
    steps_for_nfe: Callable[[int], int]  # NFE → n; raises SolverError when NFE is unreachable
    stochastic: bool = False
    schedule: str = "edm"  # default σ schedule
    summary: str = ""
    # `fewstep fit` (D-ODE, IIA, timesteps) can fit it: deterministic, one state update per σ-grid step. Not PLMS
    # (n + 1 evaluations on n steps: its first step is evaluated twice) nor DDPM (stochastic).
    fittable: bool = False


def _same(nfe: int) -> int:
    return nfe


def _heun_steps(nfe: int) -> int:
    # n Heun steps cost 2n − 1 evaluations: the last step (to σ = 0) is a plain Euler step.
    if nfe % 2 == 0:
        raise SolverError(f"heun: NFE must be odd (n steps cost 2n − 1 evaluations); got {nfe}, "
                          f"try {nfe - 1} or {nfe + 1}")
    return (nfe + 1) // 2


def _registry() -> dict[str, Solver]:
    from . import ddim, ddpm, deis, dpmpp, heun, ipndm, unipc

    solvers = [
        Solver("ddim", ddim.ddim, _same, fittable=True, summary="DDIM = Euler in σ space (Song et al. 2021)"),
        Solver("heun", heun.heun, _heun_steps, fittable=True, summary="EDM Heun (Karras et al. 2022), 2n−1 NFE"),
        Solver("dpmpp-2m", dpmpp.dpmpp_2m, _same, fittable=True, summary="DPM-Solver++(2M) (Lu et al. 2022)"),
        Solver("dpmpp-3m", dpmpp.dpmpp_3m, _same, fittable=True,
               summary="DPM-Solver++(3M) (Lu et al. 2022), as published: order 2"),
        Solver("dpmpp-3m-taylor", dpmpp.dpmpp_3m_taylor, _same, fittable=True,
               summary="DPM-Solver++(3M) with the Taylor-consistent second difference: order 3"),
        Solver("ipndm", ipndm.ipndm, _same, fittable=True,
               summary="iPNDM, 4th-order Adams–Bashforth on ε (Zhang & Chen 2022)"),
        Solver("plms", ipndm.plms, ipndm.plms_steps, summary="PLMS as in diffusers' PNDMScheduler (skip_prk_steps)"),
        Solver("deis-2", deis.deis_2, _same, fittable=True, summary="DEIS tAB order 2 (Zhang & Chen 2022)"),
        Solver("deis-3", deis.deis_3, _same, fittable=True, summary="DEIS tAB order 3 (Zhang & Chen 2022)"),
        Solver("unipc", unipc.unipc_bh2, _same, fittable=True, summary="UniPC bh2, order 2 (Zhao et al. 2023)"),
        Solver("ddpm", ddpm.ddpm, _same, stochastic=True, summary="DDPM ancestral sampling (Ho et al. 2020)"),
    ]
    return {s.name: s for s in solvers}


_SOLVERS: dict[str, Solver] | None = None
# Names users arrive with: k-diffusion's sampler names (sample_euler, dpmpp_2m, …) and diffusers'
# scheduler classes, each mapped to the fewstep solver whose plan its peer test checks it against
# (tests/test_solvers_a.py, test_solvers_b.py). Keys are canonical: lower case, '_' → '-', no
# "sample-" prefix (see _canonical). Schedulers whose default update differs (e.g. diffusers'
# DEIS is order 3, UniPC bh2 with predict_x0) map to the matching fewstep variant.
ALIASES = {
    "euler": "ddim", "dpm++2m": "dpmpp-2m", "dpm++3m": "dpmpp-3m", "edm": "heun", "ancestral": "ddpm",
    # k-diffusion
    "deis": "deis-3",  # ComfyUI's k-diffusion sample_deis: tAB, max_order 3 (k-diffusion's lms is not PLMS)
    # diffusers
    "ddimscheduler": "ddim", "eulerdiscretescheduler": "ddim", "heundiscretescheduler": "heun",
    "dpmsolvermultistepscheduler": "dpmpp-2m", "unipcmultistepscheduler": "unipc",
    "deismultistepscheduler": "deis-3", "ipndmscheduler": "ipndm", "ddpmscheduler": "ddpm",
    "pndmscheduler": "plms",  # PNDM with skip_prk_steps, as Stable Diffusion's configs set it
}


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-")
    return key.removeprefix("sample-")


def solvers() -> dict[str, Solver]:
    global _SOLVERS
    if _SOLVERS is None:
        _SOLVERS = _registry()
    return _SOLVERS


def get(name: str) -> Solver:
    table = solvers()
    if name in table:
        return table[name]
    key = _canonical(name)
    key = ALIASES.get(key, key)
    if key not in table:
        raise SolverError(f"unknown solver {name!r}; choose one of {', '.join(sorted(table))} "
                          f"(or a k-diffusion / diffusers name: `fewstep solvers`)")
    return table[key]


def fittable() -> list[str]:
    """The solvers `fewstep fit` accepts, in registry order."""
    return [name for name, s in solvers().items() if s.fittable]


def aliases_of(name: str) -> list[str]:
    """The other names ``get`` accepts for solver ``name``."""
    return sorted(k for k, v in ALIASES.items() if v == name and k != name)


def build(
    name: str,
    nfe: int,
    sigma_min: float,
    sigma_max: float,
    schedule: str | None = None,
    sigmas=None,
) -> Plan:
    """The Plan of solver ``name`` at exactly ``nfe`` evaluations.

    ``sigmas`` (an explicit grid, 0 appended if missing) overrides ``schedule``.
    """
    solver = get(name)
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
        raise SolverError(f"NFE must be an integer ≥ 1, got {nfe!r}")
    if nfe > MAX_ROWS:
        raise SolverError(f"NFE {nfe}: at most {MAX_ROWS} (a plan's row limit; fewstep is for 1–10 evaluations)")
    n = solver.steps_for_nfe(int(nfe))
    if sigmas is not None:
        grid = _schedules.explicit(sigmas)
        if len(grid) != n + 1:
            raise SolverError(f"{solver.name}: NFE {nfe} needs {n} steps ({n + 1} σ's incl. 0), got {len(grid)}")
    else:
        grid = _schedules.make(schedule or solver.schedule, n, sigma_min, sigma_max)
    plan = solver.build(grid)
    if plan.nfe != nfe:
        raise SolverError(f"{solver.name}: built {plan.nfe} evaluations for NFE {nfe}")
    prov = {"base_solver": solver.name, "schedule": "explicit" if sigmas is not None else (schedule or solver.schedule),
            "nfe": int(nfe), **plan.provenance}
    return plan.replace(name=f"{solver.name}-{nfe}", provenance=prov)
