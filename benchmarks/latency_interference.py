"""Does `fewstep bench latency` measure each path alone? The same harness with and without its idle gap,
and with ONNX Runtime's spinning on and off.

After a run, ONNX Runtime's intra-op workers spin waiting for more work; a path timed right after it (the
eager executor, say) then shares its cores with them. ``fewstep.runtime.run_cli.latency`` waits
``gap_ms`` before every timed call; ``spinning=False`` sets ``session.intra_op.allow_spinning = 0`` on the
Python ONNX Runtime sessions (the C++ runtime keeps ONNX Runtime's default, spinning on). This runs the
harness under each setting on digits / DPM-Solver++(2M) NFE 4 at 2 threads (where spinning threads take a
core the next path needs) and writes the medians side by side.

    .venv/bin/python benchmarks/latency_interference.py [--batch 16] [--threads 2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SETTINGS = [(0.0, True), (0.0, False), (100.0, True), (100.0, False)]  # (gap ms, ORT spinning)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="W values (default 1)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.runtime.run_cli import latency
    from fewstep.runtime.solvers import build
    from fewstep.training.teachers import load

    den = load("digits").denoiser
    plan = build("dpmpp-2m", 4, den.sigma_min, den.sigma_max)
    runs = []
    for gap, spin in SETTINGS:
        r = latency("digits", plan, args.batch, args.repeats, args.threads, gap_ms=gap, spinning=spin,
                    guidance=args.guidance)
        runs.append(r)
        print(json.dumps({"gap_ms": gap, "spinning": spin, **{w: x["median_us"] for w, x in r["by_guidance"].items()}}),
              flush=True)
    m = runs[-1]["machine"]
    lines = ["# Latency harness: interference between paths", "",
             f"{m['cpu']}, {m['cores']} cores shared with other jobs (load average {m['load_average'][0]:.1f} at "
             f"the end); digits / {plan.name}, batch {args.batch}, {args.threads} threads for ONNX Runtime and "
             f"torch; {args.repeats} interleaved rounds per setting (the order rotates each round); medians in ms. "
             "Spinning off applies to the Python ONNX Runtime sessions; the C++ runtime keeps ONNX Runtime's "
             "default (spinning on).", "",
             "| idle gap | ORT spinning | W | eager executor | ORT from Python | C++ runtime | C++ ÷ executor |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in runs:
        for w, x in r["by_guidance"].items():
            d = x["median_us"]
            lines.append(f"| {r['gap_ms']:g} ms | {'on' if r['ort_spinning'] else 'off'} | {w} | "
                         f"{d['python_executor'] / 1e3:.1f} | {d['ort_python'] / 1e3:.1f} | "
                         f"{d['cpp_runtime'] / 1e3:.1f} | {x['ratios']['cpp_over_python_executor']:.3f} |")
    lines += ["", "Regenerate: `.venv/bin/python benchmarks/latency_interference.py`", ""]
    stem = os.path.join(args.out, f"latency_interference_b{args.batch}_t{args.threads}")
    atomic_write_text(stem + ".json", json.dumps(runs, indent=1) + "\n")
    atomic_write_text(stem + ".md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
