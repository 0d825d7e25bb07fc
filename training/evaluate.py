"""Score a Plan's samples on a model: the engine behind `fewstep eval|demo|bench quality`.

Sampling and the reference solve are the runtime's (``runtime/sampling.py``, ``runtime/reference.py``);
this module adds the quality numbers:
- ``rmse_vs_reference``: per-element RMS between the plan's samples and a high-accuracy
  ODE solve from the same z (RK4 in log σ to the model's σ_min, then D; see runtime/reference.py),
  averaged over samples (mean over samples of each sample's RMS);
- digits: ``fd_digits`` against the 300 held-out real digits and ``class_accuracy``
  (the classifier's agreement with the requested class);
- gmm: ``sliced_w2`` against exact data samples;
- both: ``precision`` / ``recall`` (k = 3 nearest-neighbour manifolds, Kynkäänniemi et al. 2019) against
  the same reference set: the classifier's features for digits, the raw points for gmm (n > 3 samples).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import check_finite
from ..runtime.models import Model
from ..runtime.plan import Plan
from ..runtime.reference import reference
from ..runtime.sampling import Inputs, make_inputs, run_plan

PR_K = 3  # precision / recall: k-th nearest neighbour radii (Kynkäänniemi et al. 2019)


def _classes(teacher: Model, inputs: Inputs):
    """The class labels to score against; None when unconditional (no labels, or the null label)."""
    lab = inputs.labels
    if lab is None or teacher.num_classes is None or bool((lab >= teacher.num_classes).any()):
        return None
    return lab


def quality(teacher: Model, samples: torch.Tensor, inputs: Inputs, ref: torch.Tensor | None) -> dict:
    from . import metrics

    out: dict = {}
    if ref is not None:
        out["rmse_vs_reference"] = metrics.rmse(samples, ref)
    if teacher.kind == "digits":
        from .data import load_digits_split

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


def evaluate(teacher: Model, plan: Plan, n: int, seed: int, cls: int | None = None,
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
