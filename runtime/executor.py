"""The reference executor: runs a Plan over a denoiser with plain torch ops.

This is the readable definition every fast path (fused kernel, CUDA graph, exported graph,
C++ runtime) is tested against; keep it short.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .denoisers import guidance_applies
from .plan import Plan


class InputError(ValueError):
    """Inputs that do not fit the plan (shapes, noise slices)."""


def sample(
    plan: Plan,
    denoiser: Callable,
    z: torch.Tensor,
    cond=None,
    guidance: float | None = None,
    noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run ``plan`` from the standard-normal ``z`` ([B, ...]).

    ``noise`` holds one standard-normal slice per stochastic row (``plan.stochastic_rows``),
    shaped ``[S, B, ...]``. ``guidance`` is used by rows whose own ``guidance`` is None.
    The fused-update executor (``runtime.fast.sample``) is tested against this function.
    """
    stochastic = plan.stochastic_rows
    if stochastic:
        if noise is None:
            raise InputError(f"plan {plan.name!r} has {len(stochastic)} stochastic row(s): pass noise [S, B, ...]")
        if len(noise) != len(stochastic):
            raise InputError(f"noise: expected {len(stochastic)} slice(s), one per stochastic row, got {len(noise)}")
        for i, n in enumerate(noise):
            if tuple(n.shape) != tuple(z.shape):
                raise InputError(f"noise[{i}]: expected shape {tuple(z.shape)}, got {tuple(n.shape)}")
    batch = z.shape[0]

    def evaluate(e, row, u):
        sigma = torch.full((batch,), row.sigma, dtype=z.dtype, device=z.device)
        w = row.guidance if row.guidance is not None else guidance
        return call_denoiser(denoiser, u, sigma, cond, w)

    return run_rows(plan, plan.sigma_init * z, evaluate, noise)


def run_rows(plan: Plan, x: torch.Tensor, evaluate: Callable, noise=None, hist: list | None = None,
             record: list | None = None) -> torch.Tensor:
    """The Plan's loop from the initial state ``x``; ``evaluate(e, row, u)`` is the network.

    Shared by ``sample`` and the ONNX exporter, so the exported graph does the same ops in
    the same order. ``hist``: the history entries of earlier rows (to resume a run part-way: the
    learned-plan fitter's Jacobian reruns only the rows a perturbation reaches); ``record``: a list
    that gets (x, history) before every row.
    """
    hist = [] if hist is None else list(hist)  # hist[-k] is h_{e-k}
    keep = max(plan.history, 1)  # entries older than K are never read again
    ns = 0
    for e, row in enumerate(plan.rows):
        if record is not None:
            record.append((x, list(hist)))
        u = row.a * x if row.a != 1.0 else x
        for k in range(1, len(row.p) + 1):
            if row.p[k - 1] != 0.0:
                u = u + row.p[k - 1] * hist[-k]
        d = evaluate(e, row, u)
        h = d if row.s == 0.0 else d - row.s * u
        hist.append(h)
        x = row.c * x if row.c != 1.0 else x
        for k in range(len(row.q)):
            if row.q[k] != 0.0:
                x = x + row.q[k] * hist[-1 - k]
        if row.g != 0.0:
            x = x + row.g * noise[ns]
            ns += 1
        del hist[:-keep]
    return x


def call_denoiser(denoiser: Callable, x, sigma, cond, guidance):
    """One network evaluation; guidance is passed only when it changes the result."""
    if not guidance_applies(cond, guidance):
        return denoiser(x, sigma, cond)
    return denoiser(x, sigma, cond, guidance=guidance)
