"""UniPC bh2, order 2 (Zhao et al. 2023), as diffusers' UniPCMultistepScheduler(predict_x0=True, solver_type="bh2").

Data-prediction form in VE terms, with λ = −log σ and r = σ_t/σ_s (the DDIM ratio):

    UniP-p:  x_t = r·x_s + (1 − r)·D_s − (r − 1)·Σ_k ρ^p_k·(D_k − D_s)/r_k          (ρ^p = ½ at p = 2)
    UniC-p:  x_t ← r·x_s + (1 − r)·D_s − (r − 1)·(Σ_k ρ^c_k·(D_k − D_s)/r_k + ρ^c_p·(D_t − D_s))

with r_k = (λ_k − λ_s)/h and B(h) = e^{−h} − 1 = r − 1 (bh2). The corrector at σ_t uses D_t,
the evaluation the next predictor needs anyway, so UniC costs no extra NFE; the network is
evaluated at the *predicted* point and the corrected state only feeds the next predictor.
diffusers' conventions, kept: warm start (first step order 1), lower_order_final (the last
step, to σ = 0, is order 1 and returns D at the last predicted point), disable_corrector = []
(every evaluated step after the first is corrected; the final state is never evaluated, so
never corrected), final_sigmas_type = "zero".
"""

from __future__ import annotations

import math

import numpy as np

from ..plan import Plan
from .trace import Trace


def _b(hh: float, order: int) -> np.ndarray:
    """UniPC's b_k = k!·φ_{k+1}(hh)/B(h) for k = 1..order (hh = −h, B(h) = e^{hh} − 1)."""
    b_h = math.expm1(hh)
    phi, fact, out = math.expm1(hh) / hh - 1.0, 1.0, []
    for k in range(1, order + 1):
        out.append(phi * fact / b_h)
        fact *= k + 1
        phi = phi / hh - 1.0 / fact
    return np.array(out)


def unipc_bh2(sigmas) -> Plan:
    """UniPC-2, B(h) = expm1 "bh2" (Zhao et al. 2023): UniP-2 predictor, UniC-2 corrector, as diffusers."""
    tr = Trace(sigmas[0])
    x = tr.x
    n = len(sigmas) - 1
    lam = [-math.log(s) if s > 0 else math.inf for s in sigmas]
    ds, x_last, order_last = [], None, 0  # past D's; the corrected state and order of the last predictor
    for i in range(n):
        d = tr.eval(x, sigmas[i])
        if i > 0:  # UniC: correct the state we just evaluated, with D at it
            p, s_t, s_s = order_last, sigmas[i], sigmas[i - 1]
            h, r = lam[i] - lam[i - 1], s_t / s_s
            m0 = ds[-1]
            if p == 1:
                corr = 0.5 * (d - m0)
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                rho = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), _b(-h, 2))
                corr = rho[0] * (ds[-2] - m0) / rk + rho[1] * (d - m0)
            x = r * x_last + (1 - r) * m0 - (r - 1) * corr
        ds = (ds + [d])[-2:]
        order = min(2, i + 1, n - i)  # warm start; lower_order_final
        r = sigmas[i + 1] / sigmas[i]
        x_new = r * x + (1 - r) * d
        if order == 2:
            rk = (lam[i - 1] - lam[i]) / (lam[i + 1] - lam[i])
            x_new = x_new - (r - 1) * 0.5 * (ds[-2] - d) / rk
        x_last, order_last = x, order
        x = tr.update(x_new)
    return tr.plan("unipc")
