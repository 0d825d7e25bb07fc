"""GPU suite for the fused update and the whole-loop CUDA graph (issue 6, item 6). One script, one device call.

Measures, on the CUDA device it runs on:

1. device copy bandwidth (``dst.copy_(src)``, 2 bytes moved per byte copied) at 64 and 256 MB;
2. the fused update (``fewstep.kernels.fused_update``, K = 0..4, fp32 / fp16, with and without in-kernel noise):
   GB/s over the bytes it must move ((reads + 3 writes)·N·size) and its ratio to copy; the unfused torch eager
   update (``fused_update_ref``) and ``torch.compile`` of it; CUDA kernel launches per update (profiler);
3. end-to-end sampler latency, DPM-Solver++(2M) at NFE 1 / 2 / 4, batch 1 / 8 / 64, for the digits teacher and
   the DDPM CIFAR-10 UNet architecture (diffusers UNet2DModel, google/ddpm-cifar10-32's config, RANDOM weights:
   latency does not depend on them): reference executor, fused, fused + CUDA graph, ``torch.compile(mode=
   "max-autotune")`` of the reference loop (batch 1 by default: compiles take minutes), network-only × NFE (the
   floor, one eager network call; the graphed network call is recorded too). Every fast path is checked
   against the reference executor on the timed inputs.

Timing: CUDA events around each region, warm-up first, median of ``--reps``. Targets (issue 6): fused ≥ 85 % of
copy at ≥ 64 MB; one launch per evaluation; graph ÷ (NFE × network) ≤ 1.05 at batch 1; graph faster than compile.

    .venv/bin/python benchmarks/gpu_suite.py [--quick] [--out benchmarks/results]

Without a CUDA device it prints "no CUDA device" and exits 2 (``--allow-cpu`` runs a tiny smoke version of the
same code on CPU with the torch reference update and no graph/compile — for testing the script, not numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
COMMAND = ".venv/bin/python benchmarks/gpu_suite.py"


def parse(argv=None):
    ap = argparse.ArgumentParser(prog="gpu_suite.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=RESULTS, help="results directory (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="fewer sizes, reps and configurations")
    ap.add_argument("--reps", type=int, default=None, help="timed repeats per measurement (median reported)")
    ap.add_argument("--models", nargs="+", default=["digits", "cifar10"], choices=["digits", "cifar10"])
    ap.add_argument("--nfe", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode for the loop baseline")
    ap.add_argument("--compile-batches", nargs="*", type=int, default=[1],
                    help="batches that get the torch.compile loop baseline (default: %(default)s; none: skip)")
    ap.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------
# timing

def _sync(dev):
    if dev == "cuda":
        torch.cuda.synchronize()


def bench(fn, dev, reps=20, warmup=3) -> float:
    """Median milliseconds of ``fn()``; CUDA events on a GPU."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        if dev == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cuda_launches(fn, dev) -> dict | None:
    """Launch API calls the host makes in one call of ``fn`` (cudaLaunchKernel, cuLaunchKernel[Ex],
    cudaGraphLaunch) and the CUDA kernels that ran (a graph replay runs many kernels from one launch);
    None where the profiler cannot count."""
    if dev != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        _sync(dev)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            _sync(dev)
        cuda = torch.autograd.DeviceType.CUDA
        evs = list(prof.events())
        api = sum(1 for e in evs if e.device_type != cuda and re.fullmatch(r"cu(da)?(Graph)?Launch\w*", e.name))
        kernels = sum(1 for e in evs if e.device_type == cuda)
        return {"api": api, "kernels": kernels}
    except Exception:  # noqa: BLE001 - the profiler is best effort; the count is then "not measured"
        return None


def machine(dev) -> dict:
    import triton

    m = {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
         "triton": triton.__version__, "device": "cpu"}
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        m.update(device=torch.cuda.get_device_name(0), capability=f"sm_{p.major}{p.minor}",
                 memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            import subprocess

            m["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            m["driver"] = "unknown"
    return m


# --------------------------------------------------------------------------------------------------------------
# 1 + 2: copy and the update

def copy_gbps(n_bytes, dev, reps) -> dict:
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=dev).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), dev, reps)
    return {"mb": n_bytes / 2**20, "ms": ms, "gbps": 2 * n_bytes / ms / 1e6}


