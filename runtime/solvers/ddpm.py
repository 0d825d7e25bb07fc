"""DDPM ancestral sampling (Ho et al. 2020) on an arbitrary σ grid, in VE space."""

from __future__ import annotations

import math

from ..plan import Plan
from .trace import Trace


def ddpm(sigmas) -> Plan:
    """DDPM ancestral sampling (Ho et al. 2020, eq. 6–7): x' ~ q(x_{t−1} | x_t, x̂0), σ_t → σ_{t−1}.

    With ᾱ = 1/(1+σ²) and x_VE = x_VP/√ᾱ, the VP posterior mean
    √ᾱ'β/(1−ᾱ)·x̂0 + √α(1−ᾱ')/(1−ᾱ)·x_t and variance β̃ = (1−ᾱ')/(1−ᾱ)·β (β = 1 − ᾱ/ᾱ')
    become, in VE, x' = (σ'²/σ²)·x + (1 − σ'²/σ²)·D + σ'·√(1 − σ'²/σ²)·ε: Euler to
    σ'²/σ, then fresh noise back up to σ' (k-diffusion's ancestral step with η = 1).
    The step to σ' = 0 is x' = D with no noise.
    """
    tr = Trace(sigmas[0])
    x = tr.x
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = tr.eval(x, s)
        c = (s_next / s) ** 2
        x = tr.update(c * x + (1 - c) * d, noise=s_next * math.sqrt(1 - c))
    return tr.plan("ddpm")
