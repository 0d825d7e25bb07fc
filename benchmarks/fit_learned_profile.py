"""Where a default learned fit's time goes (issue 20, "≤ 10 s at every NFE ≤ 10"): CPU seconds per part.

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/fit_learned_profile.py --cells dpmpp-2m:8,dpmpp-2m:10 \
        --tag _new

One warmed process (imports done, model loaded, one 2-NFE fit run first, the fitting batch's reference solve on
disk). Each fit is ``fit_learned(teacher, solver, nfe, LearnConfig(budget=None))`` — no wall-clock budget, so the
work is what the defaults plan — with process-time counters around its parts: the fast init (of it: the D-ODE
teacher's fine run, the D-ODE fit, the grid trials), the gradient phases (of them: the network's forward and
backward through ``run_rows``), the held-out checks (the start's included), the grid coupling. Run with
PYTHONPATH at a checkout of an older commit to profile that code (parts it lacks are reported as absent). Writes
benchmarks/results/fit_learned_profile<tag>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--cells", default="dpmpp-2m:8,ddim:8,dpmpp-2m:10,ddim:10")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import fewstep
    from fewstep.runtime.models import load
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.training import dode, learned

    counters: dict[str, float] = {}
    calls: dict[str, int] = {}

    def wrap(owner, name: str, key: str) -> None:
        f = getattr(owner, name, None)
        if f is None:
            return

        @functools.wraps(f)
        def timed(*a, **k):
            c0 = time.process_time()
            try:
                return f(*a, **k)
            finally:
                counters[key] = counters.get(key, 0.0) + time.process_time() - c0
                calls[key] = calls.get(key, 0) + 1

        setattr(owner, name, timed)

    wrap(learned, "fast_init", "init")
    wrap(dode, "teacher_states", "init: D-ODE teacher run")
    wrap(dode, "fit_dode", "init: D-ODE fit (teacher run included)")
    wrap(learned, "_run_many", "init: grid trials (side by side)")
    wrap(learned, "_phase", "gradient phases")
    wrap(learned._Objective, "__call__", "gradient phases: forward")
    wrap(torch.Tensor, "backward", "gradient phases: backward")
    wrap(learned._Heldout, "__call__", "held-out checks (after phases)")
    wrap(learned._Params, "couple", "grid coupling")
    wrap(learned, "traced_denoiser", "tracing the network")

    teacher = load(args.model)
    learned.fit_learned(teacher, "ddim", 2)
    cfg = learned.LearnConfig(budget=None) if "budget" in learned.LearnConfig.__dataclass_fields__ \
        else learned.LearnConfig()
    res = {"model": teacher.name, "fewstep_path": os.path.dirname(fewstep.__file__), "config": str(cfg),
           "argv": sys.argv[1:] if argv is None else list(argv), "rows": []}
    for cell in args.cells.split(","):
        solver, nfe = cell.split(":")[0], int(cell.split(":")[1])
        counters.clear()
        calls.clear()
        c0, w0 = time.process_time(), time.perf_counter()
        plan = learned.fit_learned(teacher, solver, nfe, cfg)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        pv = plan.provenance
        # the start's held-out check runs inside ``learn`` before the phases: the endpoint of 50 held-out samples,
        # as long as one check after a phase; counted with them
        checks = calls.get("held-out checks (after phases)", 0)
        row = {"solver": solver, "nfe": nfe, "cpu": cpu, "wall": wall, "steps": pv["steps"],
               "phases": len(pv["phases"]) - 1, "heldout_rmse": pv["heldout_rmse"],
               "parts_cpu": dict(counters), "calls": dict(calls), "checks_after_phases": checks,
               "loadavg_1min": os.getloadavg()[0]}
        accounted = counters.get("init", 0) + counters.get("gradient phases", 0) + \
            counters.get("held-out checks (after phases)", 0) + counters.get("grid coupling", 0) + \
            counters.get("tracing the network", 0)
        row["rest_cpu"] = cpu - accounted  # batch, cached reference, the start's held-out check, provenance
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
        atomic_write_text(os.path.join(args.out, f"fit_learned_profile{args.tag}.json"), json.dumps(res, indent=1)
                          + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
