"""Why a learned plan's FD-digits differs from the reference solve's at equal RMSE (issue 20, the 2-NFE FD target).

    .venv/bin/python benchmarks/fit_learned_fd.py --cells dpmpp-2m:2,ddim:2 --variants default,auto,spread1

Per cell and LearnConfig variant (fit_learned_speed.VARIANTS; fitted on seed 0 as `fewstep fit --method learned`),
on ``--n`` held-out noises of seed 1 against the reference solve from the same noise: RMSE, FD-digits split into
its mean term ‖μ − μ_data‖² and its covariance term, the trace of the feature covariance relative to the test
digits' (above the reference's ratio: features spread more than the ODE's own samples, i.e. artefacts; below:
blur), the mean per-sample contrast (pixel std) relative to the reference sample from the same noise, and the
per-pixel variance across samples relative to the reference's. Writes benchmarks/results/fit_learned_fd.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _stats(x: torch.Tensor, ref: torch.Tensor, data_feats, metrics) -> dict:
    n = x.shape[0]
    fa = metrics.digit_features(x)
    ma, ca = metrics._gauss(fa)
    mb, cb = data_feats
    fd = metrics.frechet_distance(ma, ca, mb, cb)
    mean_term = float(((ma - mb) ** 2).sum())
    return {"rmse_vs_reference": metrics.rmse(x, ref), "fd_digits": fd, "fd_mean_term": mean_term,
            "fd_cov_term": fd - mean_term, "feature_trace_ratio": float(np.trace(ca) / np.trace(cb)),
            "contrast_ratio": float((x.reshape(n, -1).std(1) / ref.reshape(n, -1).std(1)).mean()),
            "pixel_variance_ratio": float(x.var(0).mean() / ref.var(0).mean())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="dpmpp-2m:2,ddim:2")
    ap.add_argument("--variants", default="default,auto,spread1")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from fewstep.runtime.models import load
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.runtime.sampling import make_inputs, run_plan
    from fewstep.runtime.solvers import build
    from fewstep.training import metrics
    from fewstep.training.data import load_digits_split
    from fewstep.training.fitcore import make_batch
    from fewstep.training.learned import LearnConfig, cached_reference, fit_learned

    sys.path.insert(0, HERE)
    from fit_learned_speed import VARIANTS

    t = load("digits")
    den = t.denoiser
    p0 = build("ddim", 1, den.sigma_min, den.sigma_max)
    inputs = make_inputs(t, p0, args.n, 1)
    ref = cached_reference(t, make_batch(t, args.n, 1, None, None), args.n, 1, None, None, p0.sigma_init).float()
    _, _, x_test, _ = load_digits_split()
    data = metrics._gauss(metrics.digit_features(x_test))
    res = {"n": args.n, "reference": _stats(ref, ref, data, metrics), "rows": [],
           "argv": sys.argv[1:] if argv is None else list(argv)}
    print("reference", json.dumps({k: round(v, 4) for k, v in res["reference"].items()}), flush=True)
    for cell in args.cells.split(","):
        solver, nfe = cell.split(":")[0], int(cell.split(":")[1])
        for name in args.variants.split(","):
            plan = fit_learned(t, solver, nfe, LearnConfig(**VARIANTS[name]))
            row = {"solver": solver, "nfe": nfe, "variant": name, **_stats(run_plan(t, plan, inputs), ref, data,
                                                                            metrics)}
            res["rows"].append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    atomic_write_text(os.path.join(args.out, "fit_learned_fd.json"), json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
