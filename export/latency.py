"""`fewstep bench latency`: export a plan (sampler + step graph) and time every path side by side.

Network-only × NFE, the Python executor, ONNX Runtime from Python and the C++ runtime, interleaved
rounds with an idle gap before every call, medians (see benchmarks/ and the README's latency section).
Imported at CLI start: nothing here imports torch, onnx or onnxruntime at module level.
"""

from __future__ import annotations

import json
import os
import re
import time

from ..report import machine


def register(bench_sub) -> None:
    b = bench_sub.add_parser("latency", help="latency: network-only × NFE, Python executor, ORT, C++ runtime",
                             description="Exports the plan (sampler + step graph) to a temp dir and times the four "
                                         "paths side by side (interleaved rounds with an idle gap before every "
                                         "call, medians), at W = 1 and W = 2 for guided engines.")
    from ..runtime.cli_args import add_sampler

    add_sampler(b)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--repeats", type=int, default=30, help="timed rounds (each path once per round, after warm-up)")
    b.add_argument("--threads", type=int, default=1, help="threads for ONNX Runtime and torch (default 1)")
    b.add_argument("--gap-ms", type=float, default=None,
                   help="idle milliseconds before every timed call (default 20), after which the harness also "
                        "waits until the previous path's threads have stopped spinning")
    b.add_argument("--no-spin", action="store_true",
                   help="Python ONNX Runtime sessions with session.intra_op.allow_spinning = 0")
    b.add_argument("--guidance", type=float, action="append",
                   help="W to measure (repeatable; default 1 and 2 for engines with a guidance input)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--out", help="also write latency_<model>_<plan>_b<batch>.json/.md into this directory")
    b.set_defaults(fn=cmd_bench_latency)


def _median_us(times: list[float]) -> float:
    import statistics

    return statistics.median(times) * 1e6


# ONNX Runtime's intra-op workers spin after a run, and torch's OpenMP workers after a parallel region: a
# path timed right after another one shares its cores with those spinning threads (measured 2026-12-01,
# 2 threads, digits batch 16: the eager executor timed at 96.7 ms right after an ORT run, 32–45 ms alone).
# benchmarks/results/latency_interference_b16_t2.md measures the spinning directly (CPU time the process burns
# while its main thread sleeps): ~45 ms of CPU for ONNX Runtime, over 100–200 ms of wall time on the loaded
# box, ~10 ms within 50 ms for torch, none with ONNX Runtime's spinning off. Its wall time grows with the
# machine's load, so a fixed gap is not enough: before every timed call the harness waits GAP_MS, then until
# the process is quiet (QUIET_CPU_MS of CPU or less over a QUIET_WINDOW_MS window, main thread asleep).
GAP_MS = 20.0
QUIET_WINDOW_MS = 20.0
QUIET_CPU_MS = 0.5  # an idle process burns ~0.02 ms per 20 ms here; one spinning thread, even at a 20% share, ~4
QUIET_MAX_S = 3.0


def wait_quiet(gap_ms: float = GAP_MS) -> bool:
    """Sleep ``gap_ms``, then until no other thread of this process burns CPU (False: still busy after
    QUIET_MAX_S; ``time.process_time`` counts every thread of the process)."""
    time.sleep(gap_ms / 1e3)
    t_end = time.perf_counter() + QUIET_MAX_S
    while time.perf_counter() < t_end:
        c0 = time.process_time()
        time.sleep(QUIET_WINDOW_MS / 1e3)
        if (time.process_time() - c0) * 1e3 <= QUIET_CPU_MS:
            return True
    return False


def interleaved(paths: dict, repeats: int, gap_ms: float = GAP_MS, warmup: int = 2, quiet: bool = True) \
        -> dict[str, list[float]]:
    """Seconds per call of each path, measured in rounds (every path once per round, A B C … then B C … A:
    the order rotates so no path always follows the same one). Before each call: ``gap_ms`` of idle time,
    then (``quiet``) until the previous path's worker threads have stopped spinning (``wait_quiet``)."""
    names = list(paths)
    for _ in range(warmup):
        for f in paths.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            if quiet:
                wait_quiet(gap_ms)
            elif gap_ms > 0:
                time.sleep(gap_ms / 1e3)
            t0 = time.perf_counter()
            paths[k]()
            times[k].append(time.perf_counter() - t0)
    return times


NOTES = ("Interleaved rounds (the order rotates each round); before every timed call gap_ms of idle time, then a "
         "wait until the process burns no CPU (the previous path's ONNX Runtime / OpenMP workers spin for ~100–200 ms "
         "after a run on a loaded box), so no path shares its cores with them; medians. network_only = the step graph "
         "in ONNX Runtime from Python (one session.run per evaluation) × NFE; ort_python = the sampler graph's raw "
         "session.run on precomputed inputs; cpp_runtime = _C.Engine.sample (Philox z/noise, then one ORT run); "
         "python_executor = fewstep.runtime.sample, eager torch. At W = 1 an engine with a guidance input runs its "
         "B-row branch (the executor's work), at W ≠ 1 the 2B-row CFG branch.")


