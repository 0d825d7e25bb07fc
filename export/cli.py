"""`fewstep export`: a Plan + model as one ONNX engine, optionally verified, built for TensorRT, served by Triton.

Imported at CLI start: nothing here imports onnx, onnxruntime or tensorrt at module level.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

from ..errors import FewstepError


def _batch(text: str):
    if text == "dynamic":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'dynamic' or an integer ≥ 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'dynamic' or an integer ≥ 1, got {text!r}")
    return n


def _trt_batch(text: str) -> tuple[int, int, int]:
    try:
        lo, opt, hi = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,OPT,MAX (e.g. 1,8,64), got {text!r}") from None
    return lo, opt, hi


def register(sub, bench_sub) -> None:
    p = sub.add_parser("export", help="export a Plan + model as one ONNX engine (TensorRT, Triton)",
                       description="Unroll the plan into one ONNX graph (opset 17, coefficients as constants); "
                                   "--step-graph writes the single-evaluation denoiser graph instead.")
    from ..runtime.cli_args import add_sampler

    add_sampler(p, "sampler (one of; optional with --step-graph)")
    p.add_argument("--out", required=True, help="output .onnx file (written atomically)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                   help="compute dtype inside the graph (the interface stays float32)")
    p.add_argument("--batch", type=_batch, default=None, metavar="dynamic|N",
                   help="dynamic batch (default) or a fixed batch N")
    p.add_argument("--step-graph", action="store_true", help="export D(x, sigma, class[, guidance]) -> x0")
    p.add_argument("--guidance", type=float, default=None, metavar="W",
                   help="bake the CFG scale W into every row that would read it from the caller: no guidance "
                        "input (W = 1: B rows per evaluation, the fastest engine for unguided sampling)")
    p.add_argument("--decode", action="store_true",
                   help="pipelines: append the VAE decoder (the engine maps noise + embeddings to pixels)")
    p.add_argument("--attention", default="onnx", choices=("onnx", "ort"),
                   help="onnx: attention as standard ops (every runtime, TensorRT included); ort: diffusers' "
                        "attention layers as ONNX Runtime's fused MultiHeadAttention (faster in ONNX Runtime, "
                        "no score matrix in memory; ONNX Runtime only)")
    p.add_argument("--external-data", action="store_true",
                   help="weights in OUT.data beside the .onnx (automatic above 2 GiB, the protobuf limit)")
    p.add_argument("--verify", action="store_true",
                   help="check the engine in ONNX Runtime (CPU) against the Python executor; exit 1 if it fails")
    p.add_argument("--tensorrt", action="store_true", help="also build a TensorRT engine (OUT with .plan)")
    p.add_argument("--trt-batch", type=_trt_batch, default=(1, 8, 64), metavar="MIN,OPT,MAX",
                   help="TensorRT optimisation profile batch range (default 1,8,64)")
    p.add_argument("--timing-cache", help="TensorRT timing cache file (loaded if present, saved after the build)")
    p.add_argument("--triton-repo", metavar="DIR", help="also write a Triton model repository in DIR")
    p.set_defaults(fn=cmd_export)

    from .latency import register as register_latency

    register_latency(bench_sub)


def cmd_export(args) -> int:
    from .onnx import check_out_path, export_model, load_teacher, require_onnx

    require_onnx()
    out = check_out_path(args.out)
    if args.tensorrt and args.attention == "ort":
        raise FewstepError("--tensorrt needs --attention onnx: TensorRT cannot parse ONNX Runtime's contrib ops")
    if args.tensorrt:
        from .tensorrt import require_tensorrt

        require_tensorrt()  # before anything is written: name what is missing
        check_out_path(os.path.splitext(out)[0] + ".plan")
    if args.triton_repo:
        d = os.path.abspath(args.triton_repo)
        if os.path.exists(d) and not os.path.isdir(d):
            raise FewstepError(f"--triton-repo {args.triton_repo}: exists and is not a directory")
        if not os.access(d if os.path.isdir(d) else os.path.dirname(d), os.W_OK):
            raise FewstepError(f"--triton-repo {args.triton_repo}: cannot write there")
    if args.verify:
        from .verify import require_ort

        require_ort()
    from ..runtime.cli_args import resolve_plan, student_steps

    teacher = load_teacher(args.model, student_steps(args))
    plan = resolve_plan(args, teacher, optional=args.step_graph)
    if args.guidance is not None:
        if plan is None or not math.isfinite(args.guidance):
            raise FewstepError("--guidance W: a finite W, for a sampler (not --step-graph)")
        plan = plan.replace(rows=tuple(dataclasses.replace(r, guidance=args.guidance) if r.guidance is None else r
                                       for r in plan.rows))
    if sys.stderr.isatty():  # progress on a terminal only: piped stderr keeps errors to one line
        print(f"fewstep export: tracing {plan.name} ({plan.nfe} evaluations) ...", file=sys.stderr, flush=True)
    res = export_model(teacher, plan, out, decode=args.decode, dtype=args.dtype, batch=args.batch,
                       step_graph=args.step_graph, force=args.force, external_data=args.external_data or None,
                       attention=args.attention)
    c = res.contract
    ins = ", ".join(f"{s['name']}{s['shape']}" for s in c["inputs"])
    what = "step graph" if args.step_graph else f"{plan.name}, {c['nfe']} NFE"
    print(f"exported {out}: {what}, "
          f"{c['compute_dtype']}, {res.bytes / 1e6:.2f} MB in {res.seconds:.1f} s; inputs {ins}")
    rc = 0
    if args.verify:
        from .verify import verify

        model = None if args.model in ("digits", "gmm") else args.model
        if sys.stderr.isatty():
            print("fewstep export: verifying against the executor ...", file=sys.stderr, flush=True)
        v = verify(out, model=model)
        print(v.line())
        rc = 0 if v.passed else 1
    engine = None
    if args.tensorrt:
        from .tensorrt import build_tensorrt

        lo, opt, hi = args.trt_batch
        engine = build_tensorrt(out, min_batch=lo, opt_batch=opt, max_batch=hi, timing_cache=args.timing_cache).path
    if args.triton_repo:
        from .triton_repo import write_triton_repo

        for d in write_triton_repo(out, args.triton_repo, engine_path=engine):
            print(f"triton model {d}")
    return rc
