"""The exported engine through the C++ runtime against the eager PyTorch executor, at W = 1 and W = 2.

digits / DPM-Solver++(2M) NFE 4 at batch 16 and 64, on 1 and 2 threads: ``fewstep bench latency`` for each
(batch, threads) — every path side by side in interleaved rounds with an idle gap before each call, medians —
and one table of engine ÷ executor. Targets (issue 19): at 1 thread, ≤ 0.6 at W = 1 and ≤ 0.65 at W = 2.
Each configuration also writes its own ``latency_digits_dpmpp-2m-4_b<B>_t<T>.{json,md}``.

    .venv/bin/python benchmarks/engine_vs_eager.py [--threads 1 2] [--repeats 20]

writes latency_engine_vs_eager_t<threads>.{json,md} (on this shared 2-core box the 1- and 2-thread runs were made
separately, at different loads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
TARGET = {"W=1": 0.6, "W=2": 0.65}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    from fewstep.export.latency import _markdown, latency
    from fewstep.runtime.models import load
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.runtime.solvers import build

    den = load("digits").denoiser
    plan = build("dpmpp-2m", 4, den.sigma_min, den.sigma_max)
    runs = []
    for threads in args.threads:
        for batch in args.batch:
            r = latency("digits", plan, batch, args.repeats, threads)
            runs.append(r)
            stem = os.path.join(args.out, f"latency_{r['model']}_{r['plan']}_b{batch}_t{threads}")
            atomic_write_text(stem + ".json", json.dumps(r, indent=1) + "\n")
            atomic_write_text(stem + ".md", _markdown(r))
            print(_markdown(r), flush=True)
    m = runs[-1]["machine"]
    lines = ["# Engine (C++ runtime) ÷ eager executor: digits / dpmpp-2m-4", "",
             f"{m['cpu']}, {m['cores']} cores shared with other jobs; torch {m['torch']}, ONNX Runtime "
             f"{m['onnxruntime']}. Per row: `fewstep bench latency` ({args.repeats} interleaved rounds, "
             f"{runs[-1]['gap_ms']:g} ms idle, then until the process is quiet, before every call, medians; "
             "the row's own file holds every path). "
             "At W = 1 the engine runs its B-row branch; at W = 2 CFG's 2B rows, like the executor. "
             "Targets at 1 thread: ≤ 0.6 (W = 1), ≤ 0.65 (W = 2).", "",
             "| batch | threads | W | C++ runtime ms | eager executor ms | engine ÷ eager | target | load avg |",
             "|---:|---:|---|---:|---:|---:|---|---:|"]
    for r in runs:
        for w, x in r["by_guidance"].items():
            d, q = x["median_us"], x["ratios"]["cpp_over_python_executor"]
            tgt = TARGET.get(w) if r["threads"] == 1 else None
            verdict = "—" if tgt is None else (f"≤ {tgt} met" if q <= tgt else f"≤ {tgt} MISSED")
            lines.append(f"| {r['batch']} | {r['threads']} | {w} | {d['cpp_runtime'] / 1e3:.1f} | "
                         f"{d['python_executor'] / 1e3:.1f} | {q:.3f} | {verdict} | "
                         f"{r['machine']['load_average'][0]:.1f} |")
    lines += ["", "Regenerate: `.venv/bin/python benchmarks/engine_vs_eager.py --threads "
              + " ".join(map(str, args.threads)) + f" --repeats {args.repeats}`", ""]
    stem = os.path.join(args.out, "latency_engine_vs_eager_t" + "_".join(map(str, args.threads)))
    atomic_write_text(stem + ".json", json.dumps(runs, indent=1) + "\n")
    atomic_write_text(stem + ".md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
