"""CLI of the C++ runtime: ``fewstep run`` and ``fewstep bench latency``.

Imported at CLI start: nothing here imports torch, onnx or onnxruntime at module level.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _class(text: str):
    if text == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class index or 'none', got {text!r}") from None


def register(sub, bench_sub) -> None:
    p = sub.add_parser("run", help="sample an exported engine with the C++ runtime (ONNX Runtime underneath)",
                       description="Same sample as `fewstep sample --plan P --seed S --n N` for the engine's plan.")
    p.add_argument("engine", help="exported sampler .onnx (fewstep export)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--seed", type=int, default=0, help="Philox seed for z and the stochastic rows' noise")
    src.add_argument("--noise", help="initial z as a float32 .npy of shape N×… (stochastic rows use seed 0)")
    p.add_argument("--batch", type=int, help="number of samples (default: the noise file's N, else 1)")
    p.add_argument("--class", dest="cls", type=_class,
                   help="class label, or 'none' (null label, unconditional); default classes 0,1,2,… in turn")
    p.add_argument("--guidance", type=float, help="CFG scale W (engines with a guidance input)")
    p.add_argument("--out", required=True, help="output .npy file (float32 [N, *sample_shape])")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt"))
    p.add_argument("--device", type=int, default=0, help="CUDA device (cuda / tensorrt)")
    p.add_argument("--ort-library", help="libonnxruntime.so to use (default: the installed onnxruntime package's)")
    p.set_defaults(fn=cmd_run)

    b = bench_sub.add_parser("latency", help="latency: network-only × NFE, Python executor, ORT, C++ runtime",
                             description="Exports the plan (sampler + step graph) to a temp dir and times the four "
                                         "paths side by side (interleaved rounds, medians).")
    b.add_argument("--model", required=True, help="digits | gmm | PATH")
    b.add_argument("--plan", help="a plan JSON file")
    b.add_argument("--solver", help="solver name")
    b.add_argument("--nfe", type=int, help="network evaluations (with --solver)")
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--repeats", type=int, default=200, help="timed runs per path (after warm-up)")
    b.add_argument("--threads", type=int, default=1, help="threads for ONNX Runtime and torch (default 1)")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--out", help="also write latency_<model>_<plan>_b<batch>.json/.md into this directory")
    b.set_defaults(fn=cmd_bench_latency)


def cmd_run(args) -> int:
    from ..errors import FewstepError
    from .run import load_engine, sample

    z = None
    if args.noise:
        import numpy as np

        try:
            z = np.load(args.noise, allow_pickle=False)
        except FileNotFoundError:
            raise FewstepError(f"noise file not found: {args.noise}") from None
        except (ValueError, OSError) as exc:
            raise FewstepError(f"noise file {args.noise}: not a readable .npy array ({exc})") from None
    eng = load_engine(args.engine, threads=args.threads, provider=args.provider, device_id=args.device,
                      ort_library=args.ort_library)
    t0 = time.perf_counter()
    x = sample(eng, seed=args.seed, batch=args.batch, cls=args.cls, guidance=args.guidance, z=z)
    secs = time.perf_counter() - t0
    _save_npy(args.out, x)
    print(f"{x.shape[0]} samples at NFE {eng.info['nfe']} in {secs * 1e3:.2f} ms -> {args.out}")
    return 0


def _save_npy(path: str, arr) -> None:
    import io

    import numpy as np

    from .plan import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def _median_us(times: list[float]) -> float:
    import statistics

    return statistics.median(times) * 1e6


def latency(model: str, plan, batch: int = 1, repeats: int = 200, threads: int = 1) -> dict:
    """Median latency (µs) of one sampler run by four paths, measured side by side: each round
    runs every path once (so load spikes on a shared machine hit all paths alike)."""
    import tempfile

    import numpy as np
    import onnxruntime as ort
    import torch

    from .. import _C
    from ..export.onnx import example_inputs, export_onnx
    from ..training.evaluate import make_inputs, run_plan
    from ..training.teachers import load
    from .run import load_engine

    teacher = load(model)
    den = teacher.denoiser
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        sampler_path, step_path = os.path.join(tmp, "sampler.onnx"), os.path.join(tmp, "step.onnx")
        res = export_onnx(den, plan, sampler_path, sample_shape=teacher.shape, num_classes=teacher.num_classes,
                          teacher_hash=teacher.content_hash)
        step = export_onnx(den, plan, step_path, sample_shape=teacher.shape, num_classes=teacher.num_classes,
                           teacher_hash=teacher.content_hash, step_graph=True, force=True)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(sampler_path, so, providers=["CPUExecutionProvider"])
        step_sess = ort.InferenceSession(step_path, so, providers=["CPUExecutionProvider"])
        eng = load_engine(sampler_path, threads=threads)
    contract = res.contract
    feeds = example_inputs(contract, batch, seed=0, guidance=1.0)
    step_feeds = example_inputs(step.contract, batch, seed=0, guidance=1.0)
    labels = feeds.get("class_labels")
    guidance = feeds.get("guidance")
    inputs = make_inputs(teacher, plan, batch, 0)
    if labels is not None:
        inputs = type(inputs)(inputs.z, inputs.noise, torch.from_numpy(labels))

    def py_exec():
        with torch.no_grad():
            run_plan(teacher, plan, inputs)

    paths = {
        "network_only": lambda: step_sess.run(None, step_feeds),
        "python_executor": py_exec,
        "ort_python": lambda: sess.run(None, feeds),
        "cpp_runtime": lambda: eng.sample(0, batch, labels=labels, guidance=guidance),
    }
    # Same inputs, same answer: the C++ runtime must reproduce ORT-from-Python bit for bit.
    same = bool(np.array_equal(paths["cpp_runtime"](), paths["ort_python"]()[0]))
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(3):  # warm-up
        for f in paths.values():
            f()
    for _ in range(repeats):
        for k, f in paths.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: _median_us(v) for k, v in times.items()}
    nfe = plan.nfe
    return {
        "model": teacher.name, "plan": plan.name, "nfe": nfe, "batch": batch, "threads": threads,
        "repeats": repeats, "device": "cpu", "onnxruntime": ort.__version__, "fewstep": _C.version(),
        "median_us": {
            "network_only_x_nfe": med["network_only"] * nfe,
            "network_only_per_eval": med["network_only"],
            "python_executor": med["python_executor"],
            "ort_python": med["ort_python"],
            "cpp_runtime": med["cpp_runtime"],
        },
        "ratios": {
            "cpp_over_ort_python": med["cpp_runtime"] / med["ort_python"],
            "cpp_over_nfe_x_network": med["cpp_runtime"] / (med["network_only"] * nfe),
        },
        "cpp_equals_ort_python": same,
        "notes": "network_only = step graph in ONNX Runtime from Python (one session.run per evaluation) × NFE; "
                 "ort_python = the sampler graph's raw session.run on precomputed inputs; cpp_runtime = "
                 "_C.Engine.sample (Philox z/noise, then one ORT run). On the CPU the one-graph sampler has come out "
                 "faster than NFE separate step-graph calls (same convolutions per evaluation); the cause is not "
                 "pinned down, so read the second ratio as an upper bound.",
        "cuda": "not measured (no GPU): pip install onnxruntime-gpu; fewstep-run ENGINE --provider cuda --bench 200",
        "tensorrt": "not measured (no GPU): fewstep-run ENGINE --provider tensorrt --cache-dir trt_cache --bench 200",
    }


def _markdown(r: dict) -> str:
    m, q = r["median_us"], r["ratios"]
    rows = [("network only × NFE (step graph, ORT)", m["network_only_x_nfe"]),
            ("Python executor (torch)", m["python_executor"]), ("ONNX Runtime from Python", m["ort_python"]),
            ("C++ runtime (_C.Engine)", m["cpp_runtime"])]
    lines = [f"# Latency: {r['model']} / {r['plan']} (NFE {r['nfe']}), batch {r['batch']}, {r['threads']} thread(s)",
             "", f"CPU, ONNX Runtime {r['onnxruntime']}, {r['repeats']} interleaved runs per path; medians.", "",
             "| path | median µs |", "| --- | ---: |"]
    lines += [f"| {name} | {v:.1f} |" for name, v in rows]
    lines += ["", f"- C++ ÷ raw ORT session call: {q['cpp_over_ort_python']:.3f} (target ≤ 1.01)",
              f"- C++ ÷ (NFE × network only): {q['cpp_over_nfe_x_network']:.3f} (target ≤ 1.05)",
              f"- C++ output bit-identical to ORT from Python: {r['cpp_equals_ort_python']}",
              f"- CUDA: {r['cuda']}", f"- TensorRT: {r['tensorrt']}", "", r["notes"], ""]
    return "\n".join(lines)


def cmd_bench_latency(args) -> int:
    from ..errors import FewstepError
    from ..runtime.plan import Plan, atomic_write_bytes
    from ..runtime.solvers import build
    from ..training.teachers import load

    if args.plan and (args.solver or args.nfe is not None):
        raise FewstepError("give either --plan FILE or --solver NAME --nfe N, not both")
    if args.batch < 1 or args.repeats < 1 or args.threads < 0:
        raise FewstepError("--batch and --repeats must be ≥ 1, --threads ≥ 0")
    if args.plan:
        plan = Plan.load(args.plan)
    elif args.solver and args.nfe is not None:
        den = load(args.model).denoiser
        plan = build(args.solver, args.nfe, den.sigma_min, den.sigma_max)
    else:
        raise FewstepError("choose a sampler: --solver NAME --nfe N, or --plan FILE")
    r = latency(args.model, plan, args.batch, args.repeats, args.threads)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"latency_{r['model']}_{r['plan']}_b{r['batch']}")
        atomic_write_bytes(stem + ".json", (json.dumps(r, indent=1) + "\n").encode())
        atomic_write_bytes(stem + ".md", _markdown(r).encode())
    if args.json:
        print(json.dumps(r))
    else:
        print(_markdown(r))
    return 0