def _row(k, g, w):
    from fewstep.kernels.fused_update import MAX_HISTORY, RowCoefs

    return RowCoefs(a=0.9, p=(0.3,) * k, s=0.5, c=0.8, q=(0.4,) * (k + 1), g=g, w=w, skip=0.1, scale=0.9,
                    has_next=True, a_next=1.1, p_next=(0.2,) * min(k + 1, MAX_HISTORY), c_in_next=0.7)


def update_rows(dev, sizes_mb, reps, use_kernel) -> list[dict]:
    from fewstep.kernels.fused_update import fused_update_ref

    out = []
    compiled = torch.compile(fused_update_ref) if dev == "cuda" else None
    for dtype in (torch.float32, torch.float16):
        for mb in sizes_mb:
            for k in (0, 1, 2, 3, 4, 9):  # 9: a cross-form D-ODE plan at 10 NFE reads every past entry
                for noise in (False, True):
                    if noise and k not in (0, 2):
                        continue
                    out.append(_update_case(dev, dtype, mb, k, noise, reps, use_kernel, compiled))
    return out


def _update_case(dev, dtype, mb, k, noise, reps, use_kernel, compiled) -> dict:
    from fewstep.kernels.fused_update import fused_update, fused_update_ref, seed_tensor

    n = int(mb * 2**20) // torch.tensor([], dtype=dtype).element_size()
    coefs = _row(k, 0.5 if noise else 0.0, 1.0)
    x, d = (torch.randn(n, device=dev).to(dtype) for _ in range(2))
    hist = [torch.randn(n, device=dev).to(dtype) for _ in range(k)]
    eps = torch.randn(n, device=dev).to(dtype) if noise else None  # the torch paths read ε; the kernel draws it
    bufs = [torch.empty_like(x) for _ in range(3)]
    seed = seed_tensor(1, dev)
    n_bytes = (2 + k + 3) * n * x.element_size()  # reads x, d, K history entries; writes h, x', u'
    rec = {"dtype": str(dtype).replace("torch.", ""), "mb": mb, "k": k, "noise": noise, "bytes_moved": n_bytes}
    if use_kernel:
        def fk():
            return fused_update(x, hist, d, coefs, seed=seed, h_out=bufs[0], x_out=bufs[1], u_out=bufs[2])

        rec["fused_ms"] = bench(fk, dev, reps)
        rec["fused_gbps"] = n_bytes / rec["fused_ms"] / 1e6
        rec["fused_launches"] = cuda_launches(fk, dev)

    def fr():
        return fused_update_ref(x, hist, d, coefs, eps=eps)

    rec["eager_ms"] = bench(fr, dev, reps)
    rec["eager_gbps"] = n_bytes / rec["eager_ms"] / 1e6
    rec["eager_launches"] = cuda_launches(fr, dev)
    if compiled is not None:
        rec["compile_ms"] = bench(lambda: compiled(x, hist, d, coefs, eps=eps), dev, reps)
        rec["compile_gbps"] = n_bytes / rec["compile_ms"] / 1e6
    return rec


# --------------------------------------------------------------------------------------------------------------
# 3: end to end

def load_model(name, dev):
    if name == "digits":
        from fewstep.runtime.digits_net import load_teacher

        return load_teacher().to(dev).eval(), (1, 8, 8), "labels"
    sys.path.insert(0, HERE)
    from diffusers import UNet2DModel
    from export_latency import CIFAR_SCHEDULER, CIFAR_UNET

    from fewstep.runtime.diffusers_adapter import from_diffusers

    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR_UNET).eval().requires_grad_(False)
    return from_diffusers(unet, CIFAR_SCHEDULER).to(dev).eval(), (3, 32, 32), None


