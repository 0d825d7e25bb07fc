"""Long-history fitted plans (past-state corrections, K up to 10): history length, coefficient size, fp32 error.

    .venv/bin/python benchmarks/history_precision.py            # GMM, ~30 s on one thread

For each (family, method) at NFE 9 and 10 on the exact GMM teacher: the fitted corrections compiled in both
history forms (the solver's own s and s = 1; `fit.to_plan` keeps the shorter history, then the smaller
coefficients) with their K and max |coefficient|, and for the plan `fewstep fit` returns, the endpoint
difference between the reference executor in float32 and in float64 on held-out noise, relative to the sample
scale (1 + max|x|). Writes benchmarks/results/fit_history_precision.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

CASES = [("ddim", "dode-eps"), ("ddim", "iia-ddim"), ("dpmpp-2m", "dode-eps"), ("dpmpp-3m", "dode-eps"),
         ("unipc", "dode-eps"), ("ipndm", "dode-data"), ("deis-3", "dode-data"), ("ipndm", "iia-ddim")]


def _max_coef(plan) -> float:
    return max(max(map(abs, (r.a, r.c, *r.p, *r.q))) for r in plan.rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--nfe", default="9,10")
    ap.add_argument("--n", type=int, default=1000, help="held-out samples")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import fewstep
    from fewstep.runtime import sample
    from fewstep.runtime.models import load
    from fewstep.runtime.plan import PlanError, atomic_write_text
    from fewstep.runtime.solvers import build
    from fewstep.training import dode, iia
    from fewstep.training.fit import FitConfig, fit
    from fewstep.training.fitcore import compile_plan, make_batch

    teacher = load("gmm")
    den = teacher.denoiser
    z = torch.randn(args.n, 2, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    rows, t0 = [], time.perf_counter()
    for solver, method in CASES:
        for nfe in (int(v) for v in args.nfe.split(",")):
            base = build(solver, nfe, den.sigma_min, den.sigma_max)
            b = make_batch(teacher, 100 if method.startswith("dode") else 16, 0, None, None)
            if method.startswith("dode"):
                _, info = dode.fit_dode(base, solver, den, b, form=method[5:])
            else:
                _, info = iia.fit_iia(base, solver, den, b, variant=method)
            forms = {}
            for name, s in (("own", None), ("s=1", 1.0)):
                try:
                    p = compile_plan(base, info["slots"], s=s)
                    forms[name] = {"K": p.history, "max_coef": _max_coef(p)}
                except PlanError as exc:
                    forms[name] = {"error": str(exc)}
            plan = fit(teacher, FitConfig(solver, nfe, method))
            x64 = sample(plan, den, z)
            x32 = sample(plan, den, z.float()).double()
            scale = 1 + float(x64.abs().max())
            row = {"solver": solver, "method": method, "nfe": nfe, "alpha": plan.provenance["alpha"],
                   "variant": plan.provenance.get("iia_variant") or plan.provenance.get("dode_form"),
                   "K": plan.history, "max_coef": _max_coef(plan), "forms_at_alpha_1": forms,
                   "fp32_vs_fp64_rel": float((x32 - x64).abs().max()) / scale,
                   "fit_rmse": plan.provenance["fit_rmse"]}
            rows.append(row)
            print(f"{solver:9s} {method:9s} NFE {nfe:2d} K {row['K']} max|coef| {row['max_coef']:.3g} "
                  f"fp32 {row['fp32_vs_fp64_rel']:.2e} (alpha {row['alpha']})", flush=True)
    res = {"model": teacher.name, "teacher_hash": teacher.content_hash, "n_heldout": args.n,
           "heldout_seed": args.seed, "rows": rows, "seconds": time.perf_counter() - t0,
           "fewstep": fewstep.__version__, "torch": torch.__version__, "threads": 1,
           "argv": sys.argv[1:] if argv is None else list(argv)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "fit_history_precision")
    atomic_write_text(path + ".json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(path + ".md", _markdown(res))
    print(f"-> {path}.json/.md in {res['seconds']:.0f} s")
    return 0


def _form(f: dict) -> str:
    return "not expressible" if "error" in f else f"K {f['K']}, {f['max_coef']:.3g}"


def _markdown(res: dict) -> str:
    out = [f"# Long-history fitted plans on {res['model']} ({res['n_heldout']} held-out samples, seed "
           f"{res['heldout_seed']})", "",
           "K and max |coefficient| of the plan `fewstep fit` returns (α: the safeguard's scale of the fitted "
           "correction), both history forms of the unscaled fit, and the float32 reference executor's endpoint "
           "difference from float64, relative to 1 + max|x|. Command: `.venv/bin/python "
           "benchmarks/history_precision.py`.", "",
           "| solver | method | NFE | α | K | max coef | own form (α = 1) | s = 1 form (α = 1) | fp32 vs fp64 "
           "| fit RMSE |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        f = r["forms_at_alpha_1"]
        out.append(f"| {r['solver']} | {r['method']} | {r['nfe']} | {r['alpha']} | {r['K']} | {r['max_coef']:.3g} | "
                   f"{_form(f['own'])} | {_form(f['s=1'])} | {r['fp32_vs_fp64_rel']:.2e} | {r['fit_rmse']:.4f} |")
    out.append("")
    out.append(f"{res['seconds']:.0f} s, torch {res['torch']}, {res['threads']} thread, fewstep {res['fewstep']}.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
