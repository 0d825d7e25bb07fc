"""iPNDM (Zhang & Chen 2022) and PLMS (Liu et al. 2022): Adams–Bashforth on dx/dσ = ε in σ space.

Both are written on past noise predictions ε_j = (x_j − D_j)/σ_j, so every evaluation keeps
h = D − u = −σ·ε̂ in the history (``s = 1``, see runtime/plan.py): each step is then x plus
a fixed combination of the last ≤ 4 history entries.
"""

from __future__ import annotations

from ..plan import Plan
from .errors import SolverError
from .trace import Lin, Trace

# Adams–Bashforth weights on ε_i, ε_{i−1}, … for equal steps (orders 1–4). Both methods apply them
# on any σ grid as published: the grid's step ratio is ignored (that is what iPNDM's "v" variant fixes).
_AB = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _ab(eps: list[Lin]) -> Lin:
    """The AB combination of the last len(eps) ≤ 4 noise predictions (newest last)."""
    out = Lin()
    for w, e in zip(_AB[len(eps)], reversed(eps)):
        out = out + w * e
    return out


def ipndm(sigmas) -> Plan:
    """iPNDM (Zhang & Chen 2022), as k-diffusion's (ComfyUI's) sample_ipndm: AB4 with an AB1–3 warm start."""
    tr = Trace(sigmas[0])
    x = tr.x
    eps: list[Lin] = []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = tr.eval(x, s, s=1.0)
        eps = (eps + [(x - d) / s])[-4:]
        # The step to σ = 0 returns D itself (sample_ipndm's "denoising step"), as every fewstep grid ends.
        x = tr.update(d if s_next == 0 else x + (s_next - s) * _ab(eps))
    return tr.plan("ipndm")


def plms(sigmas) -> Plan:
    """PLMS (Liu et al. 2022, PNDM), exactly as diffusers' PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=True).

    PNDM's transfer ``_get_prev_sample`` is the DDIM step, which in VE terms is
    x ← x + (σ_{i+1} − σ_i)·ε. The first step is taken twice: an Euler probe to σ_1, then a
    re-evaluation there and a restart from x_0 with the mean of both ε's (a Heun step); then AB2,
    AB3 and AB4 on the ε's at the grid points, up to and including the step to σ = 0. So n ≥ 2
    steps cost n + 1 evaluations; n = 1 is one Euler step to σ = 0 (= D), one evaluation.
    """
    tr = Trace(sigmas[0])
    x = tr.x
    n = len(sigmas) - 1
    eps: list[Lin] = []
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = tr.eval(x, s, s=1.0)
        eps = (eps + [(x - d) / s])[-4:]
        if i == 0 and n > 1:
            x0 = x
            probe = tr.update(x0 + (s_next - s) * eps[0])
            d1 = tr.eval(probe, s_next, s=1.0)  # this ε is used for the restart only, never kept
            x = tr.update(x0 + (s_next - s) * 0.5 * (eps[0] + (probe - d1) / s_next))
        else:
            x = tr.update(x + (s_next - s) * _ab(eps))
    return tr.plan("plms")


def plms_steps(nfe: int) -> int:
    """σ-grid steps n for ``nfe`` PLMS evaluations: n = 1 costs 1, n ≥ 2 cost n + 1 (the re-evaluated first step)."""
    if nfe < 1:
        raise SolverError(f"plms: NFE must be ≥ 1, got {nfe}")
    if nfe == 1:
        return 1
    if nfe == 2:
        raise SolverError(
            "plms: NFE 2 is unreachable: the first of n ≥ 2 steps is evaluated twice (n steps cost n + 1 "
            "evaluations) and a single step costs 1; try 1 or 3"
        )
    return nfe - 1
