"""Sample a Plan on a teacher and score it: the engine behind `fewstep sample|eval|demo|bench quality`.

Inputs are always drawn from fewstep's Philox generator (or given), so a seed means the
same z in every runtime. Quality numbers:
- ``rmse_vs_reference``: per-element RMS between the plan's samples and a high-accuracy
  ODE solve from the same z (RK4 in log σ to the teacher's σ_min, then D; see gmm.py),
  averaged over samples (mean over samples of each sample's RMS);
- digits: ``fd_digits`` against the 300 held-out real digits and ``class_accuracy``
  (the classifier's agreement with the requested class);
- gmm: ``sliced_w2`` against exact data samples;
- both: ``precision`` / ``recall`` (k = 3 nearest-neighbour manifolds, Kynkäänniemi et al. 2019) against
  the same reference set: the classifier's features for digits, the raw points for gmm (n > 3 samples).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import check_finite
from ..runtime.executor import InputError, sample
from ..runtime.plan import Plan
from .teachers import Teacher

# RK4 steps of the reference solve (4 evaluations each). The exact GMM is cheap. For the digits
# UNet, 24 steps differ from 64 by RMS 1.0e-3 (16 steps: 3.9e-3; measured on 32 samples),
# against ≥ 3e-2 for any ≤ 10-NFE solver, at a quarter of the cost.
REFERENCE_STEPS = {"gmm": 500, "digits": 24, "diffusers": 24}
PR_K = 3  # precision / recall: k-th nearest neighbour radii (Kynkäänniemi et al. 2019)


@dataclass
class Inputs:
    z: torch.Tensor  # [N, ...] float32 standard normal
    noise: torch.Tensor | None  # [S, N, ...] or None
    labels: torch.Tensor | None  # [N] long or None (unconditional)


def make_inputs(teacher: Teacher, plan: Plan, n: int, seed: int, cls: int | None = None,
                z: np.ndarray | None = None) -> Inputs:
    from ..runtime import noise as _noise

    if n < 1:
        raise InputError(f"--n must be ≥ 1, got {n}")
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
    if cls == "none":  # the null label: unconditional sampling of a class-conditional model
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


def check_guidance(teacher: Teacher, guidance: float | None, labels) -> None:
    if guidance is None or guidance == 1.0:
        return
    if not math.isfinite(guidance):
        raise InputError(f"--guidance must be finite, got {guidance}")
    if teacher.num_classes is None:
        raise InputError(f"--guidance {guidance}: {teacher.name} is not conditional, guidance needs a class input")
    if labels is None:
        raise InputError(f"--guidance {guidance} needs a class: pass --class C")


@torch.no_grad()
def run_plan(teacher: Teacher, plan: Plan, inputs: Inputs, guidance: float | None = None,
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


@torch.no_grad()
def reference(teacher: Teacher, inputs: Inputs, sigma_max: float, guidance: float | None = None,
              steps: int | None = None, batch: int = 1000, progress=None) -> torch.Tensor:
    from .gmm import reference_endpoint

    steps = steps or REFERENCE_STEPS[teacher.kind]
    # A distilled student is scored against the ODE it was distilled from (its teacher, guided at W).
    den = teacher.reference_denoiser if teacher.reference_denoiser is not None else teacher.denoiser
    outs = []
    n = inputs.z.shape[0]
    for i in range(0, n, batch):
        sl = slice(i, min(n, i + batch))
        cond = inputs.labels[sl] if inputs.labels is not None else None
        z = inputs.z[sl]
        ref = reference_endpoint(den, z.to(torch.float64) if teacher.kind == "gmm" else z, sigma_max,
                                 den.sigma_min, steps, cond=cond, guidance=guidance)
        outs.append(ref.to(torch.float32))
        if progress:
            progress(sl.stop - sl.start)
    return torch.cat(outs)


def _classes(teacher: Teacher, inputs: Inputs):
    """The class labels to score against; None when unconditional (no labels, or the null label)."""
    lab = inputs.labels
    if lab is None or teacher.num_classes is None or bool((lab >= teacher.num_classes).any()):
        return None
    return lab


def quality(teacher: Teacher, samples: torch.Tensor, inputs: Inputs, ref: torch.Tensor | None) -> dict:
    from . import metrics

    out: dict = {}
    if ref is not None:
        out["rmse_vs_reference"] = metrics.rmse(samples, ref)
    if teacher.kind == "digits":
        from .digits import load_digits_split

        _, _, x_test, _ = load_digits_split()
        out["fd_digits"] = float(metrics.fd_digits(samples, x_test))
        if samples.shape[0] > PR_K:
            out["precision"], out["recall"] = metrics.digits_precision_recall(samples, x_test, PR_K)
        if _classes(teacher, inputs) is not None:
            out["class_accuracy"] = float(metrics.class_accuracy(samples, inputs.labels))
    elif teacher.kind == "gmm":
        g = teacher.denoiser
        labels = _classes(teacher, inputs)
        data = g.sample_data(samples.shape[0], seed=12345, labels=labels)
        out["sliced_w2"] = float(metrics.sliced_w2(samples.double(), data))
        if samples.shape[0] > PR_K:
            out["precision"], out["recall"] = metrics.precision_recall(samples.double().reshape(len(samples), -1),
                                                                       data, PR_K)
    return out


def evaluate(teacher: Teacher, plan: Plan, n: int, seed: int, cls: int | None = None,
             guidance: float | None = None, z: np.ndarray | None = None, ref_steps: int | None = None) -> dict:
    from tqdm import tqdm

    inputs = make_inputs(teacher, plan, n, seed, cls, z)
    # sampling, then the reference solve (the long part); shown on a terminal only (disable=None)
    bar = tqdm(total=2 * n, desc=f"eval {plan.name}", unit="sample", disable=None, leave=False)
    t0 = time.perf_counter()
    samples = run_plan(teacher, plan, inputs, guidance, progress=bar.update)
    secs = time.perf_counter() - t0
    check_finite(samples, f"{plan.name} on {teacher.name}", "nothing to score. A plan coefficient or a guidance "
                 "scale far out of range does this: try a smaller --guidance, or check the plan's rows")
    ws = {r.guidance for r in plan.rows}
    if guidance is None and len(ws) == 1 and None not in ws:
        guidance = ws.pop()  # a plan fitted at w samples at w: score it against the reference at w
    ref = reference(teacher, inputs, plan.sigma_init, guidance, ref_steps, progress=bar.update)
    bar.close()
    res = {"model": teacher.name, "plan": plan.name, "nfe": plan.nfe, "n": n, "seed": seed,
           "guidance": 1.0 if guidance is None else guidance, "class": cls}
    res.update(quality(teacher, samples, inputs, ref))
    res["sample_seconds"] = secs
    return res
