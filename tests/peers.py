"""Shared fixtures for peer comparisons: the exact GMM teacher seen as a VP ε-model.

diffusers' schedulers step a raw network ``eps(x_t, t)`` in VP space with integer
timesteps; fewstep's executor calls the same network through ``VPEpsDenoiser``. Both see
one function, so any difference is the solver's.
"""

from __future__ import annotations

import torch
from torch import nn

from fewstep.runtime.denoisers import VPEpsDenoiser
from fewstep.runtime.gmm import GMM

F64_U = 2.0**-53  # unit roundoff of float64
F32_U = 2.0**-24  # unit roundoff of float32


def rounding_bound(u: float, calls: int, sigma_last: float, z_size: float, out_size: float, ops: int = 32) -> float:
    """Relative difference two orderings of one sampler's algebra can reach through rounding alone.

    Each model call and its update round ≤ ops = 32 times (GMM posterior ~15, VP↔VE and ε↔D ~6,
    the multistep update ≤ 10) on values of size ≤ |z| — a state σ·|z| large at high σ, but the denoiser's
    Jacobian Cov[x0|x]/σ² damps what it carries by the same σ, so later steps pass it on with gain ≤ 1.
    The last call's D is read undamped: pulling it out of a state of size σ_last·|z| cancels
    max(1, σ_last)·|z| down to |out|. Safety factor 4 (errors of one sign, norm vs per element).
    """
    return 4 * ops * u * calls * max(1.0, sigma_last) * z_size / out_size


def linear_alphas_cumprod(n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """DDPM's linear β table (diffusers' beta_schedule="linear"), float64."""
    betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


class VPGMMEps(nn.Module):
    """ε̂(x_t, t) of the exact GMM under x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·n, for any real t."""

    def __init__(self, gmm: GMM, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.gmm = gmm
        self.table = VPEpsDenoiser(None, alphas_cumprod)  # only for its t → σ map

    def forward(self, x_t, t, cond=None):
        t = torch.as_tensor(t, dtype=torch.float64).reshape(-1).expand(x_t.shape[0])
        sigma = self.table.t_to_sigma(t)
        s = sigma.reshape(-1, *([1] * (x_t.ndim - 1)))
        x = x_t.to(torch.float64) * (1 + s**2).sqrt()  # VP → VE state
        d = self.gmm(x, sigma, cond)
        return ((x - d) / s).to(x_t.dtype)


def vp_gmm(gmm: GMM | None = None, alphas_cumprod: torch.Tensor | None = None):
    """(raw ε-model for diffusers, the same model as a fewstep denoiser)."""
    gmm = gmm or GMM.default()
    ac = linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    raw = VPGMMEps(gmm, ac)
    return raw, VPEpsDenoiser(raw, ac)
