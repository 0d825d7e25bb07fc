"""CLI of the C++ runtime: ``fewstep run`` (``fewstep bench latency`` is ``export/latency.py``: it exports).

Imported at CLI start: nothing here imports torch, onnx or onnxruntime at module level.
"""

from __future__ import annotations

import time


def register(sub, bench_sub) -> None:
    from .cli_args import add_count, class_arg

    p = sub.add_parser("run", help="sample an exported engine with the C++ runtime (ONNX Runtime underneath)",
                       description="Same sample as `fewstep sample --plan P --seed S --n N` for the engine's plan.")
    p.add_argument("engine", help="exported sampler .onnx (fewstep export)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--seed", type=int, default=0, help="Philox seed for z and the stochastic rows' noise")
    src.add_argument("--noise", help="initial z as a float32 .npy of shape N×… (stochastic rows use seed 0)")
    add_count(p, "number of samples (default: the noise file's N, else 1)", dest="batch", old="--batch")
    p.add_argument("--class", dest="cls", type=class_arg,
                   help="class label, or 'none' (null label, unconditional); default classes 0,1,2,… in turn")
    p.add_argument("--guidance", type=float, help="CFG scale W (engines with a guidance input)")
    p.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                   help="a named input of the engine (e.g. encoder_hidden_states=e.npy: float32 or int64, the "
                        "engine's shape at this N); repeatable. Without --n, N is its leading size")
    p.add_argument("--embeddings", metavar="FILE.safetensors",
                   help="named inputs from a .safetensors file (tensor name = input name; F32 or I64), e.g. "
                        "precomputed text embeddings; --input adds others")
    p.add_argument("--out", required=True, help="output .npy file: the engine's output, float32 [N, *sample_shape] "
                                                "('sample'), or [N, 3, H, W] ('image') for an engine exported with "
                                                "--decode")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = its default)")
    p.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "tensorrt", "openvino"),
                   help="ONNX Runtime execution provider (openvino: needs the onnxruntime-openvino build's library, "
                        "e.g. --ort-library .../onnxruntime/capi/libonnxruntime.so.*)")
    p.add_argument("--device", type=int, default=0, help="CUDA device (cuda / tensorrt)")
    p.add_argument("--ort-library", help="libonnxruntime.so to use (default: the installed onnxruntime package's)")
    p.set_defaults(fn=cmd_run)


def cmd_run(args) -> int:
    from .files import check_writable_file, read_npy, save_npy
    from .run import MAX_VALUES, RunError, load_engine, output_of, read_embeddings, sample

    check_writable_file(args.out)
    z = read_npy(args.noise, "noise file", MAX_VALUES) if args.noise else None
    inputs = read_embeddings(args.embeddings) if args.embeddings else {}
    seen = set()
    for item in args.input:
        name, eq, path = item.partition("=")
        if not (name and eq and path):
            raise RunError(f"--input must be NAME=FILE.npy, got {item!r}")
        if name in seen:
            raise RunError(f"--input {name} given twice")
        if name in inputs:
            raise RunError(f"--input {name}: the embeddings file holds {name!r} too")
        seen.add(name)
        inputs[name] = read_npy(path, f"input file for {name!r}", MAX_VALUES)
    eng = load_engine(args.engine, threads=args.threads, provider=args.provider, device_id=args.device,
                      ort_library=args.ort_library)
    t0 = time.perf_counter()
    x = sample(eng, seed=args.seed, batch=args.batch, cls=args.cls, guidance=args.guidance, z=z, inputs=inputs)
    secs = time.perf_counter() - t0
    save_npy(args.out, x)
    shape = ", ".join(map(str, x.shape))
    print(f"{x.shape[0]} samples at NFE {eng.info['nfe']} in {secs * 1e3:.2f} ms: {output_of(eng)['name']} [{shape}] "
          f"-> {args.out}")
    return 0
