"""Catch-Up Distillation (issue 15) on digits: CUD (none / RK2 / RK3 heads, with and without the additional
one-step training) against the plain flow-matching baseline and the digits teacher with fitted solvers.

    .venv/bin/python benchmarks/cud_quality.py        # the shipped digits-cud bundle + the out/ ablation bundles
    .venv/bin/python benchmarks/cud_quality.py --run "NAME=DIR" …   # other catch-up bundles

Every cell: n samples (classes evenly drawn) from the same z (Philox seed ``--seed``, used by no training run
or fit), FD-digits against the 300 held-out digits, class accuracy of the requested class, precision / recall
(k = 3, the classifier's features, against the same 300). Flow models are sampled by Euler on the uniform-t
grid (the bundles' own Plans) at 1, 2, 4, 8, 16 steps; a bundle whose 1-step student has other weights (the
additional training) adds that row. Teacher rows: EDM Heun 35 and fitted solvers at the same NFE (1: DDIM +
D-ODE; 2, 4: DPM-Solver++(2M) + timesteps + D-ODE; 8: DPM-Solver++(2M) + D-ODE; 16: DPM-Solver++(2M)).
Training wall time comes from each model's JSON. Writes benchmarks/results/cud_digits.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

STEPS = (1, 2, 4, 8, 16)
DEFAULT_RUNS = ("CUD RK2, shipped=digits-cud", "CUD none=out/cud_none_1k", "CUD RK2=out/cud_rk2_1k",
                "CUD RK3=out/cud_rk3_1k", "FM baseline=out/cud_fm_1k")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", default=None, help="NAME=BUNDLE (a catch-up bundle or digits-cud)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=2)
    ap.add_argument("--seeds", default="3", help="extra Philox seeds for the flow models at ≤ 4 steps (FD moves "
                                                "with z; the CUD-vs-baseline comparison is checked on each)")
    ap.add_argument("--no-fit", action="store_true", help="skip the fitted-solver rows")
    ap.add_argument("--note", default="", help="a line for the markdown (e.g. the shipped run's end-to-end time)")
    ap.add_argument("--reuse", action="store_true", help="keep the cells already in OUT/cud_digits.json (same n and "
                                                        "seed; a cell is its sampler name, NFE and seed) and add "
                                                        "the missing ones: runs can be measured as they finish")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # 2 shared cores: intra-op threads only contend at these sizes

    from fewstep.report import cpu_name
    from fewstep.runtime.models import SHIPPED_BUNDLES, load
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.runtime.sampling import make_inputs, run_plan
    from fewstep.runtime.solvers import build
    from fewstep.training.catchup import euler_plan
    from fewstep.training.evaluate import quality
    from fewstep.training.fit import FitConfig, fit

    teacher = load("digits")
    den = teacher.denoiser
    inputs = make_inputs(teacher, build("ddim", 1, den.sigma_min, den.sigma_max), args.n, args.seed)
    rows, spread = [], []
    extra_seeds = [int(v) for v in args.seeds.split(",") if v]
    old, train = {}, {}
    old_path = os.path.join(args.out, "cud_digits.json")
    if args.reuse and os.path.exists(old_path):
        with open(old_path) as f:
            prev = json.load(f)
        if prev["n"] == args.n and prev["seed"] == args.seed:
            old = {(r["what"], r["nfe"], r["seed"]): r for r in prev["rows"] + prev["seed_rows"]}
            train = prev["train"]

    def cell(what, kind, model, plan, seed=None, **extra):
        sd = args.seed if seed is None else seed
        if (what, plan.nfe, sd) in old:
            (rows if seed is None else spread).append(old[(what, plan.nfe, sd)])
            return old[(what, plan.nfe, sd)]
        inp = make_inputs(model, plan, args.n, sd)
        if seed is None:
            assert torch.equal(inp.z, inputs.z)  # the same z in every main cell
        t0 = time.perf_counter()
        x = run_plan(model, plan, inp)
        secs = time.perf_counter() - t0
        q = quality(teacher, x, inp, None)
        r = {"what": what, "kind": kind, "nfe": plan.nfe, "seed": sd, **q, "sample_seconds": round(secs, 2), **extra}
        (rows if seed is None else spread).append(r)
        print(f"{what:<44} seed {sd} nfe {plan.nfe:3d}  fd {q['fd_digits']:8.2f}  acc {q['class_accuracy']:.3f}  "
              f"prec {q['precision']:.3f}  rec {q['recall']:.3f}", flush=True)
        return r

    def meta(path):
        with open(path[: -len(".safetensors")] + ".json") as f:
            return json.load(f)

    t_all = time.perf_counter()
    for spec in args.run or DEFAULT_RUNS:
        name, path = spec.split("=", 1)
        bdir = SHIPPED_BUNDLES.get(path, path)
        if not os.path.exists(os.path.join(bdir, "students.json")):
            print(f"{name}: no bundle at {bdir}, skipped", file=sys.stderr)
            continue
        with open(os.path.join(bdir, "students.json")) as f:
            index = json.load(f)
        main_w = os.path.join(bdir, index["stage1"])
        one_w = os.path.join(bdir, index["students"]["1"]["weights"])
        m = load(path)
        mm = meta(main_w)
        cfg = mm["train"]
        tr = {"method": cfg["method"], "heads": cfg["heads"] if cfg["method"] == "cud" else None,
              "steps": mm["steps"], "main_seconds": mm["wall_seconds"]}
        for n in STEPS:
            cell(name, "flow", m, euler_plan(n, cfg["sigma_max"]), train_steps=mm["steps"])
        if os.path.abspath(one_w) != os.path.abspath(main_w):
            om = meta(one_w)
            tr.update(extra_steps=om["steps"], extra_seconds=om["wall_seconds"])
            cell(f"{name} + additional training", "flow-onestep", load(path, steps=1), euler_plan(1, cfg["sigma_max"]),
                 train_steps=mm["steps"], extra_steps=om["steps"])
            for sd in extra_seeds:
                cell(f"{name} + additional training", "flow-onestep", load(path, steps=1),
                     euler_plan(1, cfg["sigma_max"]), seed=sd)
        for sd in extra_seeds:
            for n in (1, 2, 4):
                cell(name, "flow", m, euler_plan(n, cfg["sigma_max"]), seed=sd)
        train[name] = tr

    cell("teacher, Heun 35", "teacher", teacher, build("heun", 35, den.sigma_min, den.sigma_max))
    if not args.no_fit:
        for n, fam, method in ((1, "ddim", "dode"), (2, "dpmpp-2m", "timesteps+dode"),
                               (4, "dpmpp-2m", "timesteps+dode"), (8, "dpmpp-2m", "dode"), (16, "dpmpp-2m", None)):
            base = build(fam, n, den.sigma_min, den.sigma_max)
            if method is None:
                cell(f"teacher {fam}", "teacher-base", teacher, base)
                continue
            if (f"teacher {fam} + {method}", n, args.seed) in old:
                cell(f"teacher {fam} + {method}", "teacher-fitted", teacher, base)  # reused: the plan is not run
                continue
            t0 = time.perf_counter()
            fitted = fit(teacher, FitConfig(solver=fam, nfe=n, method=method, seed=0))
            cell(f"teacher {fam} + {method}", "teacher-fitted", teacher, fitted,
                 fit_seconds=round(time.perf_counter() - t0, 1))

    res = {"teacher": teacher.content_hash, "n": args.n, "seed": args.seed, "extra_seeds": extra_seeds,
           "reference": "the 300 held-out real digits (FD-digits; precision / recall, k = 3, classifier features)",
           "machine": f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cpus, 1 torch thread, "
                      f"torch {torch.__version__}",
           "train": train, "note": args.note, "bench_seconds": round(time.perf_counter() - t_all, 1),
           "reused_cells": sum((r["what"], r["nfe"], r["seed"]) in old for r in rows + spread),
           "rows": rows, "seed_rows": spread}
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "cud_digits.json"), json.dumps(res, indent=1) + "\n")
    atomic_write_text(os.path.join(args.out, "cud_digits.md"), _markdown(res))
    return 0


def _fd_table(rows: list[dict], seed_label: str) -> list[str]:
    names = list(dict.fromkeys(r["what"] for r in rows))
    cols = sorted({*STEPS, *(r["nfe"] for r in rows)})
    out = [f"FD-digits by Euler steps / NFE ({seed_label}):\n", "| sampler | " + " | ".join(map(str, cols)) + " |",
           "|---|" + "---:|" * len(cols)]
    for nm in names:
        by = {r["nfe"]: r for r in rows if r["what"] == nm}
        out.append(f"| {nm} | " + " | ".join(f"{by[n]['fd_digits']:.2f}" if n in by else "" for n in cols) + " |")
    return out


def _markdown(res: dict) -> str:
    rows = res["rows"]
    lines = ["# Catch-Up Distillation: digits\n",
             f"n = {res['n']} samples per cell (classes evenly drawn), Philox seed {res['seed']} (held out: used by "
             f"no training run or fit), the same z in every cell. FD-digits, precision and recall against "
             f"{res['reference']}; class accuracy of the requested class. Flow models: Euler on the uniform-t grid "
             f"from t = 80/81 (the bundles' Plans). Machine: {res['machine']}. Generated by "
             f"`.venv/bin/python benchmarks/cud_quality.py` in {res['bench_seconds']:.0f} s" +
             (f" ({res['reused_cells']} cells reused from earlier `--reuse` invocations)" if res.get("reused_cells")
              else "") + ".\n"]
    if res.get("note"):
        lines.append(res["note"] + "\n")
    lines += ["Training (one torch thread on the shared 2-core box, other jobs running; loop wall seconds from "
              "each model's JSON, trajectory generation not included):\n",
              "| model | method | heads | steps | train s | additional steps | additional s |",
              "|---|---|---|---:|---:|---:|---:|"]
    for nm, t in res["train"].items():
        lines.append(f"| {nm} | {t['method']} | {t['heads'] or ''} | {t['steps']} | {t['main_seconds']:.0f} | "
                     f"{t.get('extra_steps', '')} | {t['extra_seconds']:.0f} |" if "extra_seconds" in t else
                     f"| {nm} | {t['method']} | {t['heads'] or ''} | {t['steps']} | {t['main_seconds']:.0f} | | |")
    lines += [""] + _fd_table(rows, f"seed {res['seed']}")
    if res.get("seed_rows"):
        lines += [""] + _fd_table(res["seed_rows"], f"seed(s) {', '.join(map(str, res['extra_seeds']))}")
    lines += ["", "All cells:\n", "| sampler | NFE | FD-digits | class acc. | precision | recall |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['what']} | {r['nfe']} | {r['fd_digits']:.2f} | {r['class_accuracy']:.3f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