def e2e_rows(dev, models, nfes, batches, reps, compile_mode, compile_batches, use_kernel) -> list[dict]:
    from fewstep.runtime import solvers

    out = []
    for name in models:
        den, shape, cond_kind = load_model(name, dev)
        for b in batches:
            gen = torch.Generator(device="cpu").manual_seed(b)
            z = torch.randn((b, *shape), generator=gen).to(dev)
            cond = (torch.arange(b) % 10).to(dev) if cond_kind == "labels" else None
            net_ms, net_graph_ms = _network_ms(den, z, cond, dev, reps)
            for nfe in nfes:
                plan = solvers.build("dpmpp-2m", nfe, den.sigma_min, den.sigma_max)
                rec = {"model": name, "batch": b, "nfe": nfe, "network_ms": net_ms, "network_graph_ms": net_graph_ms,
                       "floor_ms": nfe * net_ms}
                rec.update(_e2e_case(plan, den, z, cond, dev, reps, use_kernel,
                                     compile_mode if b in compile_batches else None))
                rec["graph_over_floor"] = rec["graph_ms"] / rec["floor_ms"] if "graph_ms" in rec else None
                out.append(rec)
                print(json.dumps(rec), flush=True)
        del den
        if dev == "cuda":
            torch.cuda.empty_cache()
    return out


def _network_ms(den, z, cond, dev, reps):
    sig = torch.full((z.shape[0],), 1.0, device=dev)
    eager = bench(lambda: den(z, sig, cond), dev, reps)
    return eager, (_graphed_network_ms(den, z, sig, cond, reps) if dev == "cuda" else None)


def _e2e_case(plan, den, z, cond, dev, reps, use_kernel, compile_mode) -> dict:
    from fewstep.runtime import fast, sample

    rec = {}
    ref = sample(plan, den, z, cond=cond)
    scale = float(ref.abs().max()) + 1e-12
    rec["reference_ms"] = bench(lambda: sample(plan, den, z, cond=cond), dev, reps)
    fs = fast.FastSampler(plan, den, z, cond, use_kernel=use_kernel)
    rec["fused_ms"] = bench(lambda: fs.run(z, cond), dev, reps)
    rec["fused_max_rel_err"] = float((fs.run(z, cond) - ref).abs().max()) / scale
    if dev == "cuda":
        cg = fast.CUDAGraphSampler(plan, den, z, cond).capture()
        rec["graph_ms"] = bench(lambda: cg.run(z, cond), dev, reps)
        rec["graph_max_rel_err"] = float((cg.run(z, cond) - ref).abs().max()) / scale
        rec["graph_launches"] = cuda_launches(cg.graph.replay, dev)
        rec["fused_launches_per_batch"] = cuda_launches(lambda: fs.run(z, cond), dev)
        if compile_mode is not None:
            rec.update(_compiled_loop(plan, den, z, cond, ref, scale, compile_mode, dev, reps))
    return rec


def _graphed_network_ms(den, z, sig, cond, reps):
    zs = z.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            den(zs, sig, cond)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        den(zs, sig, cond)
    return bench(g.replay, "cuda", reps)


def _compiled_loop(plan, den, z, cond, ref, scale, mode, dev, reps) -> dict:
    from fewstep.runtime import sample

    torch._dynamo.reset()
    loop = torch.compile(lambda zz: sample(plan, den, zz, cond=cond), mode=mode)
    t = time.perf_counter()
    try:
        got = loop(z)
        _sync(dev)
    except Exception as exc:  # noqa: BLE001 - a failed compile is a result to report, not a crash
        return {"compile_error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    rec = {"compile_s": time.perf_counter() - t, "compile_mode": mode}
    rec["compile_ms"] = bench(lambda: loop(z), dev, reps)
    rec["compile_max_rel_err"] = float((got - ref).abs().max()) / scale
    return rec


# --------------------------------------------------------------------------------------------------------------
# report

def _fmt(v, nd=3):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}g}"
    return str(v)


