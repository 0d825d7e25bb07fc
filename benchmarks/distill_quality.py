"""Distilled students (issue 7) against the guided teacher and fitted solvers, on digits.

    .venv/bin/python benchmarks/distill_quality.py                 # the shipped digits-guided bundle
    .venv/bin/python benchmarks/distill_quality.py --model DIR      # a bundle from `fewstep distill progressive`

For each guidance scale W: the guided teacher (classifier-free guidance, EDM Heun at 35 NFE: two
network evaluations per step, one batched call), every student (1, 2, 4, 8 steps; deterministic
and stochastic samplers: one evaluation per step), and on the teacher at the same number of
*sequential calls* (each a CFG call of two evaluations) the base DDIM / DPM-Solver++(2M) and their
D-ODE fits at W. FD-digits against the 300 held-out digits, class accuracy of the requested
class, and RMSE against the teacher's high-accuracy guided solve (RK4, 96 calls) from the same z.
Same z (Philox seed), same labels (classes evenly drawn) in every cell. Writes
benchmarks/results/distill_digits.{json,md,png}.
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
    ap.add_argument("--model", default="digits-guided", help="digits-guided | a bundle directory")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--guidance", default="1,2,4")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-fit", action="store_true", help="skip the fitted-solver rows")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # 2 shared cores: intra-op threads only contend at these sizes

    from fewstep.report import cpu_name
    from fewstep.runtime.models import bundle_steps, load
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.runtime.reference import reference
    from fewstep.runtime.sampling import make_inputs, run_plan
    from fewstep.runtime.solvers import build
    from fewstep.training.evaluate import quality
    from fewstep.training.fit import FitConfig, fit

    teacher = load("digits")
    den = teacher.denoiser
    steps = bundle_steps(args.model)
    if not steps:
        print(f"{args.model}: no distilled students found", file=sys.stderr)
        return 2
    students = {n: load(args.model, steps=n) for n in steps}
    stage1 = load(args.model)
    ws = [float(v) for v in args.guidance.split(",")]
    plan0 = build("ddim", 1, den.sigma_min, den.sigma_max)
    inputs = make_inputs(teacher, plan0, args.n, args.seed)  # z and labels shared by every cell
    rows = []

    def cell(what, kind, t, plan, w, calls, evals, fit_s=None):
        inp = make_inputs(t, plan, args.n, args.seed)  # same z (Philox stream 0); noise for stochastic rows
        assert torch.equal(inp.z, inputs.z)
        t0 = time.perf_counter()
        x = run_plan(t, plan, inp, None if w == 1.0 else w)
        secs = time.perf_counter() - t0
        q = quality(teacher, x, inp, refs[w])
        r = {"what": what, "kind": kind, "guidance": w, "steps": plan.nfe, "sequential_calls": calls,
             "network_evals": evals, **q, "sample_seconds": round(secs, 2)}
        if fit_s is not None:
            r["fit_seconds"] = round(fit_s, 1)
        rows.append(r)
        print(f"W={w:g} {what:<34} calls {calls:3d} evals {evals:3d}  fd {q['fd_digits']:7.2f}  "
              f"acc {q['class_accuracy']:.3f}  rmse {q['rmse_vs_reference']:.4f}", flush=True)

    refs = {}
    t_all = time.perf_counter()
    for w in ws:
        refs[w] = reference(teacher, inputs, plan0.sigma_init, None if w == 1.0 else w)
        heun = build("heun", 35, den.sigma_min, den.sigma_max)
        cell("teacher, Heun 35 NFE (CFG)", "teacher", teacher, heun, w, 35, 35 if w == 1.0 else 70)
        for n in steps:
            s = students[n]
            cell(f"student {n} steps", "student", s, s.plans["deterministic"], w, n, n)
            if n > 1:
                cell(f"student {n} steps, stochastic", "student-stochastic", s, s.plans["stochastic"], w, n, n)
        cell("stage-1 student, Heun 35 NFE", "stage1", stage1, heun, w, 35, 35)
        if args.no_fit:
            continue
        for n in steps:
            ev = n if w == 1.0 else 2 * n
            for fam in ("ddim", "dpmpp-2m"):
                if fam == "dpmpp-2m" and n == 1:
                    continue  # one step of DPM-Solver++(2M) is DDIM
                base = build(fam, n, den.sigma_min, den.sigma_max)
                cell(f"teacher {fam} {n} (base)", "base", teacher, base, w, n, ev)
                t0 = time.perf_counter()
                fitted = fit(teacher, FitConfig(fam, n, "dode", guidance=None if w == 1.0 else w, seed=0))
                cell(f"teacher {fam} {n} + D-ODE", "fitted", teacher, fitted, w, n, ev, time.perf_counter() - t0)

    meta = json.loads(open(os.path.join(_bundle_dir(args.model), "students.json")).read())
    train = _train_seconds(args.model, meta)
    res = {"model": args.model, "teacher": teacher.content_hash, "n": args.n, "seed": args.seed,
           "reference": "teacher RK4 24 steps (96 CFG calls) at W from the same z",
           "machine": f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cpus, 1 torch thread, "
                      f"torch {torch.__version__}",
           "train_seconds": train, "bench_seconds": round(time.perf_counter() - t_all, 1), "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    atomic_write_text(os.path.join(args.out, "distill_digits.json"), json.dumps(res, indent=1) + "\n")
    atomic_write_text(os.path.join(args.out, "distill_digits.md"), _markdown(res))
    _plot(res, os.path.join(args.out, "distill_digits.png"))
    return 0


def _bundle_dir(model: str) -> str:
    from fewstep.runtime.models import SHIPPED_BUNDLES

    return SHIPPED_BUNDLES.get(model, model)


def _train_seconds(model: str, index: dict) -> dict:
    d = _bundle_dir(model)
    out = {}
    with open(os.path.join(d, index["stage1"][: -len(".safetensors")] + ".json")) as f:
        out["stage1_guided"] = json.load(f)["wall_seconds"]
    for n, ent in index["students"].items():
        with open(os.path.join(d, ent["weights"][: -len(".safetensors")] + ".json")) as f:
            out[f"halving_to_{n}"] = json.load(f)["wall_seconds"]
    return out


def _markdown(res: dict) -> str:
    tr = res["train_seconds"]
    total = sum(tr.values())
    lines = ["# Distilled students: digits, guided\n",
             f"Model `{res['model']}`; n = {res['n']} samples (classes evenly drawn), Philox seed {res['seed']}, "
             f"the same z in every cell. FD-digits against the 300 held-out real digits, class accuracy of the "
             f"requested class, RMSE against the {res['reference']}. `calls` = sequential network calls (a CFG "
             f"call is one batched call of two evaluations), `evals` = network evaluations. Machine: "
             f"{res['machine']}. Generated by `.venv/bin/python benchmarks/distill_quality.py` in "
             f"{res['bench_seconds']:.0f} s.\n",
             f"Training wall time (one torch thread on the shared 2-core box): stage 1 (guided) "
             f"{tr['stage1_guided']:.0f} s, halvings " +
             ", ".join(f"→{k.split('_')[-1]}: {v:.0f} s" for k, v in tr.items() if k != "stage1_guided") +
             f"; total {total:.0f} s ({total / 60:.1f} min).\n"]
    for w in sorted({r["guidance"] for r in res["rows"]}):
        lines += [f"\n## W = {w:g}\n", "| sampler | calls | evals | FD-digits | class acc. | RMSE vs ref |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            if r["guidance"] == w:
                lines.append(f"| {r['what']} | {r['sequential_calls']} | {r['network_evals']} | "
                             f"{r['fd_digits']:.2f} | {r['class_accuracy']:.3f} | {r['rmse_vs_reference']:.4f} |")
    return "\n".join(lines) + "\n"


def _plot(res: dict, path: str) -> None:
    from fewstep.report import save_plot

    ws = sorted({r["guidance"] for r in res["rows"]})

    def draw(fig, axes):
        for ax, w in zip(axes[0], ws):
            rs = [r for r in res["rows"] if r["guidance"] == w]
            for kind, style in (("student", "o-"), ("student-stochastic", "s--"), ("base", "x:"), ("fitted", "^-.")):
                pts = {}
                for r in rs:
                    if r["kind"] == kind:
                        c = r["sequential_calls"]
                        pts[c] = min(pts.get(c, float("inf")), r["fd_digits"])
                if pts:
                    xs = sorted(pts)
                    ax.plot(xs, [pts[x] for x in xs], style, label=kind if kind != "base" else "teacher base (best)")
            t = [r for r in rs if r["kind"] == "teacher"]
            if t:
                ax.axhline(t[0]["fd_digits"], color="k", lw=0.8, label="teacher Heun 35")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequential network calls")
            ax.set_ylabel("FD-digits")
            ax.set_title(f"W = {w:g}")
            ax.legend(fontsize=7)

    save_plot(path, draw, figsize=(5 * len(ws), 4), ncols=len(ws), dpi=90)


if __name__ == "__main__":
    sys.exit(main())
