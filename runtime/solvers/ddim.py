"""DDIM = Euler in σ space (Song et al. 2021; Karras et al. 2022, Alg. 1 without the corrector)."""

from __future__ import annotations

from ..plan import Plan
from .trace import Trace


def ddim(sigmas) -> Plan:
    """x ← x + (σ_{i+1} − σ_i)·(x − D)/σ_i, i.e. a = 1, c = σ_{i+1}/σ_i, q_0 = 1 − c."""
    tr = Trace(sigmas[0])
    x = tr.x
    for i in range(len(sigmas) - 1):
        d = tr.eval(x, sigmas[i])
        x = tr.update(x + (sigmas[i + 1] - sigmas[i]) * (x - d) / sigmas[i])
    return tr.plan("ddim")
