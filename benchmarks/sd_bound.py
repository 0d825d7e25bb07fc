"""How fast can any fp32 engine run the SD 1.5 sampler on this CPU? A compute bound for issue 16's targets.

The issue asks (a) fewstep's engine ÷ (c) diffusers' pipeline in torch eager ≤ 0.7 for SD 1.5 at 512², 4 NFE with
CFG. Both run the same arithmetic: 4 UNet calls on 2 rows (the FLOPs are counted here with torch's FlopCounterMode
on the meta device: no weights, no time). This script measures the best rate this CPU's fp32 kernels reach on
their most favourable work — large matrix products and the UNet's own 3×3 convolutions, in ONNX Runtime (MLAS)
and in torch (oneDNN / MKL), median of repeats, best over shapes — and sets it against the rate the target needs:

    needed rate = 4 × FLOPs per call ÷ (0.7 × eager's median time)

When the needed rate exceeds the best rate any kernel reaches here, no engine that does the UNet's arithmetic as
written (direct convolutions, matrix products in fp32) can meet the target on this machine: only fewer FLOPs
(Winograd / FFT convolutions: see sd15_winograd_engine.md) or lower precision (outside the fp32 export tolerance)
could. (a) fewstep's engine (`fewstep-run`) and (c) diffusers' eager pipeline are timed in the same run, between two
passes of the kernel timings (A B A B: this box's clock and neighbours move the rates by ±15 % from minute to
minute), with benchmarks/sd_latency.py's own paths and its exported engine (reused when present). Run it on an
otherwise idle box.

  python benchmarks/sd_bound.py          # ≈ 40 min on 2 cores (6 of them the export); results/sd15_bound.{json,md}
  python benchmarks/sd_bound.py --latency benchmarks/results/sd15_latency_quiet.json   # (a), (c) from that file
  python benchmarks/sd_bound.py --config tiny --threads 1 --repeats 1 --out /tmp/x     # the code path, quickly
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TARGET = 0.7
# matrix products: (M, K, N). The squares are the classic peak measurement; the others are the UNet's own linear
# layers on 2 rows × 64² tokens (to_q / proj at 320 channels, the GEGLU's 320 → 2560) and 2 × 32² at 640.
GEMMS = [(1024, 1024, 1024), (2048, 2048, 2048), (4096, 4096, 4096), (8192, 320, 320), (8192, 320, 2560),
         (2048, 640, 5120)]
# convolutions: (batch, C_in, C_out, H = W), 3×3, pad 1: the UNet's resnet convolutions at each resolution
CONVS = [(2, 320, 320, 64), (2, 640, 640, 32), (2, 1280, 1280, 16), (2, 1280, 1280, 8)]


def unet_flops(cfg: dict) -> dict:
    """FLOPs of one UNet call on 2 rows (CFG), by aten op, counted on the meta device (2 FLOPs per multiply-add),
    and the number of attention scores it normalises (softmax elements: each costs an exp in any exact attention,
    fused or not)."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Softmaxes(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "softmax" in str(func):  # on meta, attention runs as bmm + (safe) softmax + bmm
                self.n += out.numel()
            return out

    with torch.device("meta"):
        u = UNet2DConditionModel(**cfg)
        s = cfg["sample_size"]
        x, e = torch.empty(2, 4, s, s), torch.empty(2, 77, cfg["cross_attention_dim"])
        t = torch.tensor([500.0, 500.0])
    with FlopCounterMode(display=False) as fc, Softmaxes() as sm:
        u(x, t, e)
    by = {str(k).replace("aten.", ""): int(v) for k, v in fc.get_flop_counts()["Global"].items()}
    return {"total": int(fc.get_total_flops()), "by_op": by, "softmax_elements": sm.n}


def _median_time(fn, repeats: int) -> float:
    from sd_latency import _time  # warm-up, then the median of ``repeats``

    return _time(fn, repeats)["median_s"]


def _ort_session(nodes, inputs, outputs, inits, threads: int, ms_domain: bool = False):
    import onnxruntime as ort
    from onnx import helper

    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    ops = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("com.microsoft", 1)] if ms_domain else [])
    m = helper.make_model(g, opset_imports=ops, ir_version=9)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # NCHWc convolutions, as the engine
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])