def _launch(v):
    return "—" if not v else f"{v['api']} ({v['kernels']} kernels)"


def markdown(res) -> str:
    m = res["machine"]
    lines = [f"# GPU suite — {m['device']}", "",
             f"{m.get('capability', '')} · driver {m.get('driver', '—')} · CUDA {m.get('cuda', '—')} · "
             f"torch {m['torch']} · triton {m['triton']} · `{COMMAND}`", "",
             "## Copy bandwidth", "", "| MB | ms | GB/s |", "|---|---|---|"]
    for c in res["copy"]:
        lines.append(f"| {c['mb']:.0f} | {c['ms']:.4g} | {c['gbps']:.1f} |")
    copy = max(c["gbps"] for c in res["copy"]) if res["copy"] else None
    lines += ["", "## Fused update (bytes = (2 + K + 3)·N·size; ratio = fused GB/s ÷ best copy GB/s)", "",
              "| dtype | MB | K | noise | fused GB/s | ÷ copy | launches (kernels) | eager GB/s | eager launches | "
              "compile GB/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for u in res["update"]:
        ratio = u.get("fused_gbps") / copy if copy and u.get("fused_gbps") else None
        lines.append(f"| {u['dtype']} | {u['mb']} | {u['k']} | {'yes' if u['noise'] else 'no'} | "
                     f"{_fmt(u.get('fused_gbps'), 4)} | {_fmt(ratio)} | {_launch(u.get('fused_launches'))} | "
                     f"{_fmt(u.get('eager_gbps'), 4)} | {_launch(u.get('eager_launches'))} | "
                     f"{_fmt(u.get('compile_gbps'), 4)} |")
    lines += ["", "## End to end (DPM-Solver++(2M), ms per batch; floor = NFE × one eager network call)", "",
              "| model | batch | NFE | network | floor | reference | fused | fused+graph | graph ÷ floor | "
              "compile loop | graph launches | max rel err (fused / graph) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in res["e2e"]:
        lines.append(f"| {e['model']} | {e['batch']} | {e['nfe']} | {_fmt(e['network_ms'])} | "
                     f"{_fmt(e['floor_ms'])} | {_fmt(e['reference_ms'])} | {_fmt(e['fused_ms'])} | "
                     f"{_fmt(e.get('graph_ms'))} | {_fmt(e.get('graph_over_floor'))} | "
                     f"{_fmt(e.get('compile_ms', e.get('compile_error')))} | {_launch(e.get('graph_launches'))} | "
                     f"{_fmt(e.get('fused_max_rel_err'))} / {_fmt(e.get('graph_max_rel_err'))} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print(f"gpu_suite: no CUDA device (torch.cuda.is_available() is False): nothing measured. "
              f"Run on a GPU machine: {COMMAND}", file=sys.stderr)
        return 2
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cpu_smoke = dev == "cpu"
    reps = args.reps or (3 if cpu_smoke else (10 if args.quick else 30))
    sizes = [0.25] if cpu_smoke else ([64] if args.quick else [64, 256])
    nfes = [1] if cpu_smoke else args.nfe
    batches = [1] if cpu_smoke else ([1, 8] if args.quick else args.batch)
    models = ["digits"] if cpu_smoke else args.models
    res = {"command": COMMAND + (" --quick" if args.quick else ""), "machine": machine(dev),
           "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    with torch.inference_mode():
        res["copy"] = [copy_gbps(int(mb * 2**20), dev, reps) for mb in sizes]
        print(json.dumps(res["copy"]), flush=True)
    res["update"] = update_rows(dev, sizes, reps, use_kernel=not cpu_smoke)
    with torch.no_grad():
        res["e2e"] = e2e_rows(dev, models, nfes, batches, reps, args.compile_mode,
                              [] if cpu_smoke else args.compile_batches, use_kernel=not cpu_smoke)
    slug = re.sub(r"[^a-z0-9]+", "_", res["machine"]["device"].lower()).strip("_")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"gpu_suite_{slug}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown(res))
    print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
