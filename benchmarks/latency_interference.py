"""Does `fewstep bench latency` measure each path alone? The same harness with and without its idle gap,
and with ONNX Runtime's spinning on and off.

After a run, ONNX Runtime's intra-op workers spin waiting for more work; a path timed right after it (the
eager executor, say) then shares its cores with them. ``fewstep.export.latency.latency`` waits
``gap_ms`` before every timed call; ``spinning=False`` sets ``session.intra_op.allow_spinning = 0`` on the
Python ONNX Runtime sessions (the C++ runtime keeps ONNX Runtime's default, spinning on). This runs the
harness under each setting on digits / DPM-Solver++(2M) NFE 4 at 2 threads (where spinning threads take a
core the next path needs) and writes the medians side by side.

First, directly: the CPU time the process burns while its main thread sleeps after one run of each path
(``time.process_time`` counts every thread; a sleeping process burns none, so what it shows is worker threads
spinning), in windows after the run. That does not depend on what else the machine runs. Then the harness
itself under each (gap, wait until quiet, spinning) setting (``--harness``; on a loaded shared box its 2-thread
medians are noisy).

    .venv/bin/python benchmarks/latency_interference.py [--batch 16] [--threads 2] [--harness --repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SETTINGS = [(0.0, False, True), (0.0, False, False), (20.0, True, True)]  # (gap ms, wait quiet, ORT spinning)


WINDOWS_MS = (5.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)


def idle_spin(plan, batch: int, threads: int, repeats: int = 9) -> dict:
    """CPU ms the process burns in [0, w] ms after one run of each path, main thread asleep (median over repeats)."""
    import statistics
    import tempfile
    import time

    import onnxruntime as ort
    import torch

    from fewstep.export.onnx import example_inputs, export_onnx
    from fewstep.report import machine
    from fewstep.runtime import sample
    from fewstep.runtime.models import load
    from fewstep.runtime.run import load_engine

    torch.set_num_threads(threads)
    t = load("digits")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "e.onnx")
        res = export_onnx(t.denoiser, plan, path, sample_shape=t.shape, num_classes=t.num_classes,
                          teacher_hash=t.content_hash)
        sessions = {}
        for spin in (True, False):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            sessions[spin] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        eng = load_engine(path, threads=threads)
    feeds = example_inputs(res.contract, batch, guidance=1.0)
    z, labels = torch.from_numpy(feeds["z"]), torch.from_numpy(feeds["class_labels"])

    def executor():
        with torch.no_grad():
            sample(plan, t.denoiser, z, cond=labels)

    paths = {"ONNX Runtime from Python, spinning on (ORT's default)": lambda: sessions[True].run(None, feeds),
             "ONNX Runtime from Python, spinning off": lambda: sessions[False].run(None, feeds),
             "C++ runtime (ORT defaults)": lambda: eng.sample(0, batch, labels=feeds["class_labels"],
                                                              guidance=feeds["guidance"]),
             "eager executor (torch)": executor,
             "nothing (sleep only)": lambda: None}
    out = {}
    for name, f in paths.items():
        f()
        samples = []
        for _ in range(repeats):
            time.sleep(0.3)  # start from quiet
            f()
            t0, c0 = time.perf_counter(), time.process_time()
            row = []
            for w in WINDOWS_MS:
                time.sleep(max(0.0, t0 + w / 1e3 - time.perf_counter()))
                row.append((time.process_time() - c0) * 1e3)
            samples.append(row)
        out[name] = [statistics.median(col) for col in zip(*samples)]
    return {"windows_ms": list(WINDOWS_MS), "repeats": repeats, "batch": batch, "threads": threads, "cpu_ms": out,
            "machine": machine(threads, ort=True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="W values (default 1)")
    ap.add_argument("--harness", action="store_true", help="also run the harness under each setting")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    from fewstep.export.latency import latency
    from fewstep.runtime.models import load
    from fewstep.runtime.plan import atomic_write_text
    from fewstep.runtime.solvers import build

    den = load("digits").denoiser
    plan = build("dpmpp-2m", 4, den.sigma_min, den.sigma_max)
    spin = idle_spin(plan, args.batch, args.threads)
    print(json.dumps(spin), flush=True)
    runs = []
    for gap, quiet, spin_on in SETTINGS if args.harness else []:
        r = latency("digits", plan, args.batch, args.repeats, args.threads, gap_ms=gap, spinning=spin_on,
                    guidance=args.guidance, quiet=quiet)
        runs.append(r)
        med = {w: x["median_us"] for w, x in r["by_guidance"].items()}
        print(json.dumps({"gap_ms": gap, "quiet": quiet, "spinning": spin_on, **med}), flush=True)
    m = spin["machine"]
    lines = ["# Latency harness: interference between paths", "",
             f"{m['cpu']}, {m['cores']} cores shared with other jobs (load average {m['load_average'][0]:.1f}); "
             f"digits / {plan.name}, batch {args.batch}, {args.threads} threads for ONNX Runtime and torch.", "",
             "## CPU time burnt while idle after one run (worker threads spinning)", "",
             f"Median over {spin['repeats']} runs of the CPU ms the process uses between the end of a run and each "
             "time after it, its main thread asleep.", "",
             "| path | " + " | ".join(f"0–{w:g} ms" for w in spin["windows_ms"]) + " |",
             "|---|" + "---:|" * len(spin["windows_ms"])]
    for name, v in spin["cpu_ms"].items():
        lines.append(f"| {name} | " + " | ".join(f"{x:.1f}" for x in v) + " |")
    lines += ["", "## The harness under each setting", ""]
    if not runs:
        lines.append("Not run this time (`--harness`).")
    else:
        lines += [f"{args.repeats} interleaved rounds per setting (the order rotates each round); medians in ms. "
                  "Spinning off applies to the Python ONNX Runtime sessions; the C++ runtime keeps ONNX Runtime's "
                  "default (spinning on).", "",
                  "| idle gap | then until quiet | ORT spinning | W | eager executor | ORT from Python | C++ runtime "
                  "| C++ ÷ executor |", "|---:|---|---|---|---:|---:|---:|---:|"]
    for r in runs:
        for w, x in r["by_guidance"].items():
            d = x["median_us"]
            lines.append(f"| {r['gap_ms']:g} ms | {'yes' if r['wait_quiet'] else 'no'} | "
                         f"{'on' if r['ort_spinning'] else 'off'} | {w} | "
                         f"{d['python_executor'] / 1e3:.1f} | {d['ort_python'] / 1e3:.1f} | "
                         f"{d['cpp_runtime'] / 1e3:.1f} | {x['ratios']['cpp_over_python_executor']:.3f} |")
    lines += ["", "Regenerate: `.venv/bin/python benchmarks/latency_interference.py"
              + (f" --harness --repeats {args.repeats}`" if runs else "`"), ""]
    stem = os.path.join(args.out, f"latency_interference_b{args.batch}_t{args.threads}")
    atomic_write_text(stem + ".json", json.dumps({"idle_spin": spin, "harness": runs}, indent=1) + "\n")
    atomic_write_text(stem + ".md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