def kernel_rates(threads: int, repeats: int) -> list[dict]:
    """GFLOP/s of each GEMM and convolution shape in ONNX Runtime and torch, at ``threads``."""
    import numpy as np
    import torch
    from onnx import TensorProto, helper, numpy_helper

    torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in GEMMS:
        a = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, n), dtype=np.float32)
        flops = 2 * m * k * n
        s = _ort_session([helper.make_node("MatMul", ["x", "w"], ["y"])],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                         [numpy_helper.from_array(w, "w")], threads)
        t_ort = _median_time(lambda s=s, a=a: s.run(None, {"x": a}), repeats)
        ta, tw = torch.from_numpy(a), torch.from_numpy(w)
        with torch.inference_mode():
            t_pt = _median_time(lambda ta=ta, tw=tw: ta @ tw, repeats)
        rows.append({"kind": "matmul", "shape": [m, k, n], "gflop": flops / 1e9,
                     "ort_gflops": flops / t_ort / 1e9, "torch_gflops": flops / t_pt / 1e9})
    for b, ci, co, hw in CONVS:
        x = rng.standard_normal((b, ci, hw, hw), dtype=np.float32)
        w = (rng.standard_normal((co, ci, 3, 3), dtype=np.float32) * 0.02).astype(np.float32)
        flops = 2 * b * co * hw * hw * ci * 9
        s = _ort_session([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, co, hw, hw])],
                         [numpy_helper.from_array(w, "w")], threads)
        t_ort = _median_time(lambda s=s, x=x: s.run(None, {"x": x}), repeats)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        with torch.inference_mode():
            t_pt = _median_time(lambda tx=tx, tw=tw: torch.nn.functional.conv2d(tx, tw, padding=1), repeats)
        rows.append({"kind": "conv3x3", "shape": [b, ci, co, hw], "gflop": flops / 1e9,
                     "ort_gflops": flops / t_ort / 1e9, "torch_gflops": flops / t_pt / 1e9})
    return rows


def softmax_rate(threads: int, repeats: int) -> dict:
    """Softmax over the last axis of [16, 1024, 4096] (rows as long as the UNet's 64² self-attention), in
    billions of elements per second, ONNX Runtime and torch."""
    import numpy as np
    import torch
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    shape = [16, 1024, 4096]
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    s = _ort_session([helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [], threads)
    t_ort = _median_time(lambda: s.run(None, {"x": x}), repeats)
    tx = torch.from_numpy(x)
    with torch.inference_mode():
        t_pt = _median_time(lambda: torch.softmax(tx, -1), repeats)
    n = x.size
    return {"ort_gelem_s": n / t_ort / 1e9, "torch_gelem_s": n / t_pt / 1e9}


def attention_rate(threads: int, repeats: int) -> dict:
    """The UNet's largest attention (2 rows × 64² tokens, 8 heads of 40) as one fused op: ONNX Runtime's
    MultiHeadAttention (what the engine runs) and torch's scaled_dot_product_attention (what eager runs);
    seconds and GFLOP/s of its two matrix products."""
    import numpy as np
    import torch
    from onnx import TensorProto, helper

    torch.set_num_threads(threads)
    b, n, h, d = 2, 4096, 8, 40
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, n, h * d), dtype=np.float32) for _ in range(3))
    nodes = [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain="com.microsoft", num_heads=h)]
    ins = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [b, n, h * d]) for x in "qkv"]
    s = _ort_session(nodes, ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, n, h * d])], [],
                     threads, ms_domain=True)
    t_ort = _median_time(lambda: s.run(None, {"q": q, "k": k, "v": v}), repeats)
    tq, tk, tv = (torch.from_numpy(x).view(b, n, h, d).transpose(1, 2) for x in (q, k, v))
    with torch.inference_mode():
        t_pt = _median_time(lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv), repeats)
    flops = 4 * b * h * n * n * d
    return {"shape": [b, n, h, d], "gflop": flops / 1e9, "scores": b * h * n * n, "ort_s": t_ort, "torch_s": t_pt,
            "ort_gflops": flops / t_ort / 1e9, "torch_gflops": flops / t_pt / 1e9}