def _engines(teacher, plan, threads: int, spinning: bool):
    """The plan exported (sampler and step graph, in a temporary directory) and loaded: ONNX Runtime sessions
    from Python for both, and the sampler in the C++ runtime."""
    import tempfile

    import onnxruntime as ort

    from ..runtime.run import load_engine
    from .onnx import export_onnx

    den = teacher.denoiser
    with tempfile.TemporaryDirectory() as tmp:
        sampler_path, step_path = os.path.join(tmp, "sampler.onnx"), os.path.join(tmp, "step.onnx")
        res = export_onnx(den, plan, sampler_path, sample_shape=teacher.shape, num_classes=teacher.num_classes,
                          teacher_hash=teacher.content_hash)
        step = export_onnx(den, plan, step_path, sample_shape=teacher.shape, num_classes=teacher.num_classes,
                           teacher_hash=teacher.content_hash, step_graph=True, force=True)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(sampler_path, so, providers=["CPUExecutionProvider"])
        step_sess = ort.InferenceSession(step_path, so, providers=["CPUExecutionProvider"])
        eng = load_engine(sampler_path, threads=threads)
    return res, step, sess, step_sess, eng


def _by_guidance(med: dict, ws, nfe: int) -> dict:
    """Medians per W and the ratios the README quotes."""
    per_w = {}
    for w in ws:
        tag = "" if w is None else f"W={w:g} "
        m = {k[len(tag):]: v for k, v in med.items() if k.startswith(tag)}
        per_w[tag.strip() or "plan"] = {
            "median_us": {"network_only_x_nfe": m["network_only"] * nfe, "network_only_per_eval": m["network_only"],
                          "python_executor": m["python_executor"], "ort_python": m["ort_python"],
                          "cpp_runtime": m["cpp_runtime"]},
            "ratios": {"cpp_over_python_executor": m["cpp_runtime"] / m["python_executor"],
                       "cpp_over_ort_python": m["cpp_runtime"] / m["ort_python"],
                       "cpp_over_nfe_x_network": m["cpp_runtime"] / (m["network_only"] * nfe)},
        }
    return per_w


def latency(model: str, plan, batch: int = 1, repeats: int = 30, threads: int = 1, gap_ms: float = GAP_MS,
            spinning: bool = True, guidance: list[float] | None = None, quiet: bool = True) -> dict:
    """Median latency (µs) of one sampler run by four paths, measured side by side in interleaved rounds
    with an idle gap before every call, then a wait until the process is quiet (``interleaved``), at each W in
    ``guidance`` (default: 1 and 2 for an engine with a guidance input, else the engine as it is).

    ``spinning`` False sets ``session.intra_op.allow_spinning = 0`` on the Python ONNX Runtime sessions (the
    C++ runtime runs ONNX Runtime's defaults, spinning on)."""
    import numpy as np
    import torch

    from .. import _C
    from ..runtime.executor import sample as py_sample
    from ..runtime.models import load
    from .onnx import example_inputs

    teacher = load(model)
    den = teacher.denoiser
    if threads:
        torch.set_num_threads(threads)
    res, step, sess, step_sess, eng = _engines(teacher, plan, threads, spinning)
    contract = res.contract
    has_w = contract["guidance_input"]
    ws = list(guidance) if guidance else ([1.0, 2.0] if has_w else [None])
    if not has_w and any(w not in (None, 1.0) for w in ws):
        raise ValueError("this engine has no guidance input: it runs the plan's own W only")
    nfe = plan.nfe
    paths, same, checks = {}, {}, {}
    for w in ws:
        feeds = example_inputs(contract, batch, seed=0, guidance=1.0 if w is None else w)
        step_feeds = example_inputs(step.contract, batch, seed=0, guidance=1.0 if w is None else w)
        labels, g = feeds.get("class_labels"), feeds.get("guidance")
        t = {k: torch.from_numpy(v) for k, v in feeds.items()}

        def py_exec(t=t, w=w):
            with torch.no_grad():
                return py_sample(plan, den, t["z"], cond=t.get("class_labels"), guidance=w, noise=t.get("noise"))

        tag = "" if w is None else f"W={w:g} "
        paths[tag + "network_only"] = lambda f=step_feeds: step_sess.run(None, f)
        paths[tag + "python_executor"] = py_exec
        paths[tag + "ort_python"] = lambda f=feeds: sess.run(None, f)
        paths[tag + "cpp_runtime"] = lambda labels=labels, g=g: eng.sample(0, batch, labels=labels, guidance=g)
        # Same inputs, same answer: the C++ runtime reproduces ORT-from-Python bit for bit, and the executor
        # within the float32 export tolerance.
        cpp = paths[tag + "cpp_runtime"]()
        same[tag.strip() or "plan"] = bool(np.array_equal(cpp, paths[tag + "ort_python"]()[0]))
        ref = py_exec().numpy()
        checks[tag.strip() or "plan"] = float(np.abs(cpp - ref).max() / np.abs(ref).max())
    times = interleaved(paths, repeats, gap_ms, quiet=quiet)
    per_w = _by_guidance({k: _median_us(v) for k, v in times.items()}, ws, nfe)
    return {
        "model": teacher.name, "plan": plan.name, "nfe": nfe, "batch": batch, "threads": threads,
        "repeats": repeats, "gap_ms": gap_ms, "wait_quiet": quiet, "ort_spinning": spinning,
        "machine": machine(threads, ort=True),
        "fewstep": _C.version(), "guidance_input": has_w, "by_guidance": per_w,
        "cpp_equals_ort_python": same, "cpp_vs_executor_max_rel_err": checks,
        "notes": NOTES,
        "cuda": "not measured (no GPU): pip install onnxruntime-gpu; fewstep-run ENGINE --provider cuda --bench 200",
        "tensorrt": "not measured (no GPU): fewstep-run ENGINE --provider tensorrt --cache-dir trt_cache --bench 200",
    }


