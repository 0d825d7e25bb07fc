"""DMD2 students (issue 14) against the teacher, the progressive students and fitted solvers, on digits (W = 1).

    .venv/bin/python benchmarks/dmd2_quality.py                     # the shipped digits-dmd2 bundle
    .venv/bin/python benchmarks/dmd2_quality.py --model DIR --ablation "no GAN=out/dmd2_nogan/steps_1" …

Every cell: n samples (classes evenly drawn) from the same z (Philox seed ``--seed``, not used in training
or in any other benchmark of the students), FD-digits against the 300 held-out digits, class accuracy
of the requested class, and precision / recall (k = 3, the classifier's features, against the same 300).
Rows: the teacher at EDM Heun 35; the DMD2 students (1 and 4 steps); the progressive students of
``digits-guided`` at 1 and 4 steps (deterministic sampler); on the teacher at the same number of calls,
DDIM and DPM-Solver++(2M) and their D-ODE fits; and any ``--ablation NAME=STUDENT`` (a 1-step DMD2
student.safetensors trained with other settings). Training wall time comes from each student's JSON.
Writes benchmarks/results/dmd2_digits.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-dmd2", help="digits-dmd2 | a DMD2 bundle directory")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--ablation", action="append", default=[], help="NAME=PATH of a 1-step DMD2 student")
    ap.add_argument("--no-fit", action="store_true", help="skip the fitted-solver rows")
    ap.add_argument("--seeds", default="3,4,5,6", help="extra Philox seeds for the seed-spread table (teacher, "
                                                      "DMD2 and progressive students): FD-digits moves with z")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # 2 shared cores: intra-op threads only contend at these sizes

    from fewstep.report import cpu_name
    from fewstep.runtime.models import SHIPPED_BUNDLES, bundle_steps, load
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.runtime.sampling import make_inputs, run_plan
    from fewstep.runtime.solvers import build
    from fewstep.training import dmd2
    from fewstep.training.evaluate import quality
    from fewstep.training.fit import FitConfig, fit

    teacher = load("digits")
    den = teacher.denoiser
    steps = bundle_steps(args.model)
    if not steps:
        print(f"{args.model}: no DMD2 students found", file=sys.stderr)
        return 2
    bundle_dir = SHIPPED_BUNDLES.get(args.model, args.model)
    plan0 = build("ddim", 1, den.sigma_min, den.sigma_max)
    inputs = make_inputs(teacher, plan0, args.n, args.seed)
    rows = []

    def cell(what, kind, t, plan, calls, train_s=None, fit_s=None):
        inp = make_inputs(t, plan, args.n, args.seed)  # same z (Philox stream 0); noise for stochastic rows
        assert torch.equal(inp.z, inputs.z)
        t0 = time.perf_counter()
        x = run_plan(t, plan, inp)
        secs = time.perf_counter() - t0
        q = quality(teacher, x, inp, None)
        r = {"what": what, "kind": kind, "steps": plan.nfe, "sequential_calls": calls, **q,
             "sample_seconds": round(secs, 2)}
        if train_s is not None:
            r["train_seconds"] = train_s
        if fit_s is not None:
            r["fit_seconds"] = round(fit_s, 1)
        rows.append(r)
        print(f"{what:<40} calls {calls:3d}  fd {q['fd_digits']:7.2f}  acc {q['class_accuracy']:.3f}  "
              f"prec {q['precision']:.3f}  rec {q['recall']:.3f}", flush=True)

    def wall(path):
        with open(path[: -len(".safetensors")] + ".json") as f:
            return json.load(f)["wall_seconds"]

    t_all = time.perf_counter()
    with open(os.path.join(bundle_dir, "students.json")) as f:
        index = json.load(f)
    cell("teacher, Heun 35 NFE", "teacher", teacher, build("heun", 35, den.sigma_min, den.sigma_max), 35)
    train = {}
    for n in steps:
        s = load(args.model, steps=n)
        train[n] = wall(os.path.join(bundle_dir, index["students"][str(n)]["weights"]))
        cell(f"DMD2 {n} step{'s' if n > 1 else ''}", "dmd2", s, s.plans["deterministic"], n, train[n])
    for name, path in (a.split("=", 1) for a in args.ablation):
        s = load(path)
        cell(f"DMD2 1 step, {name}", "ablation", s, dmd2.dmd2_plan(1, den.sigma_min, den.sigma_max), 1, wall(path))
    for n in (1, 4):
        if n in bundle_steps("digits-guided"):
            s = load("digits-guided", steps=n)
            cell(f"progressive student {n} step{'s' if n > 1 else ''}", "progressive", s, s.plans["deterministic"], n)
    if not args.no_fit:
        for n in (1, 4):
            for fam in ("ddim", "dpmpp-2m"):
                if fam == "dpmpp-2m" and n == 1:
                    continue  # one step of DPM-Solver++(2M) is DDIM
                base = build(fam, n, den.sigma_min, den.sigma_max)
                cell(f"teacher {fam} {n} (base)", "base", teacher, base, n)
                t0 = time.perf_counter()
                fitted = fit(teacher, FitConfig(fam, n, "dode", seed=0))
                cell(f"teacher {fam} {n} + D-ODE", "fitted", teacher, fitted, n, fit_s=time.perf_counter() - t0)

    spread = []
    extra = [int(v) for v in args.seeds.split(",") if v]
    if extra:
        import numpy as np

        named = [("teacher, Heun 35 NFE", teacher, build("heun", 35, den.sigma_min, den.sigma_max))]
        for n in steps:
            s = load(args.model, steps=n)
            named.append((f"DMD2 {n} step{'s' if n > 1 else ''}", s, s.plans["deterministic"]))
        for n in (1, 4):
            if n in bundle_steps("digits-guided"):
                s = load("digits-guided", steps=n)
                named.append((f"progressive student {n} step{'s' if n > 1 else ''}", s, s.plans["deterministic"]))
        for what, t, plan in named:
            vals = {"fd_digits": [], "recall": [], "precision": [], "class_accuracy": []}
            for sd in [args.seed, *extra]:
                inp = make_inputs(t, plan, args.n, sd)
                q = quality(teacher, run_plan(t, plan, inp), inp, None)
                for k in vals:
                    vals[k].append(q[k])
            spread.append({"what": what, "seeds": [args.seed, *extra],
                           **{k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)), "values": v}
                              for k, v in vals.items()}})
            print(f"{what:<40} fd {np.mean(vals['fd_digits']):6.2f} ± {np.std(vals['fd_digits'], ddof=1):.2f}  "
                  f"rec {np.mean(vals['recall']):.3f} ± {np.std(vals['recall'], ddof=1):.3f}", flush=True)

    res = {"model": args.model, "teacher": teacher.content_hash, "guidance": 1.0, "n": args.n, "seed": args.seed,
           "reference": "the 300 held-out real digits (FD-digits; precision / recall, k = 3, classifier features)",
           "machine": f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cpus, 1 torch thread, "
                      f"torch {torch.__version__}",
           "train_seconds": {str(k): v for k, v in train.items()},
           "bench_seconds": round(time.perf_counter() - t_all, 1), "rows": rows, "seed_spread": spread}
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "dmd2_digits.json"), json.dumps(res, indent=1) + "\n")
    atomic_write_text(os.path.join(args.out, "dmd2_digits.md"), _markdown(res))
    return 0


def _markdown(res: dict) -> str:
    tr = res["train_seconds"]
    lines = ["# DMD2 students: digits, W = 1\n",
             f"Model `{res['model']}`; n = {res['n']} samples (classes evenly drawn), Philox seed {res['seed']} "
             f"(held out: used by no training run), the same z in every cell. FD-digits, precision and recall "
             f"against {res['reference']}; class accuracy of the requested class. `calls` = sequential network "
             f"calls. Machine: {res['machine']}. Generated by `.venv/bin/python benchmarks/dmd2_quality.py` "
             f"in {res['bench_seconds']:.0f} s.\n",
             "Training wall time (one torch thread on the shared 2-core box, other jobs running): " +
             ", ".join(f"{k}-step student {v:.0f} s" for k, v in tr.items()) +
             (" (the 4-step student starts from the 1-step one's networks)" if len(tr) > 1 else "") + ".\n",
             "Shipped students: `make dmd2` (= `fewstep distill dmd2 --out out/digits_dmd2`: 500 generator updates "
             "for the 1-step student, then 150 for the 4-step one, 5 fake-score / classifier updates per generator "
             "update, batch 32, Adam 3e-4, GAN weights 3e-3 / 1e-2). Ablations (reduced budget, 150 generator "
             "updates, 1-step): `fewstep distill dmd2 --steps 1 --iters 150` with the defaults, with `--no-gan`, "
             "and with `--fake-updates 1`.\n",
             "| sampler | calls | FD-digits | class acc. | precision | recall | train s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        ts = f"{r['train_seconds']:.0f}" if "train_seconds" in r else ""
        lines.append(f"| {r['what']} | {r['sequential_calls']} | {r['fd_digits']:.2f} | {r['class_accuracy']:.3f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {ts} |")
    if res.get("seed_spread"):
        sp = res["seed_spread"]
        lines += ["", f"Seed spread: the same cells at Philox seeds {', '.join(map(str, sp[0]['seeds']))} "
                  f"(n = {res['n']} each), mean ± standard deviation over seeds. FD-digits against 300 reference "
                  "digits moves by about a unit with z alone: compare means, not single cells.\n",
                  "| sampler | FD-digits | class acc. | precision | recall |", "|---|---:|---:|---:|---:|"]
        for r in sp:
            lines.append(f"| {r['what']} | " + " | ".join(
                f"{r[k]['mean']:.{d}f} ± {r[k]['std']:.{d}f}" for k, d in
                (("fd_digits", 2), ("class_accuracy", 3), ("precision", 3), ("recall", 3))) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
