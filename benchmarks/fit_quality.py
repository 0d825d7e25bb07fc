"""Fitted vs base solvers (issue 3): every family × NFE × {base, +D-ODE, +IIA, +timesteps, combinations}.

    .venv/bin/python benchmarks/fit_quality.py --model gmm            # or: fewstep bench fit --model gmm
    .venv/bin/python benchmarks/fit_quality.py --model digits --solvers ddim,heun,dpmpp-2m --nfe 3,5 --n 300

Fitting uses Philox seed 0 (the defaults of `fewstep fit`); every number is measured on held-out
noise (``--seed``, default 1) against the high-accuracy reference solve from that noise. Writes
benchmarks/results/fit_<model>.{json,md,png}. "fit s" excludes the fitting batch's reference solve,
which is computed once per teacher and shared (``fit(cache=…)``); it is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

METHODS = ("base", "dode", "iia", "timesteps", "timesteps+dode", "timesteps+iia")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gmm")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--nfe", default="2,3,4,5,6,8,10")
    ap.add_argument("--solvers", default="ddim,heun,dpmpp-2m,dpmpp-3m,ipndm,deis-2,deis-3,unipc")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timestep-evals", type=int, default=None, help="Nelder–Mead budget (default 40 + 30·steps)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale: fit, sample and reference at w")
    ap.add_argument("--tag", default="", help="suffix of the output files (fit_<model><tag>.*)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # 2 shared cores: intra-op threads only contend at these sizes

    import fewstep
    from fewstep.report import machine
    from fewstep.runtime.models import load
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.runtime.reference import reference
    from fewstep.runtime.sampling import make_inputs, run_plan
    from fewstep.runtime.solvers import SolverError, build
    from fewstep.training.evaluate import quality
    from fewstep.training.fit import FitConfig, fit
    from fewstep.training.fitcore import FitError

    teacher = load(args.model)
    den = teacher.denoiser
    nfes = [int(v) for v in args.nfe.split(",")]
    solvers = args.solvers.split(",")
    methods = args.methods.split(",")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    plan0 = build("ddim", 1, den.sigma_min, den.sigma_max)
    inputs = make_inputs(teacher, plan0, args.n, args.seed)
    ref = reference(teacher, inputs, plan0.sigma_init, args.guidance)
    ref_q = quality(teacher, ref, inputs, None)
    cache: dict = {}
    t1 = time.perf_counter()
    # warms the cache: the fitting batch's reference solve
    fit(teacher, FitConfig("ddim", 2, "dode", guidance=args.guidance), cache=cache)
    fit_ref_seconds = time.perf_counter() - t1
    rows = []
    for solver in solvers:
        for nfe in nfes:
            try:
                base = build(solver, nfe, den.sigma_min, den.sigma_max)
            except SolverError as exc:
                rows.append({"solver": solver, "nfe": nfe, "skipped": str(exc)})
                continue
            for m in methods:
                t1 = time.perf_counter()
                try:
                    plan = base if m == "base" else fit(teacher, FitConfig(
                        solver, nfe, m, guidance=args.guidance, timestep_evals=args.timestep_evals), cache=cache)
                except FitError as exc:  # recorded, e.g. a past-state correction past 11 NFE
                    rows.append({"solver": solver, "nfe": nfe, "method": m, "error": str(exc)})
                    print(f"{args.model} {solver:9s} NFE {nfe:2d} {m:15s} error: {exc}", flush=True)
                    continue
                secs = 0.0 if m == "base" else time.perf_counter() - t1
                x = run_plan(teacher, plan, inputs, args.guidance)
                q = quality(teacher, x, inputs, ref)
                pv = plan.provenance
                row = {"solver": solver, "nfe": nfe, "method": m, **q, "fit_seconds": secs,
                       "fit_rmse_base": pv.get("fit_rmse_base"), "fit_rmse": pv.get("fit_rmse"),
                       "alpha": pv.get("alpha"), "batch": pv.get("batch") if m != "base" else None,
                       "variant": pv.get("iia_variant") or pv.get("dode_form")}
                rows.append(row)
                print(f"{args.model} {solver:9s} NFE {nfe:2d} {m:15s} " + " ".join(
                    f"{k} {v:.4g}" for k, v in q.items()) + f" fit {secs:.1f}s", flush=True)
    result = {"model": teacher.name, "guidance": args.guidance, "teacher_hash": teacher.content_hash,
              "n_heldout": args.n,
              "heldout_seed": args.seed, "fit_seed": 0, "reference": ref_q, "fit_reference_seconds": fit_ref_seconds,
              "rows": rows, "machine": machine(args.threads), "fewstep": fewstep.__version__,
              "seconds": time.perf_counter() - t0, "argv": sys.argv[1:] if argv is None else list(argv)}
    base_path = os.path.join(args.out, f"fit_{args.model}{args.tag}")
    atomic_write_text(base_path + ".json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(base_path + ".md", _markdown(result, methods))
    _plot(result, methods, base_path + ".png")
    print(f"-> {base_path}.json/.md/.png in {result['seconds']:.0f} s")
    return 0


def _markdown(res: dict, methods) -> str:
    metric2 = "fd_digits" if res["model"] == "digits" else "sliced_w2"
    w = f", CFG w = {res['guidance']}" if res.get("guidance") is not None else ""
    lines = [f"# Fitted solvers on {res['model']}{w} (held-out noise seed {res['heldout_seed']}, "
             f"{res['n_heldout']} samples; fitted on seed {res['fit_seed']})", "",
             f"Reference solve: {json.dumps({k: round(v, 4) for k, v in res['reference'].items()})}. "
             f"Machine: {res['machine']['cpu']}, {res['machine']['threads']} torch thread(s). "
             f"Fitting-batch reference solve (shared): {res['fit_reference_seconds']:.1f} s.", "",
             "Endpoint RMSE vs the reference (lower is better); best fitted entry in **bold**.", "",
             "| solver | NFE | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    by = {}
    for r in res["rows"]:
        if "skipped" not in r and "error" not in r:
            by.setdefault((r["solver"], r["nfe"]), {})[r["method"]] = r
    for (s, n), d in by.items():
        fitted = [m for m in methods if m != "base" and m in d]
        best = min(fitted, key=lambda m: d[m]["rmse_vs_reference"]) if fitted else None
        cells = []
        for m in methods:
            if m not in d:
                cells.append("–")
                continue
            v = f"{d[m]['rmse_vs_reference']:.4f}"
            cells.append(f"**{v}**" if m == best else v)
        lines.append(f"| {s} | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"{metric2} (and class accuracy for digits) / fit seconds:", "",
              "| solver | NFE | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for (s, n), d in by.items():
        cells = []
        for m in methods:
            if m not in d:
                cells.append("–")
                continue
            r = d[m]
            acc = f" acc {r['class_accuracy']:.3f}" if "class_accuracy" in r else ""
            cells.append(f"{r[metric2]:.4f}{acc} / {r['fit_seconds']:.1f}s")
        lines.append(f"| {s} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(res: dict, methods, path: str) -> None:
    from fewstep.report import save_plot

    solvers = list(dict.fromkeys(r["solver"] for r in res["rows"]))
    cols = min(4, len(solvers))
    rws = (len(solvers) + cols - 1) // cols

    def draw(fig, axes):
        for ax, s in zip(axes.flat, solvers):
            for m in methods:
                pts = [(r["nfe"], r["rmse_vs_reference"]) for r in res["rows"]
                       if r["solver"] == s and r.get("method") == m and "error" not in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m, lw=2 if m == "base" else 1)
            ax.set_yscale("log")
            ax.set_title(s)
            ax.set_xlabel("NFE")
            ax.set_ylabel("endpoint RMSE")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(solvers):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(f"fitted solvers on {res['model']} (held-out noise)")

    save_plot(path, draw, figsize=(4 * cols, 3.2 * rws), nrows=rws, ncols=cols, dpi=90)


if __name__ == "__main__":
    sys.exit(main())