def _markdown(r: dict) -> str:
    mc = r["machine"]
    lines = [f"# Latency: {r['model']} / {r['plan']} (NFE {r['nfe']}), batch {r['batch']}, {r['threads']} thread(s)",
             "", f"{mc['cpu']}, {mc['cores']} cores (shared), load average {mc['load_average'][0]:.2f} at the end; "
             f"torch {mc['torch']}, ONNX Runtime {mc['onnxruntime']}; {r['repeats']} interleaved rounds, "
             f"{r['gap_ms']:g} ms idle{' + until quiet' if r['wait_quiet'] else ''} before every call, ORT spinning "
             f"{'on' if r['ort_spinning'] else 'off'} (Python sessions); medians.", "",
             "| W | network only × NFE (step graph, ORT) | Python executor (eager torch) | ONNX Runtime from Python "
             "| C++ runtime (_C.Engine) | C++ ÷ executor | C++ ÷ raw ORT | C++ ÷ (NFE × network) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for w, x in r["by_guidance"].items():
        m, q = x["median_us"], x["ratios"]
        lines.append(f"| {w} | {m['network_only_x_nfe']:.0f} µs | {m['python_executor']:.0f} µs | "
                     f"{m['ort_python']:.0f} µs | {m['cpp_runtime']:.0f} µs | {q['cpp_over_python_executor']:.3f} | "
                     f"{q['cpp_over_ort_python']:.3f} | {q['cpp_over_nfe_x_network']:.3f} |")
    lines += ["", f"- C++ output bit-identical to ORT from Python: {r['cpp_equals_ort_python']}",
              "- C++ vs executor, max |Δ| / max |ref|: "
              + ", ".join(f"{k} {v:.2g}" for k, v in r["cpp_vs_executor_max_rel_err"].items()),
              f"- CUDA: {r['cuda']}", f"- TensorRT: {r['tensorrt']}", "", r["notes"], ""]
    return "\n".join(lines)


def safe_name(name: str) -> str:
    """A model or plan name as one file-name component: a path becomes its file name, and anything but
    letters, digits, '.', '_' and '-' becomes '_' (a plan named '../x' must not write outside --out)."""
    base = os.path.basename(name.rstrip("/\\")) or "model"
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return base or "model"


def cmd_bench_latency(args) -> int:
    from ..errors import FewstepError
    from ..runtime.cli_args import load_model, resolve_plan
    from ..runtime.plan import atomic_write_bytes

    if args.batch < 1 or args.repeats < 1 or args.threads < 0:
        raise FewstepError("--batch and --repeats must be ≥ 1, --threads ≥ 0")
    cap = 4 * (os.cpu_count() or 2)
    if args.threads > cap:
        raise FewstepError(f"--threads {args.threads}: at most {cap} (4× this machine's cores)")
    if args.out:
        from ..runtime.files import check_writable_dir

        check_writable_dir(args.out)  # before the benchmark, not after it
    gap = GAP_MS if args.gap_ms is None else args.gap_ms
    if not 0 <= gap <= 10_000:
        raise FewstepError(f"--gap-ms must be in [0, 10000], got {args.gap_ms}")
    for w in args.guidance or []:
        if w != w or w in (float("inf"), float("-inf")):
            raise FewstepError(f"--guidance must be finite, got {w}")
    plan = resolve_plan(args, load_model(args))
    try:
        r = latency(args.model, plan, args.batch, args.repeats, args.threads, gap, not args.no_spin, args.guidance)
    except ValueError as exc:
        raise FewstepError(str(exc)) from None
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"latency_{safe_name(r['model'])}_{safe_name(r['plan'])}_b{r['batch']}"
                                      f"_t{r['threads']}")
        atomic_write_bytes(stem + ".json", (json.dumps(r, indent=1) + "\n").encode())
        atomic_write_bytes(stem + ".md", _markdown(r).encode())
    if args.json:
        print(json.dumps(r))
    else:
        print(_markdown(r))
    return 0
