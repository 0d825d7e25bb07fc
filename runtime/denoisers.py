"""Denoiser adapters: every model is seen as D(x; σ, cond) ≈ E[x0 | x_σ] in EDM space.

In the style of k-diffusion's ``external.py`` and EDM's ``*Precond``: a subclass supplies
``get_scalings(σ) → (c_skip, c_out, c_in)`` and ``sigma_to_t``; the wrapped network sees
``F(c_in·x, t(σ), cond)`` and ``D = c_skip·x + c_out·F``. Scalings are computed in float64
and cast to the network's dtype at the end (σ maths never runs in fp16).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class Denoiser(nn.Module):
    """Base adapter. ``model(x_in, t, cond)`` is the raw network.

    ``null_cond(cond)`` gives the unconditional input for classifier-free guidance;
    guidance follows diffusers: ``D_u + w·(D_c − D_u)``, w = 1 is plain conditional.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self.model = model

    # --- hooks -------------------------------------------------------------------------
    def get_scalings(self, sigma: torch.Tensor):
        raise NotImplementedError

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def null_cond(self, cond):
        raise ValueError(f"{type(self).__name__} has no unconditional input: classifier-free guidance needs one")

    def run_model(self, x_in, t, cond):
        return self.model(x_in, t, cond)

    # --- the denoiser ------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None, guidance: float | None = None):
        if guidance is not None and guidance != 1.0 and cond is not None:
            return self._guided(x, sigma, cond, guidance)
        return self._denoise(x, sigma, cond)

    def _denoise(self, x, sigma, cond):
        sig = sigma.to(torch.float64).reshape(-1, *([1] * (x.ndim - 1)))
        c_skip, c_out, c_in = (s.to(x.dtype) for s in self.get_scalings(sig))
        t = self.sigma_to_t(sigma.to(torch.float64))
        f = self.run_model(x * c_in, t, cond)
        return c_skip * x + c_out * f.to(x.dtype)

    def _guided(self, x, sigma, cond, w):
        """CFG as one batched call over [unconditional; conditional]."""
        n = x.shape[0]
        both = self._denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(self.null_cond(cond), cond))
        d_u, d_c = both[:n], both[n:]
        return d_u + w * (d_c - d_u)


def cat_cond(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


class EDMDenoiser(Denoiser):
    """Karras et al. (2022) preconditioning; t = ¼ ln σ."""

    def __init__(self, model, sigma_data: float = 0.5, sigma_min=0.002, sigma_max=80.0, null_label=None):
        super().__init__(model)
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.null_label = null_label

    def get_scalings(self, sigma):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def sigma_to_t(self, sigma):
        return sigma.log() / 4

    def null_cond(self, cond):
        if self.null_label is None:
            return super().null_cond(cond)
        return torch.full_like(cond, self.null_label)


class DiscreteVPDenoiser(Denoiser):
    """A model trained on a discrete VP table ``alphas_cumprod`` (DDPM / Stable Diffusion).

    σ_t = sqrt((1−ᾱ_t)/ᾱ_t); σ → t by linear interpolation in log σ between table entries
    (k-diffusion's DiscreteSchedule), so the grid points map to integer timesteps exactly.
    Subclasses pick what the network predicts. ``t_scale`` maps the index to the model's
    time input (1 for diffusers' integer timesteps).
    """

    prediction = "epsilon"

    def __init__(self, model, alphas_cumprod: Sequence[float] | torch.Tensor, null_cond_value=None):
        super().__init__(model)
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        sigmas = ((1 - ac) / ac).sqrt()
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])
        self.null_cond_value = null_cond_value

    def sigma_to_t(self, sigma):
        ls = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.clamp(min=math.exp(float(ls[0]))).log()
        idx = torch.searchsorted(ls, log_sigma.contiguous()).clamp(1, len(ls) - 1)
        lo, hi = ls[idx - 1], ls[idx]
        frac = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).to(torch.float64) + frac

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64)
        lo = t.floor().long().clamp(0, len(self.log_sigmas) - 1)
        hi = (lo + 1).clamp(max=len(self.log_sigmas) - 1)
        w = t - lo
        ls = self.log_sigmas.to(t.device)
        return ((1 - w) * ls[lo] + w * ls[hi]).exp()

    def get_scalings(self, sigma):
        c_in = 1 / (sigma**2 + 1).sqrt()
        if self.prediction == "epsilon":
            return torch.ones_like(sigma), -sigma, c_in
        if self.prediction == "v_prediction":
            return 1 / (sigma**2 + 1), -sigma * c_in, c_in
        if self.prediction == "sample":
            return torch.zeros_like(sigma), torch.ones_like(sigma), c_in
        raise ValueError(f"unknown prediction type {self.prediction!r}")

    def null_cond(self, cond):
        if self.null_cond_value is None:
            return super().null_cond(cond)
        v = self.null_cond_value
        if isinstance(v, torch.Tensor):
            return v.to(cond.device, cond.dtype).expand_as(cond)
        return torch.full_like(cond, v)


class VPEpsDenoiser(DiscreteVPDenoiser):
    """ε-prediction: D = x − σ·ε̂(x/√(σ²+1), t)."""

    prediction = "epsilon"


class VPVDenoiser(DiscreteVPDenoiser):
    """v-prediction (Salimans & Ho 2022): D = x/(σ²+1) − σ/√(σ²+1)·v̂."""

    prediction = "v_prediction"


class VPX0Denoiser(DiscreteVPDenoiser):
    """x0-prediction: D = x̂0 (the network sees the VP-scaled input)."""

    prediction = "sample"


class FlowDenoiser(Denoiser):
    """Rectified flow / flow matching: x_t = (1−t)·x0 + t·z, the network predicts v = z − x0.

    σ = t/(1−t), so x_t = x_σ/(1+σ) and x0 = x_t − t·v. ``t_scale`` maps t ∈ [0, 1] to the
    model's time input (1000 for diffusers' FlowMatchEulerDiscreteScheduler).
    """

    def __init__(self, model, t_scale: float = 1.0, sigma_min=0.002, sigma_max=80.0, null_cond_value=None):
        super().__init__(model)
        self.t_scale, self.sigma_min, self.sigma_max = t_scale, sigma_min, sigma_max
        self.null_cond_value = null_cond_value

    def get_scalings(self, sigma):
        c_in = 1 / (1 + sigma)
        return c_in, -sigma / (1 + sigma), c_in

    def sigma_to_t(self, sigma):
        return sigma / (1 + sigma) * self.t_scale

    null_cond = DiscreteVPDenoiser.null_cond
