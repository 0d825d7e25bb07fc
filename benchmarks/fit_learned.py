"""Learned plans (issue 20) against the closed-form fit and the base solver, on held-out noise.

    .venv/bin/python benchmarks/fit_learned.py --model gmm
    .venv/bin/python benchmarks/fit_learned.py --model digits --solvers ddim,deis-3 --nfe 2,3,4,5,6,8,10
    .venv/bin/python benchmarks/fit_learned.py --summary        # the "best sampler per sequential calls" table

Per (family, NFE): base, closed-form best (timesteps + D-ODE, joint; ``--timestep-evals`` caps its Nelder–Mead
as in fit_digits_grid), and the plan learned from it with the L2 and the LD3 loss (``fewstep fit --method
learned`` defaults). Fitting uses Philox seed 0 (100 samples + 50 held out for early stopping); every number is
measured on ``--n`` samples of seed ``--seed`` against the reference solve from that noise. Fit seconds are
wall and CPU (process) seconds on the shared box: "closed-form" is the init, "learned" the gradient phases alone;
the learned plan's total is their sum. The fitting batch's reference solve is computed once and cached on disk
(``training/learned.py``), reported separately. Writes benchmarks/results/fit_learned_<model>.{json,md}; the
JSON is rewritten after every cell, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("base", "closed-form", "learned-l2", "learned-ld3")
# The learned columns were measured with the LearnConfig defaults of the time (before the fast default, see
# fit_learned_notes.md "Speed"); pinned so that --append measures new cells the same way (up to the loss's
# normaliser, now the init's held-out error instead of its fitting-batch error).
LEARN_FROM_CLOSED_FORM = dict(rounds=2, coef_steps=20, grid_steps=10, grid_lr=1e-2, minibatch=32, patience=None,
                              warmup=0, evals=None, lr_nfe=None, couple=False)


def _timed(fn, *a, **kw):
    t, c = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    return out, time.perf_counter() - t, time.process_time() - c


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gmm")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--nfe", default="2,3,4,5,6,8,10")
    ap.add_argument("--solvers", default="ddim,dpmpp-2m")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timestep-evals", type=int, default=60)
    ap.add_argument("--cells", help="solver:NFE,… in this order (overrides --solvers/--nfe)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--append", action="store_true", help="keep the cells already in the JSON, measure the others")
    ap.add_argument("--summary", action="store_true", help="only write fit_learned_best.md from the JSON files")
    args = ap.parse_args(argv)
    if args.summary:
        return summary(args.out)
    torch.set_num_threads(1)

    import fewstep
    from fewstep.report import machine
    from fewstep.runtime.models import load
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.runtime.sampling import make_inputs, run_plan
    from fewstep.runtime.solvers import build
    from fewstep.training.evaluate import quality
    from fewstep.training.fit import FitConfig, fit
    from fewstep.training.fitcore import make_batch
    from fewstep.training.learned import LearnConfig, cached_reference, fit_learned

    teacher = load(args.model)
    den = teacher.denoiser
    t0 = time.perf_counter()
    plan0 = build("ddim", 1, den.sigma_min, den.sigma_max)
    inputs = make_inputs(teacher, plan0, args.n, args.seed)
    hb = make_batch(teacher, args.n, args.seed, None, None)
    ref = cached_reference(teacher, hb, args.n, args.seed, None, None, plan0.sigma_init).to(torch.float32)
    ref_q = quality(teacher, ref, inputs, None)
    # the fitting batch's reference (100 + 50 held out), cached on disk for every fit below
    fb = make_batch(teacher, 150, 0, None, None)
    _, fit_ref_s, _ = _timed(lambda: cached_reference(teacher, fb, 150, 0, None, None, plan0.sigma_init))
    res = {"model": teacher.name, "teacher_hash": teacher.content_hash, "n_heldout": args.n, "heldout_seed": args.seed,
           "fit_seed": 0, "reference": ref_q, "fit_reference_seconds": fit_ref_s, "machine": machine(1),
           "fewstep": fewstep.__version__, "argv": sys.argv[1:] if argv is None else list(argv), "rows": []}
    path = os.path.join(args.out, f"fit_learned_{args.model}{args.tag}")
    done, prior = set(), 0.0
    if args.append and os.path.exists(path + ".json"):
        with open(path + ".json") as f:
            old = json.load(f)
        same = (old["n_heldout"], old["heldout_seed"], old["teacher_hash"]) == (args.n, args.seed, teacher.content_hash)
        if not same:
            raise SystemExit(f"--append: {path}.json was measured on other noise or another teacher")
        res["rows"] = old["rows"]
        res["argv"] = old["argv"] + ["+"] + res["argv"]
        res["fit_reference_seconds"] = old["fit_reference_seconds"]
        done, prior = {(r["solver"], r["nfe"]) for r in old["rows"]}, old.get("seconds", 0.0)
    if args.cells:
        cells = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
    else:
        cells = [(s, int(n)) for s in args.solvers.split(",") for n in args.nfe.split(",")]
    for solver, nfe in cells:
        if (solver, nfe) in done:
            continue
        base = build(solver, nfe, den.sigma_min, den.sigma_max)
        cf_cfg = FitConfig(solver, nfe, "timesteps+dode", timestep_evals=args.timestep_evals)
        cf, cf_w, cf_c = _timed(fit, teacher, cf_cfg)
        plans = {"base": (base, 0.0, 0.0, {}), "closed-form": (cf, cf_w, cf_c, {})}
        for loss in ("l2", "ld3"):
            lp, w, c = _timed(fit_learned, teacher, solver, nfe, LearnConfig(loss=loss, **LEARN_FROM_CLOSED_FORM),
                                 init=cf)
            pv = lp.provenance
            plans[f"learned-{loss}"] = (lp, w, c, {k: pv[k] for k in ("winner", "heldout_rmse_init",
                                                                     "heldout_rmse", "best_phase", "steps")})
        for m, (plan, w, c, extra) in plans.items():
            x = run_plan(teacher, plan, inputs)
            q = quality(teacher, x, inputs, ref)
            row = {"solver": solver, "nfe": nfe, "method": m, **q, "fit_wall_seconds": w, "fit_cpu_seconds": c,
                   "history": plan.history, **extra}
            res["rows"].append(row)
            print(f"{args.model} {solver:9s} NFE {nfe:2d} {m:12s} " + " ".join(
                f"{k} {v:.4g}" for k, v in q.items()) + f" fit {w:.1f}s wall {c:.1f}s cpu "
                f"{extra.get('winner', '')}", flush=True)
        res["seconds"] = prior + time.perf_counter() - t0
        atomic_write_text(path + ".json", json.dumps(res, indent=1) + "\n")
        atomic_write_text(path + ".md", markdown(res))
    print(f"-> {path}.json/.md in {res['seconds']:.0f} s")
    return 0


def markdown(res: dict) -> str:
    digits = res["model"] == "digits"
    m2 = "fd_digits" if digits else "sliced_w2"
    lines = [f"# Learned plans on {res['model']} (held-out noise seed {res['heldout_seed']}, {res['n_heldout']} "
             f"samples; fitted on seed {res['fit_seed']})", "",
             "Reference solve from the same noise: "
             f"{json.dumps({k: round(v, 4) for k, v in res['reference'].items()})}."
             f" Machine: {res['machine']['cpu']}, 1 torch thread, shared with other jobs (wall seconds vary with "
             f"load; CPU seconds less). Fitting-batch reference solve (150 samples, once, cached on disk): "
             f"{res['fit_reference_seconds']:.1f} s. Generated by " + ", then ".join(
                 f"`.venv/bin/python benchmarks/fit_learned.py {c.strip()}`" for c in " ".join(res["argv"]).split("+"))
             + f" ({res.get('seconds', 0):.0f} s in all).", "",
             "Endpoint RMSE vs the reference (lower is better; best in **bold**) and "
             f"{'FD-digits' if digits else 'sliced W2'}:", "",
             "| solver | NFE | " + " | ".join(METHODS) + " | " + " | ".join(METHODS) + " |",
             "|---|---:|" + "---:|" * (2 * len(METHODS))]
    by: dict = {}
    for r in res["rows"]:
        by.setdefault((r["solver"], r["nfe"]), {})[r["method"]] = r
    for (s, n), d in by.items():
        best = min(d, key=lambda m: d[m]["rmse_vs_reference"])
        rm = [(f"**{d[m]['rmse_vs_reference']:.4f}**" if m == best else f"{d[m]['rmse_vs_reference']:.4f}")
              if m in d else "–" for m in METHODS]
        q2 = [f"{d[m][m2]:.3f}" if m in d else "–" for m in METHODS]
        lines.append(f"| {s} | {n} | " + " | ".join(rm) + " | " + " | ".join(q2) + " |")
    lines += ["", "Fit seconds, wall / CPU (closed-form = the init; learned = the gradient phases alone, add the "
              "closed-form seconds for the whole `fewstep fit --method learned`), and which plan the held-out split "
              "kept:", "",
              "| solver | NFE | closed-form | learned L2 | kept | learned LD3 | kept |",
              "|---|---:|---:|---:|---|---:|---|"]

    def sec(d, m):
        return f"{d[m]['fit_wall_seconds']:.1f} / {d[m]['fit_cpu_seconds']:.1f}" if m in d else "–"

    for (s, n), d in by.items():
        lines.append(f"| {s} | {n} | {sec(d, 'closed-form')} | {sec(d, 'learned-l2')} | "
                     f"{d.get('learned-l2', {}).get('winner', '–')} | {sec(d, 'learned-ld3')} | "
                     f"{d.get('learned-ld3', {}).get('winner', '–')} |")
    if any("precision" in r for r in res["rows"]):
        lines += ["", "Precision / recall (k-NN manifolds, Kynkäänniemi et al. 2019, as `fewstep eval` reports them):",
                  "",
                  "| solver | NFE | " + " | ".join(METHODS) + " |", "|---|---:|" + "---:|" * len(METHODS)]
        for (s, n), d in by.items():
            pr = [f"{d[m]['precision']:.3f} / {d[m]['recall']:.3f}" if "precision" in d.get(m, {}) else "–"
                  for m in METHODS]
            lines.append(f"| {s} | {n} | " + " | ".join(pr) + " |")
    return "\n".join(lines) + "\n"


def summary(out: str) -> int:
    """The best sampler at each number of sequential network calls on digits: fitted plans (this benchmark and
    fit_digits_grid) and the distilled students (distill_digits)."""
    from fewstep.runtime.plan import atomic_write_text

    def load(name):
        p = os.path.join(out, name)
        return json.load(open(p)) if os.path.exists(p) else None

    lf, grid, dist = load("fit_learned_digits.json"), load("fit_digits_grid.json"), load("distill_digits.json")
    cands: dict = {}

    def add(calls, what, rmse, fd, fd0, src):
        cands.setdefault(calls, []).append((what, rmse, fd, fd - fd0, src))

    if lf:
        src = f"fit_learned_digits ({lf['n_heldout']})"
        for r in lf["rows"]:
            add(r["nfe"], f"{r['solver']} {r['method']}", r["rmse_vs_reference"], r["fd_digits"],
                lf["reference"]["fd_digits"], src)
    if grid:
        src = f"fit_digits_grid ({grid['n_heldout']})"
        for r in grid["rows"]:
            if "method" in r and "error" not in r and r["method"] != "base":
                add(r["nfe"], f"{r['solver']} {r['method']}", r["rmse_vs_reference"], r["fd_digits"],
                    grid["reference"]["fd_digits"], src)
    if dist:
        src = f"distill_digits ({dist['n']})"
        fd0 = next(r["fd_digits"] for r in dist["rows"] if r.get("kind") == "teacher" and r.get("guidance") == 1.0)
        for r in dist["rows"]:  # the students, and the solvers on the teacher measured beside them
            if r.get("guidance") == 1.0 and r["sequential_calls"] <= 10:
                add(r["sequential_calls"], r["what"], r["rmse_vs_reference"], r["fd_digits"], fd0, src)
    dmd = load("dmd2_digits.json")
    if dmd:  # DMD2 students match the distribution, not the ODE: FD only (their file has no RMSE)
        src = f"dmd2_digits ({dmd['n']})"
        fd0 = next(r["fd_digits"] for r in dmd["rows"] if r.get("kind") == "teacher")
        for r in dmd["rows"]:
            if r.get("kind") in ("dmd2", "progressive"):
                add(r["sequential_calls"], r["what"], r.get("rmse_vs_reference"), r["fd_digits"], fd0, src)
    cud = load("cud_digits.json")
    if cud:  # catch-up distillation (flow students, Euler): FD against the 300 held-out digits, gap to Heun 35
        src = f"cud_digits ({cud['n']})"
        fd0 = next(r["fd_digits"] for r in cud["rows"] if r.get("kind") == "teacher")
        for r in cud["rows"]:
            if r.get("kind") in ("flow", "flow-onestep"):
                add(r["nfe"], f"CUD/flow student {r['what']}", None, r["fd_digits"], fd0, src)
    speed = load("fit_learned_speed_defaults.json")
    if speed and lf:  # the fast default fit, scored on the same 1000 noises as fit_learned_digits
        src = f"fit_learned_speed_defaults ({speed.get('test_n')})"
        for r in speed["rows"]:
            if r["what"] == "fit_learned (defaults)" and "test" in r and speed.get("test_n") == lf["n_heldout"]:
                add(r["nfe"], f"{r['solver']} learned (fast init)", r["test"]["rmse_vs_reference"],
                    r["test"]["fd_digits"], lf["reference"]["fd_digits"], src)
    sweep = load("fit_learned_sweep.json")
    if sweep and lf and sweep.get("test_n") == lf["n_heldout"]:
        # the sweep's configurations on the same 1000 test noises; fit seed 0 only, as every other row here (the
        # sweep's other seeds show the spread, and taking the best seed would pick the luckiest draw)
        src = f"fit_learned_sweep ({sweep['test_n']})"
        for r in sweep["rows"]:
            if r["seed"] == 0:
                opt = r.get("optimizer_used") or "pre-LM"
                add(r["nfe"], f"{r['solver']} learned ({opt}: {r['spec'].split(':', 2)[-1] or 'defaults'})",
                    r["test"]["rmse_vs_reference"], r["test"]["fd_digits"], sweep["reference_fd"], src)
    lines = ["# Digits: the best sampler at each number of sequential network calls", "",
             "Across the fitted plans (`fit_learned_digits.json`, `fit_digits_grid.json`) and the distilled students "
             "(`distill_digits.json`, W = 1; `dmd2_digits.json`, FD only, noise seed 2; `cud_digits.json` when "
             "present, FD only), the fast default learned fit (`fit_learned_speed_defaults.json`; before the LM "
             "optimizer) and the learned-plan sweep (`fit_learned_sweep.json`, fit seed 0 rows; `lm` = the default "
             "since Levenberg–Marquardt, `pre-LM` = configurations fitted before it). The rest are "
             "measured on held-out noise seed 1 against the RK4 reference from the same noise, on different sample "
             "counts (in brackets); distill_digits' students against the guided teacher's reference at W = 1 (the same"
             " ODE as the conditional teacher's). FD-digits is biased upward on fewer samples (the reference solve "
             "scores 6.95 on 1000, 7.78 on 300), so FD is compared as the gap to the reference in the same file "
             "(students: to the teacher's Heun-35 in that file). Generated by `.venv/bin/python "
             "benchmarks/fit_learned.py "
             "--summary`.", "",
             "| calls | best by RMSE | RMSE | FD (gap) | source | best by FD gap | FD (gap) | RMSE | source "
             "| best student by FD gap: RMSE, FD (gap), source |",
             "|---:|---|---:|---:|---|---|---:|---:|---|---|"]
    for calls in sorted(cands):
        if calls > 10:
            continue
        cs = cands[calls]
        br = min((c for c in cs if c[1] is not None), key=lambda c: c[1])
        bf = min(cs, key=lambda c: c[3])
        st = [c for c in cs if "student" in c[0] or c[0].startswith("DMD2")]
        bs = min(st, key=lambda c: c[3]) if st else None
        stud = (f"{bs[0]}: {'–' if bs[1] is None else f'{bs[1]:.4f}'}, {bs[2]:.2f} ({bs[3]:+.2f}), {bs[4]}" if bs
                else "none at this count")
        bfr = "–" if bf[1] is None else f"{bf[1]:.4f}"
        lines.append(f"| {calls} | {br[0]} | {br[1]:.4f} | {br[2]:.2f} ({br[3]:+.2f}) | {br[4]} | {bf[0]} | "
                     f"{bf[2]:.2f} ({bf[3]:+.2f}) | {bfr} | {bf[4]} | {stud} |")
    atomic_write_text(os.path.join(out, "fit_learned_best.md"), "\n".join(lines) + "\n")
    print("-> " + os.path.join(out, "fit_learned_best.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
