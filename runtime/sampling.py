"""Inputs for one sampling run and the run itself: the engine behind `fewstep sample|eval|demo`.

Inputs are always drawn from fewstep's Philox generator (``runtime/noise.py``) or given, so a seed
means the same z in every runtime. Labels: the requested class, the null label (``--class none``),
or for the digits models classes drawn evenly (i mod 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .executor import InputError, sample
from .models import Model
from .plan import Plan


@dataclass
class Inputs:
    z: torch.Tensor  # [N, ...] float32 standard normal
    noise: torch.Tensor | None  # [S, N, ...] or None
    labels: torch.Tensor | None  # [N] long, named conditioning tensors [N, …] (a dict), or None (unconditional)


def make_inputs(teacher: Model, plan: Plan, n: int, seed: int, cls: int | None = None,
                z: np.ndarray | None = None) -> Inputs:
    from . import noise as _noise

    if n < 1:
        raise InputError(f"--n must be ≥ 1, got {n}")
    if math.prod(teacher.shape) > _noise.MAX_ELEMENTS:  # the model's own sample size, not --n, is the problem
        raise InputError(f"the model's samples are {'×'.join(map(str, teacher.shape))} "
                         f"({math.prod(teacher.shape):,} values), more than the {_noise.MAX_ELEMENTS:,} one run holds")
    if n * math.prod(teacher.shape) > _noise.MAX_ELEMENTS:
        raise InputError(f"{n:,} samples of {math.prod(teacher.shape):,} values are more than the "
                         f"{_noise.MAX_ELEMENTS:,} values one run holds; ask for fewer samples (--n, --batch)")
    n_stoch = len(plan.stochastic_rows)
    zz, eps = _noise.draw(seed, n, teacher.shape, n_stoch)
    if z is not None:
        want = (n, *teacher.shape)
        if z.dtype != np.float32 or tuple(z.shape) != want:
            dims = "×".join(map(str, teacher.shape))
            raise InputError(f"noise file: expected float32 array of shape {want} (N×{dims}),"
                             f" got {z.dtype} {tuple(z.shape)}")
        if not np.all(np.isfinite(z)):
            raise InputError("noise file: contains NaN or inf")
        zz = z
    labels = None
    if teacher.cond_inputs is not None:  # named conditioning (a text pipeline): from --prompt / --embeddings
        if cls is not None:
            raise InputError(f"--class: {teacher.name} takes text conditioning (--prompt or --embeddings), "
                             f"not class labels")
        if teacher.cond_source is None:
            raise InputError(f"{teacher.name} is text-conditioned: pass --prompt TEXT or --embeddings FILE")
        labels = teacher.cond_source(n)
    elif cls == "none":  # the null label: unconditional sampling of a class-conditional model
        null = getattr(teacher.denoiser, "null_label", None)
        if teacher.num_classes is None or null is None:
            raise InputError(f"--class none: {teacher.name} has no null label (no unconditional sampling)")
        labels = torch.full((n,), null, dtype=torch.long)
    elif teacher.num_classes is not None:
        if cls is not None:
            if not 0 <= cls < teacher.num_classes:
                raise InputError(f"--class must be in 0..{teacher.num_classes - 1} for {teacher.name}, got {cls}")
            labels = torch.full((n,), cls, dtype=torch.long)
        elif teacher.kind == "digits":
            labels = torch.arange(n) % teacher.num_classes  # classes drawn evenly
    elif cls is not None:
        raise InputError(f"--class given but {teacher.name} is not class-conditional")
    return Inputs(torch.from_numpy(np.ascontiguousarray(zz)),
                  torch.from_numpy(np.ascontiguousarray(eps)) if n_stoch else None, labels)


def check_guidance(teacher: Model, guidance: float | None, labels) -> None:
    if guidance is None or guidance == 1.0:
        return
    if not math.isfinite(guidance):
        raise InputError(f"--guidance must be finite, got {guidance}")
    if isinstance(labels, dict):  # named conditioning: CFG's unconditional half is the negative_* tensors
        try:
            teacher.denoiser.null_cond(labels)
        except ValueError as exc:
            raise InputError(f"--guidance {guidance}: {exc}") from None
        return
    if teacher.num_classes is None:
        raise InputError(f"--guidance {guidance}: {teacher.name} is not conditional, guidance needs a class input")
    if labels is None:
        raise InputError(f"--guidance {guidance} needs a class: pass --class C")


@torch.no_grad()
def run_plan(teacher: Model, plan: Plan, inputs: Inputs, guidance: float | None = None,
             batch: int = 1000, progress=None) -> torch.Tensor:
    """``progress``: called with the number of samples after each batch (a tqdm bar's ``update``)."""
    check_guidance(teacher, guidance, inputs.labels)
    outs = []
    n = inputs.z.shape[0]
    for i in range(0, n, batch):
        sl = slice(i, min(n, i + batch))
        noise = inputs.noise[:, sl] if inputs.noise is not None else None
        cond = inputs.labels[sl] if inputs.labels is not None else None
        outs.append(sample(plan, teacher.denoiser, inputs.z[sl], cond=cond, guidance=guidance, noise=noise))
        if progress:
            progress(sl.stop - sl.start)
    return torch.cat(outs)
