"""The exact Gaussian-mixture teacher: ground truth for every solver test.

Data x0 ~ Σ_k π_k N(μ_k, diag(s_k²)). Under x_σ = x0 + σ·n the marginal is
Σ_k π_k N(μ_k, diag(s_k² + σ²)) and the posterior mean is closed form:

    D(x; σ) = Σ_k r_k(x) [μ_k + s_k²/(s_k² + σ²) · (x − μ_k)],  r_k ∝ π_k N(x; μ_k, s_k² + σ²).

Class conditioning picks one component (label = k); label K is the "null" label, the full
mixture, so classifier-free guidance works as on the digits teacher.
Everything is computed in float64 and returned in the input's dtype.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from .denoisers import Denoiser


class GMM(Denoiser):
    preconditioned = False  # D is closed form (``_denoise``), no network

    def __init__(self, means, stds, weights=None, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__(None)
        means = torch.as_tensor(np.asarray(means), dtype=torch.float64)
        stds = torch.as_tensor(np.asarray(stds), dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError("gmm: means must be [K, dim]")
        if stds.ndim == 1:
            stds = stds[:, None].expand_as(means).clone()
        if stds.shape != means.shape or torch.any(stds <= 0):
            raise ValueError("gmm: stds must be positive, [K] or [K, dim]")
        k = means.shape[0]
        w = (torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None
             else torch.as_tensor(weights, dtype=torch.float64))
        if w.shape != (k,) or torch.any(w <= 0):
            raise ValueError("gmm: weights must be positive, one per component")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", w / w.sum())
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.num_classes = k
        self.null_label = k

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dim,)

    @classmethod
    def default(cls) -> GMM:
        """`--model gmm`: 8 equal components on a circle of radius 2 in 2-D, std 0.25,
        plus a wider ninth at the centre (std 0.5, weight 2/10) so the posterior is not
        symmetric: a fixed, documented teacher whose ODE has curvature at every σ."""
        ang = np.arange(8) * (2 * math.pi / 8)
        means = np.concatenate([np.stack([2 * np.cos(ang), 2 * np.sin(ang)], 1), [[0.3, -0.2]]])
        stds = np.array([0.25] * 8 + [0.5])
        weights = np.array([0.1] * 8 + [0.2])
        return cls(means, stds, weights)

    @classmethod
    def random(cls, dim: int, k: int, seed: int = 0) -> GMM:
        """A random mixture in any dimension (means ~ N(0, 1.5²), stds in [0.2, 0.6])."""
        rng = np.random.default_rng(seed)
        return cls(rng.normal(0, 1.5, (k, dim)), rng.uniform(0.2, 0.6, (k, dim)), rng.uniform(0.5, 1.5, k))

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for t in (self.means, self.stds, self.weights):
            h.update(t.numpy().tobytes())
        return "sha256:" + h.hexdigest()

    def has_null_cond(self) -> bool:
        return True

    def null_cond(self, cond):
        return torch.full_like(cond, self.null_label)

    def _denoise(self, x, sigma, cond):
        xd = x.to(torch.float64).reshape(x.shape[0], -1)
        sig = sigma.to(torch.float64).reshape(-1, 1, 1)  # [B,1,1]
        var = self.stds[None] ** 2 + sig**2  # [B,K,D]
        diff = xd[:, None, :] - self.means[None]  # [B,K,D]
        logp = torch.log(self.weights)[None] - 0.5 * (diff**2 / var + torch.log(2 * math.pi * var)).sum(-1)
        if cond is not None:
            cond = torch.as_tensor(cond, device=x.device).long().reshape(-1)
            onehot = torch.nn.functional.one_hot(cond.clamp(max=self.num_classes - 1), self.num_classes).bool()
            keep = onehot | (cond == self.null_label)[:, None]
            logp = logp.masked_fill(~keep, -math.inf)
        r = torch.softmax(logp, dim=1)  # [B,K]
        post = self.means[None] + (self.stds[None] ** 2 / var) * diff
        out = (r[..., None] * post).sum(1)
        return out.reshape(x.shape).to(x.dtype)

    def sample_data(self, n: int, seed: int = 0, labels=None) -> torch.Tensor:
        """Exact samples of the data distribution (float64)."""
        g = torch.Generator().manual_seed(seed)
        if labels is None:
            labels = torch.multinomial(self.weights, n, replacement=True, generator=g)
        labels = torch.as_tensor(labels).long()
        noise = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return self.means[labels] + self.stds[labels] * noise
