"""One engine that picks its rows by W against two separate engines, through the C++ runtime.

An engine with a guidance input runs B rows per evaluation when every W of a call is 1 and CFG's 2B rows
otherwise: the graph picks the rows itself (an ONNX Range over [uncond; cond], then Gathers; export/onnx.py,
``_Evaluator.guided``). Until 2026-12-01 it held two traces of the plan under an ONNX `If` instead (two copies
of the weights, a subgraph set-up per run). The alternative design is two engines: a B-row one (no guidance
input) and a 2B-row one, the caller picking. This measures what picking the rows in the graph costs:

- W = 1: the row-picking engine against the B-row engine,
- W = 2: the row-picking engine against the 2B-row engine (``unit_guidance_branch=False``),

all four through ``fewstep._C.Engine``, in interleaved rounds with an idle gap before every call
(``fewstep.export.latency.interleaved``), medians; digits, DPM-Solver++(2M), NFE 4.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_branch.py [--batch 1 16 64] [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def bench(batches, threads: int, repeats: int, gap_ms: float) -> dict:
    import torch

    from fewstep import _C
    from fewstep.export.latency import _median_us, interleaved
    from fewstep.export.onnx import export_onnx
    from fewstep.report import machine
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import build

    torch.set_num_threads(threads)
    t = load("digits")
    den = t.denoiser
    plan = build("dpmpp-2m", 4, den.sigma_min, den.sigma_max)
    kw = dict(sample_shape=t.shape, num_classes=t.num_classes, teacher_hash=t.content_hash)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: os.path.join(tmp, k + ".onnx") for k in ("branch", "b_rows", "cfg_rows")}
        export_onnx(den, plan, paths["branch"], **kw)
        export_onnx(den, plan, paths["b_rows"], guidance_input=False, **kw)
        export_onnx(den, plan, paths["cfg_rows"], unit_guidance_branch=False, **kw)
        sizes = {k: os.path.getsize(p) for k, p in paths.items()}
        eng = {k: _C.Engine(p, threads=threads) for k, p in paths.items()}
    for batch in batches:
        labels = np.arange(batch, dtype=np.int64) % t.num_classes
        w1, w2 = np.ones(batch, np.float32), np.full(batch, 2.0, np.float32)
        calls = {
            "W=1 branch engine": lambda b=batch, lb=labels, g=w1: eng["branch"].sample(0, b, labels=lb, guidance=g),
            "W=1 B-row engine": lambda b=batch, lb=labels: eng["b_rows"].sample(0, b, labels=lb),
            "W=2 branch engine": lambda b=batch, lb=labels, g=w2: eng["branch"].sample(0, b, labels=lb, guidance=g),
            "W=2 2B-row engine": lambda b=batch, lb=labels, g=w2: eng["cfg_rows"].sample(0, b, labels=lb, guidance=g),
        }
        # the same computation on the same rows: equal outputs, bit for bit
        same_w1 = bool(np.array_equal(calls["W=1 branch engine"](), calls["W=1 B-row engine"]()))
        same_w2 = bool(np.array_equal(calls["W=2 branch engine"](), calls["W=2 2B-row engine"]()))
        times = interleaved(calls, repeats, gap_ms)
        med = {k: _median_us(v) / 1e3 for k, v in times.items()}
        rows.append({"batch": batch, "median_ms": med, "equal_outputs": {"W=1": same_w1, "W=2": same_w2},
                     "branch_over_b_rows_w1": med["W=1 branch engine"] / med["W=1 B-row engine"],
                     "branch_over_cfg_rows_w2": med["W=2 branch engine"] / med["W=2 2B-row engine"],
                     "w1_over_w2_branch": med["W=1 branch engine"] / med["W=2 branch engine"]})
        print(json.dumps(rows[-1]), flush=True)
    return {"model": "digits", "plan": plan.name, "threads": threads, "repeats": repeats, "gap_ms": gap_ms,
            "machine": machine(threads, ort=True), "file_bytes": sizes, "rows": rows}


def markdown(r: dict) -> str:
    m = r["machine"]
    out = ["# One engine that picks its rows by W vs two separate engines (C++ runtime)", "",
           f"{m['cpu']}, {m['cores']} cores (shared with other jobs), {r['threads']} intra-op thread(s); "
           f"ONNX Runtime {m['onnxruntime']}; digits / {r['plan']}; {r['repeats']} interleaved rounds, "
           f"{r['gap_ms']:g} ms idle, then until the process is quiet, before every call; medians. "
           f"Load average at the end {m['load_average'][0]:.2f}.",
           "", f"File sizes: branch engine {r['file_bytes']['branch'] / 1e6:.2f} MB, B-row engine "
           f"{r['file_bytes']['b_rows'] / 1e6:.2f} MB, 2B-row engine {r['file_bytes']['cfg_rows'] / 1e6:.2f} MB "
           "(one copy of the weights in each).", "",
           "| batch | W=1 branch | W=1 B-row engine | ratio | W=2 branch | W=2 2B-row engine | ratio | "
           "equal outputs |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in r["rows"]:
        d = x["median_ms"]
        out.append(f"| {x['batch']} | {d['W=1 branch engine']:.2f} ms | {d['W=1 B-row engine']:.2f} ms | "
                   f"{x['branch_over_b_rows_w1']:.3f} | {d['W=2 branch engine']:.2f} ms | "
                   f"{d['W=2 2B-row engine']:.2f} ms | {x['branch_over_cfg_rows_w2']:.3f} | "
                   f"{x['equal_outputs']} |")
    out += ["", "Regenerate: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/guidance_branch.py`", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--gap-ms", type=float, default=20.0, help="idle ms before every call (then until quiet)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    from fewstep.runtime.plan import atomic_write_text

    r = bench(args.batch, args.threads, args.repeats, args.gap_ms)
    stem = os.path.join(args.out, f"latency_guidance_branch_t{args.threads}")
    atomic_write_text(stem + ".json", json.dumps(r, indent=1) + "\n")
    atomic_write_text(stem + ".md", markdown(r))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
