"""EDM Heun (Karras et al. 2022, Alg. 1, deterministic): 2n − 1 evaluations."""

from __future__ import annotations

from ..plan import Plan
from .trace import Trace


def heun(sigmas) -> Plan:
    tr = Trace(sigmas[0])
    x = tr.x
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = tr.eval(x, s)
        slope = (x - d) / s
        x_euler = x + (s_next - s) * slope
        if s_next == 0:  # the last step is Euler: the corrector would evaluate at σ = 0
            x = tr.update(x_euler)
            continue
        d2 = tr.eval(x_euler, s_next)
        x = tr.update(x + (s_next - s) * 0.5 * (slope + (x_euler - d2) / s_next))
    return tr.plan("heun")