def _kernels(t: int, repeats: int) -> dict:
    rows = kernel_rates(t, repeats)
    smx = softmax_rate(t, repeats)
    return {"kernels": rows, "best_gflops": max(max(r["ort_gflops"], r["torch_gflops"]) for r in rows),
            "softmax": smx, "best_softmax": max(smx.values()), "attention": attention_rate(t, repeats)}


def floors(p: dict, flops: dict, nfe: int) -> dict:
    """The derived figures of one thread count ``p`` (its kernel passes and the two latencies): the rates, the
    rate the target needs, and two floors on the engine's time.

    floor: every FLOP at the best GEMM / convolution rate measured, plus every attention score through the best
    softmax. class floor: each class of the UNet's FLOPs at its own class's best measured rate — convolutions at
    the best convolution, the linear layers (addmm, mm) at the best matrix product, attention (bmm) at the best
    fused attention (its softmax included)."""
    passes, by = p["passes"], flops["by_op"]
    ks = [k for q in passes for k in q["kernels"]]
    best = max(max(k["ort_gflops"], k["torch_gflops"]) for k in ks)
    conv = max(max(k["ort_gflops"], k["torch_gflops"]) for k in ks if k["kind"] == "conv3x3")
    mm = max(max(k["ort_gflops"], k["torch_gflops"]) for k in ks if k["kind"] == "matmul")
    att = max(max(q["attention"]["ort_gflops"], q["attention"]["torch_gflops"]) for q in passes)
    best_smx = max(q["best_softmax"] for q in passes)
    total = nfe * flops["total"]
    floor = total / best / 1e9 + nfe * flops["softmax_elements"] / best_smx / 1e9
    other = flops["total"] - by.get("convolution", 0) - by.get("addmm", 0) - by.get("mm", 0) - by.get("bmm", 0)
    cls = nfe * (by.get("convolution", 0) / conv + (by.get("addmm", 0) + by.get("mm", 0)) / mm
                 + by.get("bmm", 0) / att + other / best) / 1e9
    eager, engine = p["eager_s"], p["engine_s"]
    return {**p, "best_gflops": best, "best_conv_gflops": conv, "best_matmul_gflops": mm,
            "best_attention_gflops": att, "best_softmax": best_smx,
            "eager_gflops": total / eager / 1e9 if eager else None,
            "engine_gflops": total / engine / 1e9 if engine else None,
            "needed_gflops": total / (TARGET * eager) / 1e9 if eager else None,
            "engine_over_eager": engine / eager if engine and eager else None,
            "floor_s": floor, "floor_ratio": floor / eager if eager else None,
            "engine_over_floor": engine / floor if engine else None,
            "class_floor_s": cls, "class_floor_ratio": cls / eager if eager else None,
            "engine_over_class_floor": engine / cls if engine else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", help="a results file of benchmarks/sd_latency.py to take (a) and (c) from "
                    "instead of timing them in this run")
    ap.add_argument("--config", default="sd15", choices=("sd15", "tiny"), help="the UNet (tiny: for checking)")
    ap.add_argument("--work", default=os.path.join(HERE, "..", "out", "sd_latency"))
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--repeats", type=int, default=5, help="kernel timings per shape")
    ap.add_argument("--runs", type=int, default=2, help="timed sampler runs per path (after a warm-up)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--stem", default=None, help="results file name (default sd15_bound / sd_bound_tiny)")
    ap.add_argument("--note", default="")
    ap.add_argument("--rederive", metavar="JSON", help="recompute the derived figures and the markdown of an "
                    "earlier results file from its measurements (times nothing)")
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    from sd_latency import NFE, SD15_UNET, TINY_UNET, _export, build_pipeline, export_fewstep, run_child

    from fewstep.report import machine, write_results

    if args.rederive:
        with open(args.rederive) as f:
            res = json.load(f)
        res["threads"] = [floors(p, res["unet_flops"], res["nfe"]) for p in res["threads"]]
        write_results(os.path.dirname(os.path.abspath(args.rederive)),
                      os.path.splitext(os.path.basename(args.rederive))[0], res, markdown(res))
        return 0
    threads = [int(t) for t in args.threads.split(",")]
    med, source = {}, "timed in this run"
    if args.latency:
        try:
            with open(args.latency) as f:
                lat = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--latency {args.latency}: cannot read it ({e})") from None
        cfg = lat["unet"]
        med = {(r["path"], r["threads"]): r["median_s"] for r in lat["rows"] if "median_s" in r}
        source = f"from `{os.path.relpath(args.latency, os.path.join(HERE, '..'))}`"
    else:  # (a) and (c) in this run, between two passes of the kernel timings (A B A B on the same clock)
        cfg = SD15_UNET if args.config == "sd15" else TINY_UNET
        folder = os.path.abspath(os.path.join(args.work, args.config))
        build_pipeline(folder, cfg)
        os.makedirs(os.path.join(folder, "onnx"), exist_ok=True)
        eng = os.path.join(folder, "onnx", "fewstep_fused.onnx")
        ex = _export(eng, lambda: export_fewstep(folder, eng, "ort"), True)
        if "error" in ex:
            raise SystemExit(f"export of the engine failed: {ex['error']}")
    flops = unet_flops(cfg)
    sampler_flops = NFE * flops["total"]
    per = []
    for t in threads:
        passes = [_kernels(t, args.repeats)]
        if not args.latency:
            for path in ("fewstep", "eager"):
                r = run_child(path, folder, args.config, t, args.runs)
                if "error" in r:
                    raise SystemExit(f"{path} at {t} thread(s): {r['error']}")
                med[(path, t)] = r["median_s"]
                print(path, t, r["median_s"], flush=True)
            passes.append(_kernels(t, args.repeats))
        per.append(floors({"threads": t, "passes": passes, "eager_s": med.get(("eager", t)),
                            "engine_s": med.get(("fewstep", t))}, flops, NFE))
        print(t, {k: v for k, v in per[-1].items() if k != "passes"}, flush=True)
    res = {"config": args.config if not args.latency else "from the latency file", "unet": cfg,
           "latency_source": source, "nfe": NFE, "target": TARGET, "unet_flops": flops,
           "sampler_flops": sampler_flops, "repeats": args.repeats, "runs": args.runs, "note": args.note,
           "threads": per, "machine": machine(None, ort=True)}
    stem = args.stem or ("sd15_bound" if args.config == "sd15" else "sd_bound_tiny")
    write_results(args.out, stem, res, markdown(res))
    print(f"-> {os.path.join(args.out, stem)}.json/.md")
    return 0


