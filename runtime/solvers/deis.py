"""DEIS tAB (Zhang & Chen 2022) in its log-ρ form, as diffusers' DEISMultistepScheduler(algorithm_type="deis").

In VE terms dx/dρ = ε (ρ = σ), and DEIS integrates the Lagrange polynomial through the last
``order`` noise predictions, taken as a polynomial in log ρ:

    x_{i+1} = x_i + Σ_j C_ij·ε_{i−j},   C_ij = ∫_{ρ_i}^{ρ_{i+1}} ℓ_j(log ρ) dρ,

which is exact in closed form: ∫ P(L)·e^L dL = e^L·Σ_k (−1)^k P^(k)(L). Order 1 is DDIM.
"""

from __future__ import annotations

import math

from numpy.polynomial import Polynomial

from ..plan import Plan
from .trace import Lin, Trace


def _integral(nodes: list[float], j: int, rho_a: float, rho_b: float) -> float:
    """∫_{ρ_a}^{ρ_b} ℓ_j(log ρ) dρ for the Lagrange basis ℓ_j on the nodes log ρ_k."""
    others = [v for k, v in enumerate(nodes) if k != j]
    poly = Polynomial.fromroots(others) / math.prod(nodes[j] - v for v in others) if others else Polynomial([1.0])

    def antiderivative(rho: float) -> float:
        if rho == 0.0:
            return 0.0  # ρ·(log ρ)^k → 0: the step to σ = 0 is a proper integral
        lg, total, sign, p = math.log(rho), 0.0, 1.0, poly
        for _ in range(len(nodes)):
            total += sign * p(lg)
            p, sign = p.deriv(), -sign
        return rho * total

    return antiderivative(rho_b) - antiderivative(rho_a)


def _deis(sigmas, order: int, name: str) -> Plan:
    tr = Trace(sigmas[0])
    x = tr.x
    n = len(sigmas) - 1
    eps: list[Lin] = []
    for i in range(n):
        d = tr.eval(x, sigmas[i], s=1.0)
        eps = (eps + [(x - d) / sigmas[i]])[-order:]
        # Warm start (order ≤ i + 1) and diffusers' lower_order_final: the last step is first order (the
        # step to σ = 0 returns D) and the one before at most second order. diffusers lowers only below 15
        # steps; fewstep always does, since its grids end at σ = 0 where diffusers' stops at σ(t = 0) > 0.
        k = min(order, i + 1, n - i)
        nodes = [math.log(sigmas[i - j]) for j in range(k)]
        step = Lin()
        for j in range(k):
            step = step + _integral(nodes, j, sigmas[i], sigmas[i + 1]) * eps[-1 - j]
        x = tr.update(x + step)
    return tr.plan(name)


def deis_2(sigmas) -> Plan:
    """DEIS tAB2 (Zhang & Chen 2022), log-ρ Lagrange basis, as diffusers (solver_order=2)."""
    return _deis(sigmas, 2, "deis-2")


def deis_3(sigmas) -> Plan:
    """DEIS tAB3 (Zhang & Chen 2022), log-ρ Lagrange basis, as diffusers (solver_order=3)."""
    return _deis(sigmas, 3, "deis-3")
