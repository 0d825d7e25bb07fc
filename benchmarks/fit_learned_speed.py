"""Where a learned-plan fit's time goes, and side-by-side configurations of it (issue 20's "≤ 10 s" target).

    .venv/bin/python benchmarks/fit_learned_speed.py --model digits --cells dpmpp-2m:2,dpmpp-2m:4,dpmpp-2m:10

Per cell, in one process and one after the other (so under the same load), ``--reps`` times each: the inits
(``fast``: heuristic grid + D-ODE on 16 samples; ``dode``: D-ODE on 100) and the gradient phases from the fast
init with the old defaults and the new ones. Reported: median CPU seconds (time.process_time, one torch thread)
and wall seconds — the box is shared by several engineers, so wall is 2–3× CPU — and the held-out RMSE (the 50
samples after the 100 fitting ones; lower is better). ``--profile`` adds a cProfile of one gradient run: time in
the network's forward, in autograd's backward, and the rest. Writes benchmarks/results/fit_learned_speed<tag>.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from functools import partial
from types import SimpleNamespace

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

PHASES = {  # name → LearnConfig fields
    "old phases": dict(rounds=2, coef_steps=20, grid_steps=10, lr=2e-2, grid_lr=1e-2, minibatch=32, patience=None,
                       warmup=0, evals=None, lr_nfe=None, couple=False),
    "new phases": dict(),
}

# ``--variants``: end-to-end fits (``fit_learned`` from the fast init) with these LearnConfig fields changed,
# side by side with the defaults (name "default") in one process, each scored on the ``--test`` noises.
VARIANTS = {
    "default": dict(),
    "patience3": dict(patience=3),
    "cosine": dict(lr_decay="cosine"),
    "rounds-decay": dict(lr_decay="rounds"),
    "rounds-decay+p3": dict(lr_decay="rounds", patience=3),
    "spread0.5": dict(spread=0.5),
    "spread1": dict(spread=1.0),
    "spread2": dict(spread=2.0),
    "ld3": dict(loss="ld3"),
    "ld3-slack0.1": dict(loss="ld3", slack=0.1),
    "ld3+spread1": dict(loss="ld3", spread=1.0),
    "lbfgs": dict(optimizer="lbfgs"),
    "auto": dict(optimizer="auto"),
    "auto+p3": dict(optimizer="auto", patience=3),
    # what the phases reach from the fast init, unbudgeted (budget: None since the 10 s default)
    "long": dict(evals=None, patience=None, rounds=6, budget=None),
    "long-k3": dict(evals=None, patience=None, rounds=6, budget=None, history=3),
    "mb8": dict(minibatch=8),  # the same evaluations as twice as many steps
    "mb8-r4": dict(minibatch=8, rounds=4),
    "mb8-r6": dict(minibatch=8, rounds=6),
    "lbfgs+p3": dict(optimizer="lbfgs", patience=3),
    "grid-first": dict(grid_first=True),
    "grid-first+p3": dict(grid_first=True, patience=3),
    "ld3+p3": dict(loss="ld3", patience=3),
    "spread0.5+p3": dict(spread=0.5, patience=3),
    "alternate": dict(joint_below=0),  # every round: a coefficient phase, then a grid phase
    "joint4": dict(joint_below=4),  # one joint phase per round where the budget leaves phases of < 4 steps
    "joint5": dict(joint_below=5),
    "nobudget": dict(budget=None),  # the defaults before the wall-clock budget default
    "k3": dict(history=3),
    "evals2400": dict(evals=2400),
    "evals2400-k3": dict(evals=2400, history=3),
    "p3": dict(patience=3),
}


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _profile(fn) -> dict:
    """CPU-side split of ``fn``: network forward (the denoiser's forward), backward, everything else."""
    prof = cProfile.Profile(time.process_time)
    prof.runcall(fn)
    st = pstats.Stats(prof)
    total = st.total_tt
    fwd = bwd = 0.0
    for (file, _, name), (_, _, _, ct, _) in st.stats.items():
        if name == "forward" and "denoisers.py" in file:
            fwd = max(fwd, ct)
        if name == "backward" and file.endswith("_tensor.py"):
            bwd += ct
    return {"total": total, "network_forward": fwd, "backward": bwd, "rest": total - fwd - bwd}


def _runs(ctx, fn) -> tuple:
    """(first result, median wall, median CPU) over ``ctx.reps`` runs."""
    runs = [_timed(fn) for _ in range(ctx.reps)]
    return runs[0][0], statistics.median(r[1] for r in runs), statistics.median(r[2] for r in runs)


def _cell(ctx, solver: str, nfe: int, profile: bool) -> list[dict]:
    from fewstep.runtime.sampling import run_plan
    from fewstep.training.evaluate import quality
    from fewstep.training.fit import FitConfig, fit
    from fewstep.training.fitcore import rms, run
    from fewstep.training.learned import LearnConfig, fast_init, fit_learned, learn

    t, den = ctx.teacher, ctx.den
    key = (t.content_hash, 100, 0, None, None, ctx.sig0)
    rows = []

    def emit(row):
        rows.append({"solver": solver, "nfe": nfe, **row})
        print(json.dumps(rows[-1]), flush=True)

    if ctx.variants:
        for seed in ctx.fit_seeds:
            for name in ctx.variants:
                kw = VARIANTS[name]
                plan, w, c = _runs(ctx, partial(fit_learned, t, solver, nfe, LearnConfig(**kw), seed=seed))
                pv = plan.provenance
                row = {"what": f"variant {name}", "config": kw, "fit_seed": seed, "wall": w, "cpu": c,
                       "heldout_rmse": pv["heldout_rmse"], "heldout_rmse_init": pv["heldout_rmse_init"],
                       "winner": pv["winner"], "steps": pv["steps"], "best_phase": pv["best_phase"],
                       "init_wall": pv["init_seconds"], "learn_wall": pv["learn_seconds"],
                       "out_of_budget": pv["out_of_budget"], "loadavg_1min": os.getloadavg()[0]}
                if ctx.test is not None:
                    row["test"] = quality(t, run_plan(t, plan, ctx.test[0]), ctx.test[0], ctx.test[1])
                emit(row)
        return rows
    if ctx.e2e_only:
        inits, phases = {}, {}
    else:
        phases = PHASES
        inits = {"fast": lambda: fast_init(solver, nfe, den, ctx.train, ctx.ref)[0],
                 "dode": lambda: fit(t, FitConfig(solver, nfe, "dode"), cache={key: (ctx.train, ctx.ref)})}
    got = {}
    for name, fn in inits.items():
        got[name], w, c = _runs(ctx, fn)
        err = rms(run(got[name], den, ctx.held), ctx.href)
        emit({"what": f"init {name}", "wall": w, "cpu": c, "heldout_rmse": err})
    for name, kw in phases.items():
        cfg = LearnConfig(**kw)
        (_, info), w, c = _runs(ctx, partial(learn, got["fast"], den, ctx.train, ctx.ref, ctx.held, ctx.href, cfg,
                                             family=solver if cfg.couple else None))
        emit({"what": name, "wall": w, "cpu": c, "heldout_rmse": info["heldout_rmse"],
              "heldout_rmse_init": info["heldout_rmse_init"], "steps": info["steps"],
              "best_phase": info["best_phase"], "config": kw})
    # end to end, as `fewstep fit --method learned` runs it (the fitting batch's reference is cached on disk)
    plan, w, c = _runs(ctx, lambda: fit_learned(t, solver, nfe))
    pv = plan.provenance
    row = {"what": "fit_learned (defaults)", "wall": w, "cpu": c, "heldout_rmse": pv["heldout_rmse"],
           "heldout_rmse_init": pv["heldout_rmse_init"], "winner": pv["winner"], "steps": pv["steps"]}
    if ctx.test is not None:
        row["test"] = quality(t, run_plan(t, plan, ctx.test[0]), ctx.test[0], ctx.test[1])
    emit(row)
    if profile and "fast" in got:
        emit({"what": "profile new phases", **_profile(lambda: learn(got["fast"], den, ctx.train, ctx.ref, ctx.held,
                                                                     ctx.href, LearnConfig(), family=solver))})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--cells", default="dpmpp-2m:2,dpmpp-2m:4,dpmpp-2m:10")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--test", type=int, default=0, help="also score the end-to-end plan on this many samples of seed 1")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end default fit")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--variants", default="", help="only end-to-end fits with these VARIANTS, comma-separated")
    ap.add_argument("--fit-seeds", default="0", help="--variants: fit on these noise seeds (not --test's seed 1)")
    ap.add_argument("--warm", action="store_true",
                    help="one unrecorded 2-NFE fit first, so the first recorded fit pays no one-time imports")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from fewstep.runtime.models import load
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.runtime.sampling import make_inputs
    from fewstep.runtime.solvers import build
    from fewstep.training.fitcore import make_batch
    from fewstep.training.learned import _split, cached_reference

    teacher = load(args.model)
    den = teacher.denoiser
    full = make_batch(teacher, 150, 0, None, None)
    sig0 = build("ddim", 1, den.sigma_min, den.sigma_max).sigma_init
    fref, rw, rc = _timed(lambda: cached_reference(teacher, full, 150, 0, None, None, sig0))
    train, held = _split(full, slice(0, 100)), _split(full, slice(100, 150))
    ref, href = fref[:100], fref[100:]
    test = None
    if args.test:
        inputs = make_inputs(teacher, build("ddim", 1, den.sigma_min, den.sigma_max), args.test, 1)
        tref = cached_reference(teacher, make_batch(teacher, args.test, 1, None, None), args.test, 1, None, None, sig0)
        test = (inputs, tref.to(torch.float32))
    import fewstep

    res = {"model": teacher.name, "fewstep_path": os.path.dirname(fewstep.__file__), "test_n": args.test,
           "reference_seconds": [rw, rc], "reps": args.reps, "rows": [],
           "argv": sys.argv[1:] if argv is None else list(argv)}
    ctx = SimpleNamespace(teacher=teacher, den=den, train=train, held=held, ref=ref, href=href, sig0=sig0,
                          reps=args.reps, test=test, e2e_only=args.e2e_only,
                          variants=[v for v in args.variants.split(",") if v],
                          fit_seeds=[int(v) for v in args.fit_seeds.split(",")])
    if args.test and 1 in ctx.fit_seeds:
        raise SystemExit("--fit-seeds: seed 1 is the test noise")
    bad = [v for v in ctx.variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown --variants {', '.join(bad)} (known: {', '.join(VARIANTS)})")
    if args.warm:
        from fewstep.training.learned import fit_learned

        fit_learned(teacher, "ddim", 2)
    for cell in args.cells.split(","):
        res["rows"] += _cell(ctx, cell.split(":")[0], int(cell.split(":")[1]), args.profile)
        atomic_write_text(os.path.join(args.out, f"fit_learned_speed{args.tag}.json"), json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