def markdown(r: dict) -> str:
    m, f = r["machine"], r["unet_flops"]
    ops = ", ".join(f"{k} {v / 1e9:.0f}" for k, v in sorted(f["by_op"].items(), key=lambda kv: -kv[1]))
    timed = r["latency_source"] == "timed in this run"
    out = ["# SD 1.5 on this CPU: the compute floor under engine ÷ eager", "",
           f"One UNet call on 2 rows (CFG): **{f['total'] / 1e9:.0f} GFLOP** ({ops}; torch's FlopCounterMode, 2 FLOPs "
           f"per multiply-add) and {f['softmax_elements'] / 1e9:.2f} billion attention scores through a softmax; the "
           f"sampler ({r['nfe']} calls, DPM-Solver++(2M), CFG 7.5, batch 1, 64² latents): "
           f"{r['sampler_flops'] / 1e12:.2f} TFLOP. Kernel rates: fp32, median of {r['repeats']} after a warm-up, "
           "the best over the shapes below and both libraries"
           + (", and over the two passes timed before and after the samplers" if timed else "") + ". (a) fewstep's "
           "fused engine through the C++ runtime (`fewstep-run --bench` p50) and (c) diffusers' pipeline in torch "
           "eager: " + (f"median of {r['runs']} runs after a warm-up, {r['latency_source']}, between the kernel "
                        "passes" if timed else r["latency_source"]) + f". Machine: {m['cpu']}, {m['cores']} cores "
           f"(load average {m['load_average'][0]:.1f} at the end), torch {m['torch']}, onnxruntime "
           f"{m['onnxruntime']}. Generated by `python benchmarks/sd_bound.py`."
           + (f" {r['note']}" if r.get("note") else ""), ""]
    out += ["| threads | best GEMM / conv rate | best softmax rate | (c) eager | (a) engine | (a) ÷ (c) "
            f"| rate (a) needs for (a)÷(c) ≤ {r['target']} | floor | floor ÷ (c) | (a) ÷ floor | class floor "
            "| class floor ÷ (c) | (a) ÷ class floor |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def g(v, fmt="{:.1f}"):
        return "–" if v is None else fmt.format(v)

    for p in r["threads"]:
        out.append(f"| {p['threads']} | {p['best_gflops']:.1f} GFLOP/s | {p['best_softmax']:.2f} G/s "
                   f"| {g(p['eager_s'], '{:.4g}')} s ({g(p['eager_gflops'])} GFLOP/s) "
                   f"| {g(p['engine_s'], '{:.4g}')} s ({g(p['engine_gflops'])} GFLOP/s) "
                   f"| {g(p['engine_over_eager'], '{:.2f}')} | **{g(p['needed_gflops'])} GFLOP/s** "
                   f"| {p['floor_s']:.4g} s | **{g(p['floor_ratio'], '{:.2f}')}** "
                   f"| {g(p['engine_over_floor'], '{:.2f}')} | {p['class_floor_s']:.4g} s "
                   f"| **{g(p['class_floor_ratio'], '{:.2f}')}** | {g(p['engine_over_class_floor'], '{:.2f}')} |")
    out += ["", "The floor: every FLOP at the best GEMM / convolution rate, plus every attention score through the "
            "best softmax. The class floor: the convolutions' FLOPs at the best convolution rate, the linear layers' "
            "(addmm, mm) at the best matrix product's, the attention's (bmm) at the best fused attention's (softmax "
            "included; the 64² self-attention's rate for all of them). Both are optimistic — norms, activations, "
            "residual adds and memory traffic are left out, and no real engine runs every layer at its best shape's "
            "rate. Where floor ÷ (c) > "
            f"{r['target']}, no fp32 engine doing the UNet's arithmetic as written (direct convolutions, exact "
            "attention) can meet the target on this machine; where it is below, the target asks the engine to come "
            f"within (c) × {r['target']} ÷ floor of it. Fewer FLOPs (Winograd convolutions, tried: "
            "`sd15_winograd_engine.md`) or lower precision (outside the fp32 export tolerance) change the floor.", "",
            "Kernel rates (GFLOP/s; softmax in billions of elements/s), ONNX Runtime / torch"
            + (", pass 1 → pass 2" if timed else "") + ":", "",
            "| kernel | " + " | ".join(f"{p['threads']} thread(s)" for p in r["threads"]) + " |",
            "|---|" + "---:|" * len(r["threads"])]

    def cell(p, get):
        return " → ".join(get(q) for q in p["passes"])

    for i, k in enumerate(r["threads"][0]["passes"][0]["kernels"]):
        name = ("matmul M×K×N " if k["kind"] == "matmul" else "conv 3×3 B×Cin×Cout×HW ") + "×".join(
            str(s) for s in k["shape"])
        out.append(f"| {name} | " + " | ".join(cell(p, lambda q, i=i: f"{q['kernels'][i]['ort_gflops']:.1f} / "
                                                       f"{q['kernels'][i]['torch_gflops']:.1f}")
                                               for p in r["threads"]) + " |")
    out.append("| softmax 16×1024×4096, last axis | " + " | ".join(
        cell(p, lambda q: f"{q['softmax']['ort_gelem_s']:.2f} / {q['softmax']['torch_gelem_s']:.2f}")
        for p in r["threads"]) + " |")
    a0 = r["threads"][0]["passes"][0]["attention"]
    out.append(f"| attention {'×'.join(str(x) for x in a0['shape'])} (batch×tokens×heads×dim; MultiHeadAttention / "
               f"SDPA, on its {a0['gflop']:.0f} GFLOP of matrix products) | " + " | ".join(
                   cell(p, lambda q: f"{q['attention']['ort_gflops']:.1f} / {q['attention']['torch_gflops']:.1f}")
                   for p in r["threads"]) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
