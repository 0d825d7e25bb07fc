"""CPU latency, side by side in one run (issue 18 item 5): fewstep's engine through the C++ runtime against
what CPU users run a fewstep sampler with today.

Paths, each in its own worker process (own thread pools, own ONNX Runtime library), timed in interleaved
rounds (the order rotates each round; before every call an idle gap, then a wait until *every* worker has
stopped burning CPU — ONNX Runtime's and OpenMP's workers spin after a run), medians:

- ``engine``: the exported sampler (one ONNX graph) through the C++ runtime (``_C.Engine``, CPU EP);
- ``engine_openvino``: the same engine file, C++ runtime, ONNX Runtime's OpenVINO execution provider (the
  onnxruntime-openvino build's libonnxruntime swapped in through the same dlopen, ``provider="openvino"``);
- ``eager``: the PyTorch executor (``fewstep.runtime.sample``), eager;
- ``compile``: the same executor call under ``torch.compile`` (inductor, static shapes; compile time reported);
- ``openvino``: OpenVINO's own runtime (``Core.compile_model`` on the same ONNX file, reshaped to the batch,
  f32 inference precision, latency hint).

Every path gets the same inputs (Philox seed 0: z and the noise slices the engine draws itself) and its output
is compared with the engine's (max |Δ| / max |engine|; bar: the float32 export tolerance ``verify`` derives).

Models: the shipped digits teacher and the DDPM CIFAR-10 UNet architecture (google/ddpm-cifar10-32's config,
random weights, written as a DDPMPipeline folder and loaded by the path a user takes). Plan: DPM-Solver++(2M),
NFE 4, W = 1 (the engine's B-row branch).

    .venv/bin/python benchmarks/cpu_suite.py [--models digits,cifar] [--batch 1,16,64] [--threads 1,2]
        [--repeats 20] [--big-repeats 5] [--paths engine,engine_openvino,eager,compile,openvino]

The OpenVINO wheels are not part of fewstep's lock: ``make openvino`` unpacks them (``pip download``, never
installed) under .venv/openvino; the script does the same on first use. Writes benchmarks/results/cpu_suite.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
WORK = os.path.join(ROOT, "out", "cpu_suite")
OV_DIR = os.path.join(ROOT, ".venv", "openvino")  # where `make openvino` unpacks them
OV_VERSIONS = {"onnxruntime-openvino": "1.24.1", "openvino": "2026.4.1"}
PATHS = ["engine", "engine_openvino", "eager", "compile", "openvino"]
TARGETS = {"engine / eager": "≤ 0.5 at batch 1, ≤ 0.8 at 16 and 64", "engine / compile": "≤ 1.0",
           "best engine / openvino": "≤ 1.1"}
GAP_MS, QUIET_WINDOW_MS, QUIET_CPU_MS, QUIET_MAX_S = 20.0, 20.0, 0.5, 3.0


# ---------------------------------------------------------------------------------------------- set-up
def ov_paths() -> tuple[str, str]:
    """(the onnxruntime-openvino libonnxruntime, the openvino package's site dir), unpacked on first use."""
    import glob
    import zipfile

    wheels = os.path.join(OV_DIR, "wheels")
    for pkg, ver in OV_VERSIONS.items():
        dest = os.path.join(OV_DIR, pkg)
        if os.path.isdir(dest):
            continue
        os.makedirs(wheels, exist_ok=True)
        found = glob.glob(os.path.join(wheels, pkg.replace("-", "_") + f"-{ver}*.whl"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"{pkg}=={ver}", "-d", wheels],
                           check=True)
            found = glob.glob(os.path.join(wheels, pkg.replace("-", "_") + f"-{ver}*.whl"))
        with zipfile.ZipFile(found[0]) as z:
            z.extractall(dest + ".tmp")
        os.replace(dest + ".tmp", dest)
    libs = glob.glob(os.path.join(OV_DIR, "onnxruntime-openvino", "onnxruntime", "capi", "libonnxruntime.so*"))
    return sorted(libs)[0], os.path.join(OV_DIR, "openvino")


def cifar_folder() -> str:
    """google/ddpm-cifar10-32's architecture with random weights (seed 0), saved as a DDPMPipeline folder."""
    path = os.path.join(WORK, "ddpm-cifar10-random")
    if os.path.exists(os.path.join(path, "model_index.json")):
        return path
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    sys.path.insert(0, HERE)
    from export_latency import CIFAR_SCHEDULER, CIFAR_UNET

    torch.manual_seed(0)
    unet = UNet2DModel(**CIFAR_UNET).eval()
    sched = DDPMScheduler(**{k: v for k, v in CIFAR_SCHEDULER.items() if not k.startswith("_")})
    DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def export(model: str, tag: str, batch: int) -> str:
    """The DPM-Solver++(2M) NFE-4 sampler at W = 1 (no guidance input: B rows per evaluation, the executor's
    work at W = 1) for a fixed batch, as a latency-bound deployment exports it (``fewstep export --batch B``):
    static shapes let every runtime plan the whole graph ahead."""
    path = os.path.join(WORK, f"{tag}-dpmpp-2m-4-w1-b{batch}.onnx")
    if os.path.exists(path):
        return path
    from fewstep.export.onnx import export_onnx
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import build

    t = load(model)
    plan = build("dpmpp-2m", 4, t.denoiser.sigma_min, t.denoiser.sigma_max)
    export_onnx(t.denoiser, plan, path, sample_shape=t.shape, num_classes=t.num_classes, teacher_hash=t.content_hash,
                batch=batch, guidance_input=False)
    return path


# ---------------------------------------------------------------------------------------------- workers
class Runner:
    """One path in a worker process: ``prepare(batch)`` builds (and warms) the call, ``run(batch)`` makes it."""

    def __init__(self, kind: str, engines: dict, model: str, threads: int, ov_lib: str):
        self.kind, self.engines, self.model, self.threads, self.ov_lib = kind, engines, model, threads, ov_lib
        self.calls, self.compile_s = {}, {}
        import torch

        torch.set_num_threads(threads)

    def feeds(self, batch: int) -> dict:
        import onnx

        from fewstep.export.onnx import example_inputs

        m = onnx.load(self.engines[str(batch)], load_external_data=False)
        contract = json.loads({p.key: p.value for p in m.metadata_props}["fewstep.contract"])
        return example_inputs(contract, batch, seed=0, guidance=1.0)

    def prepare(self, batch: int):
        f = self.feeds(batch)
        labels = f.get("class_labels")
        if self.kind in ("engine", "engine_openvino"):
            from fewstep.runtime.run import load_engine

            ov = self.kind == "engine_openvino"
            eng = load_engine(self.engines[str(batch)], threads=self.threads, provider="openvino" if ov else "cpu",
                              ort_library=self.ov_lib if ov else None)
            call = lambda: eng.sample(0, batch, labels=labels)  # noqa: E731
        elif self.kind in ("eager", "compile"):
            import torch

            from fewstep.runtime.executor import sample
            from fewstep.runtime.models import load
            from fewstep.runtime.solvers import build

            if not hasattr(self, "den"):
                t = load(self.model)
                self.den = t.denoiser
                self.plan = build("dpmpp-2m", 4, self.den.sigma_min, self.den.sigma_max)
            z = torch.from_numpy(f["z"])  # W = 1: the executor runs B rows, as the engine does
            noise = torch.from_numpy(f["noise"]) if "noise" in f else None
            cond = torch.from_numpy(labels) if labels is not None else None

            def fn(z, cond):
                return sample(self.plan, self.den, z, cond=cond, guidance=1.0 if cond is not None else None,
                              noise=noise)

            if self.kind == "compile":
                fn = torch.compile(fn, dynamic=False)

            def call():
                with torch.inference_mode():
                    return fn(z, cond).numpy()
        else:  # OpenVINO's own runtime on the same file
            import openvino as ov

            core = ov.Core()
            m = core.read_model(self.engines[str(batch)])  # static shapes: the engine has a fixed batch
            cm = core.compile_model(m, "CPU", {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY",
                                               "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1})
            req = cm.create_infer_request()
            # a port has several tensor names (the frontend adds aliases): feed it by the contract's name
            ins = {}
            for i, p in enumerate(cm.inputs):
                (name,) = set(p.get_names()) & set(f)
                ins[i] = f[name]

            def call():
                return req.infer(ins)[cm.outputs[0]].copy()
        t0 = time.perf_counter()
        out = call()  # the first call compiles (torch.compile) / plans (ORT, OpenVINO)
        self.compile_s[batch] = time.perf_counter() - t0
        if self.compile_s[batch] < 5:  # a second warm call where calls are cheap (caches, allocator, OpenMP)
            call()
        self.calls[batch] = call
        return out

    def run(self, batch: int) -> float:
        call = self.calls[batch]
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0


def worker(kind: str, engines: dict, model: str, threads: int, ov_lib: str, ov_site: str) -> int:
    """stdin/stdout protocol, one JSON object per line: {"cmd": "prepare"|"run"|"cpu"|"quit", "batch": B}."""
    if kind == "openvino":
        sys.path.insert(0, ov_site)
    if kind == "engine_openvino":
        os.environ["FEWSTEP_ORT_LIBRARY"] = ov_lib
    out = sys.stdout
    sys.stdout = sys.stderr  # library chatter must not break the protocol
    r = Runner(kind, engines, model, threads, ov_lib)
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if msg["cmd"] == "prepare":
                import numpy as np

                y = np.asarray(r.prepare(msg["batch"]), dtype=np.float64)
                np.save(msg["save"], y)
                reply = {"ok": True, "first_call_s": r.compile_s[msg["batch"]]}
            elif msg["cmd"] == "run":
                reply = {"ok": True, "s": r.run(msg["batch"])}
            elif msg["cmd"] == "cpu":
                reply = {"ok": True, "cpu": time.process_time()}
            else:
                return 0
        except Exception as exc:  # a path that cannot run here is reported, not fatal to the suite
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


class Worker:
    def __init__(self, kind, engines, model, threads, ov_lib, ov_site):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.kind = kind
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", kind, json.dumps(engines),
                                   model, str(threads), ov_lib, ov_site], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  env=env, text=True, cwd=ROOT)

    def ask(self, **msg) -> dict:
        self.p.stdin.write(json.dumps(msg) + "\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            return {"ok": False, "error": f"worker exited (rc {self.p.wait()})"}
        return json.loads(line)

    def close(self):
        try:
            self.ask(cmd="quit")
        except (BrokenPipeError, ValueError):
            pass
        self.p.wait(timeout=60)


def wait_quiet(workers) -> bool:
    """GAP_MS idle, then until no worker burns more than QUIET_CPU_MS of CPU over QUIET_WINDOW_MS."""
    time.sleep(GAP_MS / 1e3)
    t_end = time.perf_counter() + QUIET_MAX_S
    while time.perf_counter() < t_end:
        c0 = [w.ask(cmd="cpu")["cpu"] for w in workers]
        time.sleep(QUIET_WINDOW_MS / 1e3)
        c1 = [w.ask(cmd="cpu")["cpu"] for w in workers]
        if max(b - a for a, b in zip(c0, c1)) * 1e3 <= QUIET_CPU_MS:
            return True
    return False


# ---------------------------------------------------------------------------------------------- suite
def measure(tag, model, engines, batches, threads, paths, repeats_for, ov_lib, ov_site, log, rows, save) -> None:
    """One row per batch appended to ``rows`` (and saved) as it is measured."""
    import numpy as np

    workers = {k: Worker(k, engines, model, threads, ov_lib, ov_site) for k in paths}
    try:
        for batch in batches:
            live, first, errs, outs = {}, {}, {}, {}
            for k, w in workers.items():
                f = os.path.join(WORK, f"out_{tag}_{k}_b{batch}_t{threads}.npy")
                r = w.ask(cmd="prepare", batch=batch, save=f)
                if r["ok"]:
                    live[k], first[k], outs[k] = w, r["first_call_s"], np.load(f)
                else:
                    errs[k] = r["error"]
                    log(f"  {tag} b{batch} t{threads} {k}: not measured ({r['error']})")
            ref = outs.get("engine")
            agree = {k: float(np.abs(v - ref).max() / np.abs(ref).max()) for k, v in outs.items()} \
                if ref is not None else {}
            times = {k: [] for k in live}
            names = list(live)
            repeats = repeats_for(tag, batch)
            busy = 0
            for r in range(repeats):
                for k in names[r % len(names):] + names[:r % len(names)]:
                    busy += not wait_quiet(list(live.values()))
                    times[k].append(live[k].ask(cmd="run", batch=batch)["s"])
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            row = {"model": tag, "batch": batch, "threads": threads, "repeats": repeats, "median_ms": med,
                   "all_ms": {k: [x * 1e3 for x in v] for k, v in times.items()},
                   "first_call_s": first, "max_rel_diff_vs_engine": agree, "not_measured": errs,
                   "calls_not_quiet": busy, "load_avg": os.getloadavg()[0]}
            rows.append(row)
            save()
            log(f"  {tag} b{batch} t{threads}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()))
    finally:
        for w in workers.values():
            w.close()


def ratios(row) -> dict:
    m = row["median_ms"]
    out = {}
    if "engine" in m:
        for k in ("eager", "compile", "openvino"):
            if k in m:
                out[f"engine / {k}"] = m["engine"] / m[k]
        best = min((m[k], k) for k in ("engine", "engine_openvino") if k in m)
        out["best engine"] = best[1]
        if "openvino" in m:
            out["best engine / openvino"] = best[0] / m["openvino"]
    return out


def markdown(res) -> str:
    mc = res["machine"]
    lines = ["# CPU latency: fewstep's engine vs eager, torch.compile and OpenVINO (DPM-Solver++(2M), NFE 4)", "",
             f"{mc['cpu']}, {mc['cores']} cores; torch {mc['torch']}, ONNX Runtime {mc['onnxruntime']} (CPU EP), "
             f"onnxruntime-openvino {OV_VERSIONS['onnxruntime-openvino']}, OpenVINO {OV_VERSIONS['openvino']}. "
             "Each path in its own process; interleaved rounds, the order rotating; before every call "
             f"{GAP_MS:g} ms idle, then until no worker burns CPU; medians of the repeats (column `n`). "
             "W = 1: the engine is exported per batch (`--batch B`) without a guidance input, B rows per evaluation "
             "like the executor at W = 1; static shapes for every runtime. All outputs compared with the engine's on "
             "the same Philox inputs.",
             "", "Targets (issue 18): " + "; ".join(f"{k} {v}" for k, v in TARGETS.items()) + ".", "",
             "| model | batch | threads | n | engine ms | engine + OpenVINO EP ms | eager ms | torch.compile ms "
             "| OpenVINO ms | engine ÷ eager | engine ÷ compile | best engine ÷ OpenVINO | max rel. diff vs engine "
             "| load avg |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in res["rows"]:
        m, q = row["median_ms"], ratios(row)

        def c(k, m=m):
            return f"{m[k]:.2f}" if k in m else "–"

        def r(k, q=q):
            return f"{q[k]:.3f}" if k in q else "–"

        diff = ", ".join(f"{k} {v:.1e}" for k, v in row["max_rel_diff_vs_engine"].items() if k != "engine")
        best = f" ({q['best engine'].replace('engine_openvino', 'OV EP').replace('engine', 'CPU EP')})" \
            if "best engine" in q else ""
        lines.append(f"| {row['model']} | {row['batch']} | {row['threads']} | {row['repeats']} | {c('engine')} | "
                     f"{c('engine_openvino')} | {c('eager')} | {c('compile')} | {c('openvino')} | "
                     f"{r('engine / eager')} | {r('engine / compile')} | {r('best engine / openvino')}{best} | "
                     f"{diff} | {row['load_avg']:.1f} |")
    lines += ["", "First call (s; torch.compile's compile, ORT's / OpenVINO's graph planning), per row: see the JSON.",
              "", "Not measured: " + ("; ".join(f"{r['model']} b{r['batch']} t{r['threads']} {k}: {e}"
                                                 for r in res["rows"] for k, e in r["not_measured"].items())
                                      or "nothing"), "",
              f"Regenerate: `{res['command']}`", ""]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        k, engines, model, threads, ov_lib, ov_site = sys.argv[2:8]
        return worker(k, json.loads(engines), model, int(threads), ov_lib, ov_site)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,cifar")
    ap.add_argument("--batch", default="1,16,64")
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--repeats", type=int, default=20, help="rounds for digits and for CIFAR at batch 1")
    ap.add_argument("--big-repeats", type=int, default=5, help="rounds for CIFAR at batch ≥ 16 (seconds per call)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--tag", default="", help="suffix of the results files")
    args = ap.parse_args()
    from fewstep.report import machine, write_results

    os.makedirs(WORK, exist_ok=True)
    paths = args.paths.split(",")
    ov_lib, ov_site = ov_paths() if any("openvino" in p for p in paths) else ("", "")
    models = {"digits": "digits", "cifar": None}
    t_start = time.time()

    def log(s):
        print(f"[{time.time() - t_start:7.1f} s] {s}", flush=True)

    rows = []

    def save():  # after every row: a long run that stops early keeps what it measured
        res = {"machine": machine(0, ort=True), "rows": rows, "ratios": [ratios(r) for r in rows],
               "command": "python benchmarks/cpu_suite.py " + " ".join(sys.argv[1:]), "targets": TARGETS}
        write_results(args.out, f"cpu_suite{args.tag}", res, markdown(res))
        return res

    for tag in args.models.split(","):
        model = models[tag] or cifar_folder()
        batches = [int(b) for b in args.batch.split(",")]
        engines = {str(b): export(model, tag, b) for b in batches}
        for threads in [int(t) for t in args.threads.split(",")]:
            measure(tag, model, engines, batches, threads, paths,
                            lambda tag, b: args.big_repeats if tag == "cifar" and b >= 16 else args.repeats,
                            ov_lib, ov_site, log, rows, save)
    print(markdown(save()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
