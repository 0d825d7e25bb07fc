"""DPM-Solver++ multistep, data-prediction form (Lu et al. 2022, arXiv:2211.01095).

In EDM / VE space α = 1 and λ = −log σ, so a step σ → σ' of length h = log(σ/σ') is
``x' = (σ'/σ)·x + φ₁·(D + corrections)`` with φ₁ = 1 − e^{−h}. Order schedule, as in
diffusers' DPMSolverMultistepScheduler (dpmsolver++, final_sigmas_type="zero",
lower_order_final=True), which the peer tests reproduce to float64 round-off:

- the first step is first order (no history), 3M's second step is second order;
- the step to σ = 0 is the h = ∞ limit, x' = D (every φ-correction needs a finite h);
- 3M on grids of fewer than 15 steps takes the step into the last σ > 0 at second order
  (diffusers' lower_order_final, for stability at few steps). One lower-order step among n
  changes the global error by O(h³) only, so the method stays third order.
- 3M's second-order steps are the 2M step (diffusers' default solver_type="midpoint");
  k-diffusion's sample_dpmpp_3m_sde uses the φ₂ form there (solver_type="heun"), which
  differs by O(h³) in that one step.

3M as everyone implements it (the authors' dpm_solver, diffusers, k-diffusion) is only
second order: its D2 = (D1_0 − D1_1)/(r0 + r1) estimates h²·x̂0''/2 while the φ₃ weight
belongs to h²·x̂0'' (small-h limit: h·[D + Δ/2 + Δ²/3] where Adams–Bashforth 3 has 5Δ²/12).
``dpmpp_3m`` keeps that formula, since published DPM-Solver++(3M) numbers come from it;
``dpmpp_3m_taylor`` doubles D2 and is third order (tests/test_solvers_a.py measures both).
"""

from __future__ import annotations

import math

from ..plan import Plan
from .trace import Trace


def dpmpp_2m(sigmas) -> Plan:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2)."""
    return _dpmpp(sigmas, 2, "dpmpp-2m")


def dpmpp_3m(sigmas) -> Plan:
    """DPM-Solver++(3M) (Lu et al. 2022) as in diffusers and k-diffusion (η = 0); second order, see above."""
    return _dpmpp(sigmas, 3, "dpmpp-3m")


def dpmpp_3m_taylor(sigmas) -> Plan:
    """DPM-Solver++(3M) with the second derivative term of the Taylor expansion (third order)."""
    return _dpmpp(sigmas, 3, "dpmpp-3m-taylor", d2_scale=2.0)


def _dpmpp(sigmas, order: int, name: str, d2_scale: float = 1.0) -> Plan:
    n = len(sigmas) - 1
    tr = Trace(sigmas[0])
    x = tr.x
    d_prev, h_prev = [], []  # past denoiser outputs and λ-step lengths, newest last
    for i in range(n):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = tr.eval(x, s)
        if s_next == 0.0:  # h = ∞: σ'/σ = 0, φ₁ = 1 and every correction vanishes
            x = tr.update(d)
            continue
        h = math.log(s / s_next)
        phi1 = -math.expm1(-h)
        k = min(order, len(d_prev) + 1)  # the order the history allows
        if order == 3 and n < 15 and i == n - 2:  # diffusers' lower_order_final
            k = min(k, 2)
        x_next = (s_next / s) * x + phi1 * d
        if k == 2:
            r = h_prev[-1] / h
            x_next = x_next + (phi1 / (2 * r)) * (d - d_prev[-1])
        elif k == 3:
            r0, r1 = h_prev[-1] / h, h_prev[-2] / h
            d1_0 = (d - d_prev[-1]) / r0
            d1_1 = (d_prev[-1] - d_prev[-2]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = d2_scale * (d1_0 - d1_1) / (r0 + r1)
            phi2 = 1 - phi1 / h
            phi3 = (h - phi1) / h**2 - 0.5
            x_next = x_next + phi2 * d1 - phi3 * d2
        x = tr.update(x_next)
        d_prev, h_prev = (d_prev + [d])[-2:], (h_prev + [h])[-2:]
    return tr.plan(name)
