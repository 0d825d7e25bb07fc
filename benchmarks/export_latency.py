"""Exported engines: export seconds, file sizes, and ONNX Runtime (CPU) latency vs the Python executor.

Models: the digits teacher (class-conditional, CFG at W = 2 on both sides: one batched call of 2B
per evaluation) and the DDPM CIFAR-10 UNet architecture (diffusers ``UNet2DModel`` with
google/ddpm-cifar10-32's published config, 35.7M parameters, RANDOM weights: latency does not
depend on the weights; the config is written to ``results/export_ddpm_cifar10_unet_config.json``).
Plans: DPM-Solver++(2M) at NFE 1 / 2 / 4; batches 1 and 8; dynamic-batch fp32 engines.

Timing: both sides on ONE thread (torch.set_num_threads(1), ORT intra_op_num_threads = 1): the
box is 2 shared cores, and two OpenMP threads there ran the digits UNet 20× slower. Warm-up, then
A B A B interleaved repeats; medians, and the ratio of the medians measured in the same run.
Every configuration is also checked: max relative error ORT vs executor on the timed inputs.
TensorRT: not measured (no TensorRT, no GPU here); the command is in the output.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/export_latency.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# google/ddpm-cifar10-32 unet/config.json (the published architecture) and its DDPM scheduler.
CIFAR_UNET = dict(
    sample_size=32, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    freq_shift=1, flip_sin_to_cos=False,
    down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[128, 256, 256, 256], layers_per_block=2, mid_block_scale_factor=1, downsample_padding=0,
    act_fn="silu", attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6,
)
CIFAR_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                   "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon"}


def models(quick: bool):
    from fewstep.runtime.diffusers_adapter import from_diffusers
    from fewstep.runtime.models import load

    t = load("digits")
    yield "digits", t.denoiser, t.shape, t.num_classes, t.content_hash, 2.0, (30 if not quick else 5)
    if quick:
        return
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR_UNET).eval().requires_grad_(False)
    den = from_diffusers(unet, CIFAR_SCHEDULER)
    yield "ddpm-cifar10-unet (random weights)", den, (3, 32, 32), None, "random-init-seed0", None, 3


def session(path):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = 1, 1
    return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])


def bench(quick: bool = False) -> dict:
    from fewstep.export.onnx import example_inputs, export_onnx
    from fewstep.runtime import sample
    from fewstep.runtime.solvers import build

    torch.set_num_threads(1)
    rows, exports = [], []
    from fewstep.report import machine

    info = machine(1, ort=True)
    nfes = (1, 2, 4) if not quick else (1, 2)
    with tempfile.TemporaryDirectory() as tmp:
        for name, den, shape, ncls, thash, w, repeats in models(quick):
            n_params = sum(p.numel() for p in den.parameters())
            for nfe in nfes:
                plan = build("dpmpp-2m", nfe, den.sigma_min, den.sigma_max)
                path = os.path.join(tmp, f"m{len(exports)}.onnx")
                t0 = time.perf_counter()
                res = export_onnx(den, plan, path, sample_shape=shape, num_classes=ncls, teacher_hash=thash)
                export_s = time.perf_counter() - t0  # incl. the eager check run and metadata
                t0 = time.perf_counter()
                sess = session(path)
                load_s = time.perf_counter() - t0
                exports.append({"model": name, "params": n_params, "nfe": nfe, "export_s": round(export_s, 2),
                                "trace_export_s": round(res.seconds, 2), "onnx_bytes": res.bytes,
                                "ort_session_s": round(load_s, 2)})
                print(f"export {name} NFE {nfe}: {export_s:.1f} s, {res.bytes / 1e6:.2f} MB", flush=True)
                for batch in (1, 8):
                    feeds = example_inputs(res.contract, batch, guidance=w if w is not None else 1.0)
                    tz = {k: torch.from_numpy(v) for k, v in feeds.items()}

                    def run_ort(sess=sess, feeds=feeds):
                        return sess.run(None, feeds)[0]

                    def run_py(plan=plan, den=den, tz=tz, w=w):
                        with torch.no_grad():
                            return sample(plan, den, tz["z"], cond=tz.get("class_labels"), guidance=w).numpy()

                    a, b = run_ort(), run_py()  # warm-up (and the check)
                    err = float(np.abs(a - b).max() / np.abs(b).max())
                    ta, tb = [], []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        run_ort()
                        ta.append(time.perf_counter() - t0)
                        t0 = time.perf_counter()
                        run_py()
                        tb.append(time.perf_counter() - t0)
                    ma, mb = statistics.median(ta), statistics.median(tb)
                    rows.append({"model": name, "nfe": nfe, "batch": batch, "repeats": repeats,
                                 "ort_ms": round(1e3 * ma, 3), "python_ms": round(1e3 * mb, 3),
                                 "speedup_python_over_ort": round(mb / ma, 3), "max_rel_err": err,
                                 "guidance": w})
                    print(f"  batch {batch}: ORT {1e3 * ma:.2f} ms, Python {1e3 * mb:.2f} ms "
                          f"(×{mb / ma:.2f}), err {err:.2g}", flush=True)
    info["load_average_end"] = os.getloadavg()
    trt_cmd = ("fewstep export --model digits --solver dpmpp-2m --nfe 4 --out digits_dpmpp2m4.onnx --tensorrt "
               "--trt-batch 1,8,64 --timing-cache trt.cache --triton-repo model_repository")
    return {"machine": info, "device": "CPU (ONNX Runtime CPUExecutionProvider vs torch CPU)", "exports": exports,
            "latency": rows, "tensorrt": {"status": "not measured (no TensorRT and no GPU on this machine)",
                                          "command": trt_cmd,
                                          "cifar_command": "fewstep export --model DIR --solver dpmpp-2m --nfe 4 "
                                                           "--out cifar.onnx --tensorrt (DIR: google/ddpm-cifar10-32 "
                                                           "downloaded: config.json, weights, scheduler_config.json)"}}


def markdown(r: dict) -> str:
    m = r["machine"]
    out = ["# Exported engines: export cost and CPU latency", "",
           f"Machine: {m['cpu']}, {m['cores']} cores (shared), {m['platform']}; torch {m['torch']}, "
           f"onnxruntime {m['onnxruntime']}, onnx {m['onnx']}; **CPU, one thread on each side**; load average "
           f"{m['load_average'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end (other jobs share "
           "the box: absolute times are noisy, the side-by-side ratio less so).", "",
           "Plans: DPM-Solver++(2M), dynamic-batch float32 engines (opset 17, TorchScript exporter). Digits: CFG "
           "W = 2 on both sides (2B rows per evaluation). CIFAR-10 UNet: google/ddpm-cifar10-32's architecture "
           "with random weights (config in export_ddpm_cifar10_unet_config.json).", "",
           "## Export", "", "| model | params | NFE | export s | ONNX MB | ORT session s |",
           "|---|---|---|---|---|---|"]
    for e in r["exports"]:
        out.append(f"| {e['model']} | {e['params'] / 1e6:.2f}M | {e['nfe']} | {e['export_s']:.1f} | "
                   f"{e['onnx_bytes'] / 1e6:.2f} | {e['ort_session_s']:.2f} |")
    out += ["", "## Latency (CPU, medians, A B A B interleaved after warm-up)", "",
            "| model | NFE | batch | repeats | ORT ms | Python executor ms | Python / ORT | max rel err |",
            "|---|---|---|---|---|---|---|---|"]
    for x in r["latency"]:
        out.append(f"| {x['model']} | {x['nfe']} | {x['batch']} | {x['repeats']} | {x['ort_ms']:.2f} | "
                   f"{x['python_ms']:.2f} | {x['speedup_python_over_ort']:.2f}× | {x['max_rel_err']:.1e} |")
    t = r["tensorrt"]
    out += ["", "## TensorRT", "", f"Build time and latency: **{t['status']}**. Command:", "",
            f"    {t['command']}", "", f"CIFAR-10 UNet: `{t['cifar_command']}`", ""]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="digits only, NFE 1/2, few repeats (a smoke run)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    from fewstep.runtime.plan import atomic_write_text

    r = bench(args.quick)
    os.makedirs(args.out, exist_ok=True)
    stem = "export_latency_quick" if args.quick else "export_latency"
    atomic_write_text(os.path.join(args.out, stem + ".json"), json.dumps(r, indent=1) + "\n")
    atomic_write_text(os.path.join(args.out, stem + ".md"), markdown(r))
    atomic_write_text(os.path.join(args.out, "export_ddpm_cifar10_unet_config.json"),
                      json.dumps({"_class_name": "UNet2DModel", **CIFAR_UNET, "scheduler": CIFAR_SCHEDULER},
                                 indent=1) + "\n")
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
