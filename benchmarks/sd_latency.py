"""Stable Diffusion 1.5's UNet (published config, random weights, ≈860M parameters) at 512² on the CPU: fewstep's
one engine through the C++ runtime vs the optimum-style loop vs diffusers' pipeline in torch eager (issue 16).

Three ways to run the same sampler (DPM-Solver++(2M), 4 network evaluations, CFG W = 7.5 as one batched call of
2 rows, batch 1, latents out), each in its own process (so its peak memory is its own), at 1 thread and at all
threads:
  (a) fewstep: `fewstep export --attention ort` writes the whole sampler as one ONNX graph (CFG and the solver's
      coefficients in the graph, attention as ONNX Runtime's fused MultiHeadAttention, external data over 2 GB);
      `fewstep-run --bench` times it in the C++ runtime; (a0) the same with `--attention onnx` (standard ops);
  (b) optimum-style: the UNet alone as ONNX in ONNX Runtime, called once per step from a Python loop around
      diffusers' DPMSolverMultistepScheduler (what optimum's ORTStableDiffusionPipeline does); (b') the same loop
      over a UNet exported with the same fused attention (what the fusion alone is worth, outside fewstep);
  (c) diffusers' StableDiffusionPipeline in torch eager with the same scheduler.
On OpenVINO (the wheels `make openvino` unpacks; --paths fewstep_ov,ov_loop):
  (a_ov) the plain engine of (a0) through the C++ runtime on ONNX Runtime's OpenVINO execution provider
      (`fewstep-run --provider openvino`, the onnxruntime-openvino library swapped in by FEWSTEP_ORT_LIBRARY);
  (b_ov) optimum-intel-style: the plain UNet ONNX of (b) compiled by OpenVINO's own runtime (CPU, f32, latency
      hint), called once per step from the same Python loop around diffusers' scheduler.
Prompt embeddings are random tensors of the text encoder's shape (the text encoder runs once per prompt in every
path and is not part of the sampler). Medians over --repeats after one warm-up. Writes
benchmarks/results/sd15_latency.{json,md}.

  python benchmarks/sd_latency.py                   # the SD 1.5 UNet (≈ 20 min on 2 cores, 14 GB of RAM)
  python benchmarks/sd_latency.py --config tiny     # the same code path on a tiny UNet (seconds; for checking)
  python benchmarks/sd_latency.py --reuse-exports   # time again with the ONNX files of an earlier run (each export
                                                    # keeps its figures in <file>.export.json beside it)
  python benchmarks/sd_latency.py --reuse-exports --rounds 3 --threads 2
                                                    # paths interleaved round by round (a drifting box's speed
                                                    # falls on all of them alike)
  python benchmarks/sd_latency.py --paths fewstep_ov,fewstep_plain,ov_loop,ort_loop,eager --stem sd15_openvino
                                                    # OpenVINO beside the CPU paths (exports only what they run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
NFE, GUIDANCE, SEED = 4, 7.5, 0
PATHS = ("fewstep", "fewstep_plain", "ort_loop", "ort_loop_fused", "eager")
OV_PATHS = ("fewstep_ov", "ov_loop")
# the export each path runs (exports are made only for the paths asked for)
NEEDS = {"fewstep": "fewstep_sampler_fused", "fewstep_plain": "fewstep_sampler", "fewstep_ov": "fewstep_sampler",
         "ort_loop": "unet_only", "ov_loop": "unet_only", "ort_loop_fused": "unet_only_fused", "eager": None}

# runwayml/stable-diffusion-v1-5 unet/config.json and scheduler/scheduler_config.json as published (written here:
# nothing is downloaded).
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}
TINY_UNET = {**SD15_UNET, "sample_size": 8, "block_out_channels": [32, 64], "layers_per_block": 1,
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32, "attention_head_dim": 4,
             "norm_num_groups": 8}
SCHEDULER = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
             "algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "leading"}


def build_pipeline(folder: str, unet_cfg: dict) -> None:
    """A StableDiffusionPipeline folder: the UNet at ``unet_cfg`` (seeded random weights), a tiny VAE and text
    encoder (never run by the sampler: latents out, embeddings in), the SD 1.5 scheduler config."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if os.path.exists(os.path.join(folder, "model_index.json")):
        return
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D"], latent_channels=4, norm_num_groups=8)
    dim = unet_cfg["cross_attention_dim"]
    enc = CLIPTextModel(CLIPTextConfig(hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=1,
                                       num_attention_heads=4, vocab_size=64, max_position_embeddings=77))
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "!"]
                                        + [f"{c}</w>" for c in "abcdefghijklmnopqrstuvwxyz"])}
    with open(os.path.join(folder, "tokenizer", "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "tokenizer", "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tdir = os.path.join(folder, "tokenizer")
    tok = CLIPTokenizer(os.path.join(tdir, "vocab.json"), os.path.join(tdir, "merges.txt"))
    sched = DPMSolverMultistepScheduler.from_config(SCHEDULER)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=enc, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def inputs(unet_cfg: dict):
    """Prompt / negative-prompt embeddings [1, 77, dim] and the initial latents (fixed seeds), as float32 numpy."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    dim, s = unet_cfg["cross_attention_dim"], unet_cfg["sample_size"]
    emb = rng.standard_normal((1, 77, dim)).astype(np.float32)
    neg = rng.standard_normal((1, 77, dim)).astype(np.float32)
    lat = rng.standard_normal((1, 4, s, s)).astype(np.float32)
    return emb, neg, lat


# --- the three paths, each run in a child process (--path) ------------------------------------------------------
def path_eager(folder, unet_cfg, repeats):
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    emb, neg, lat = (torch.from_numpy(a) for a in inputs(unet_cfg))

    def once():
        with torch.inference_mode():
            return pipe(prompt_embeds=emb, negative_prompt_embeds=neg, latents=lat.clone(), num_inference_steps=NFE,
                        guidance_scale=GUIDANCE, output_type="latent", return_dict=False)[0]

    return _time(once, repeats), {}


def export_unet(folder: str, out: str, attention: str = "onnx") -> dict:
    """The UNet alone as ONNX (optimum's unet/model.onnx): sample, timestep, encoder_hidden_states → noise_pred;
    ``attention`` "ort": its attention layers as fewstep's exporter writes them with --attention ort."""
    import contextlib

    import onnx
    import torch
    from diffusers import UNet2DConditionModel

    from fewstep.export.attention import fused_attention

    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet"), local_files_only=True).eval()

    class Wrap(torch.nn.Module):
        def __init__(self, u):
            super().__init__()
            self.u = u

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.u(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    s, dim = unet.config.sample_size, unet.config.cross_attention_dim
    args = (torch.zeros(2, 4, s, s), torch.tensor([999.0, 999.0]), torch.zeros(2, 77, dim))
    t0 = time.perf_counter()
    tmp = out + ".tmp.onnx"
    with torch.no_grad(), fused_attention(unet) if attention == "ort" else contextlib.nullcontext():
        torch.onnx.export(Wrap(unet), args, tmp, dynamo=False, opset_version=17,
                          input_names=["sample", "timestep", "encoder_hidden_states"], output_names=["out_sample"],
                          dynamic_axes={"sample": {0: "b"}, "timestep": {0: "b"}, "encoder_hidden_states": {0: "b"},
                                        "out_sample": {0: "b"}})
    m = onnx.load(tmp)
    onnx.save_model(m, out, save_as_external_data=True, all_tensors_to_one_file=True, location=os.path.basename(out)
                    + ".data")
    os.unlink(tmp)
    for f in os.listdir(os.path.dirname(out)):  # the exporter's own per-tensor files, if it wrote any
        if f.startswith("onnx__") or f.endswith(".weight") or f.endswith(".bias"):
            os.unlink(os.path.join(os.path.dirname(out), f))
    size = os.path.getsize(out) + os.path.getsize(out + ".data")
    return {"export_seconds": round(time.perf_counter() - t0, 1), "bytes": size}


EXPORT = """
import json, resource, sys, time
from fewstep.export.onnx import export_teacher
from fewstep.runtime.models import load
from fewstep.runtime.solvers import build
from fewstep.training.fitcore import with_guidance
folder, out, w, nfe, attention = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
den = load(folder).denoiser
plan = with_guidance(build("dpmpp-2m", nfe, den.sigma_min, den.sigma_max), w)
t0 = time.perf_counter()
r = export_teacher(folder, plan, out, attention=attention)
print(json.dumps({"export_seconds": round(time.perf_counter() - t0, 1), "onnx_bytes": r.bytes,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def export_fewstep(folder: str, out: str, attention: str = "onnx") -> dict:
    """The whole sampler as one engine, W = 7.5 written into every row (CFG's two halves in the graph, one copy
    of the weights). Its own process: peak RSS."""
    p = subprocess.run([sys.executable, "-c", EXPORT, folder, out, str(GUIDANCE), str(NFE), attention],
                       capture_output=True, text=True, cwd="/")
    if p.returncode != 0:
        return {"error": (p.stderr.strip() or f"exit {p.returncode}").splitlines()[-1][:300]}
    res = json.loads(p.stdout.strip().splitlines()[-1])
    d = os.path.dirname(out)
    res["bytes"] = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
                       if f.startswith(os.path.basename(out)))
    return res


def path_ort_loop(folder, unet_cfg, repeats, threads, unet_file="unet.onnx", runtime="ort"):
    import numpy as np
    import torch
    from diffusers import DPMSolverMultistepScheduler

    model = os.path.join(folder, "onnx", unet_file)
    if runtime == "openvino":  # OpenVINO's own runtime on the same file (what optimum-intel's pipeline runs)
        from cpu_suite import ov_paths

        sys.path.insert(0, ov_paths()[1])
        import openvino as ov

        cm = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                    "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1})
        req = cm.create_infer_request()
        port = {n: p for p in cm.inputs for n in p.get_names()}

        def unet(feeds):
            return req.infer({port[k]: v for k, v in feeds.items()})[cm.outputs[0]].copy()
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])

        def unet(feeds):
            return sess.run(None, feeds)[0]
    sched = DPMSolverMultistepScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    emb, neg, lat = inputs(unet_cfg)
    cond = np.concatenate([neg, emb])

    def once():
        sched.set_timesteps(NFE)
        x = torch.from_numpy(lat.copy()) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t).numpy()
            tt = np.full((2,), float(t), np.float32)
            e = torch.from_numpy(unet({"sample": inp, "timestep": tt, "encoder_hidden_states": cond}))
            e = e[:1] + GUIDANCE * (e[1:] - e[:1])
            x = sched.step(e, t, x, return_dict=False)[0]
        return x

    return _time(once, repeats), {}


def fewstep_run_bench(engine: str, inputs_dir: str, threads: int, repeats: int, provider: str = "cpu") -> tuple:
    """(p50 seconds, stdout) of `fewstep-run ENGINE --bench repeats` (one warm-up first) at batch 1, the
    embeddings from ``inputs_dir``/emb.npy and neg.npy. Shared with benchmarks/sd_engine_ab.py."""
    # the venv's fewstep-run (pip install), else a development build's
    exe = shutil.which("fewstep-run", path=os.path.dirname(sys.executable)) \
        or os.path.join(HERE, "..", "build", "dev", "fewstep-run")
    cmd = [exe, engine, "--n", "1", "--threads", str(threads),
           "--input", f"encoder_hidden_states={os.path.join(inputs_dir, 'emb.npy')}",
           "--input", f"negative_encoder_hidden_states={os.path.join(inputs_dir, 'neg.npy')}", "--bench", str(repeats),
           "--provider", provider]
    env = dict(os.environ)
    if provider == "openvino":  # the onnxruntime-openvino build's library (OpenVINO's beside it)
        from cpu_suite import ov_paths

        env["FEWSTEP_ORT_LIBRARY"] = ov_paths()[0]
    elif "FEWSTEP_ORT_LIBRARY" not in env:  # a development build has no onnxruntime beside it: the Python package's
        from fewstep import _C

        env["FEWSTEP_ORT_LIBRARY"] = _C.find_ort_library()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd="/", env=env)
    if p.returncode != 0:
        raise RuntimeError(f"fewstep-run failed on {engine} ({p.returncode}): {p.stderr.strip()[-500:]}")
    line = next(ln for ln in p.stdout.splitlines() if "p50" in ln)
    return float(line.split("p50")[1].split()[0].strip(":= ms")) / 1e3, p.stdout.strip()


def path_fewstep(folder, unet_cfg, repeats, threads, engine="fewstep.onnx", provider="cpu"):
    """The engine exported by the parent, timed by fewstep-run's own --bench (p50 of `repeats` runs)."""
    import numpy as np

    emb, neg, _ = inputs(unet_cfg)
    d = os.path.join(folder, "onnx")
    np.save(os.path.join(d, "emb.npy"), emb)
    np.save(os.path.join(d, "neg.npy"), neg)
    p50, out = fewstep_run_bench(os.path.join(d, engine), d, threads, repeats, provider)
    # the engine's process is fewstep-run, not this Python (which only launched it)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"median_s": p50, "source": "fewstep-run --bench p50", "bench": out}, {"peak_rss_mib": round(rss / 1024)}


def _export(path: str, job, reuse: bool) -> dict:
    """Run an export job, its figures kept in ``<path>.export.json``; ``reuse``: an earlier run's file and figures."""
    side = path + ".export.json"
    if reuse and os.path.exists(path) and os.path.exists(side):
        with open(side) as f:
            return {**json.load(f), "reused": True}
    res = job()
    if "error" not in res:
        with open(side, "w") as f:
            json.dump(res, f)
    return res


def _time(once, repeats: int) -> dict:
    once()  # warm-up (allocations, ORT's first-run optimisation)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "times_s": [round(t, 4) for t in ts]}


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    cfg = SD15_UNET if args.config == "sd15" else TINY_UNET
    fn = {"eager": lambda: path_eager(args.dir, cfg, args.repeats),
          "ort_loop": lambda: path_ort_loop(args.dir, cfg, args.repeats, args.threads),
          "ort_loop_fused": lambda: path_ort_loop(args.dir, cfg, args.repeats, args.threads, "unet_fused.onnx"),
          "fewstep": lambda: path_fewstep(args.dir, cfg, args.repeats, args.threads, "fewstep_fused.onnx"),
          "fewstep_plain": lambda: path_fewstep(args.dir, cfg, args.repeats, args.threads),
          "fewstep_ov": lambda: path_fewstep(args.dir, cfg, args.repeats, args.threads, provider="openvino"),
          "ov_loop": lambda: path_ort_loop(args.dir, cfg, args.repeats, args.threads, runtime="openvino"),
          "export_unet": lambda: (export_unet(args.dir, os.path.join(args.dir, "onnx", "unet.onnx")), {}),
          "export_unet_fused": lambda: (export_unet(args.dir, os.path.join(args.dir, "onnx", "unet_fused.onnx"),
                                                    "ort"), {})}[args.path]
    res, extra = fn()
    rss = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # this path's own process
    print(json.dumps({"peak_rss_mib": rss, **res, **extra}))


def run_child(path: str, folder: str, config: str, threads: int, repeats: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.Popen([sys.executable, __file__, "--path", path, "--dir", folder, "--config", config,
                          "--threads", str(threads), "--repeats", str(repeats)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd="/")
    out, err = p.communicate()
    if p.returncode != 0:
        return {"error": err.strip().splitlines()[-1] if err.strip() else f"exit {p.returncode}"}
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="sd15", choices=("sd15", "tiny"))
    ap.add_argument("--work", default=os.path.join(HERE, "..", "out", "sd_latency"))
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--note", default="", help="a line for the markdown (what else ran on the box)")
    ap.add_argument("--reuse-exports", action="store_true",
                    help="keep ONNX files an earlier run exported (with their <file>.export.json figures)")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"which of {','.join(PATHS + OV_PATHS)} to time")
    ap.add_argument("--stem", help="results file name (default sd15_latency / sd_latency_tiny)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="interleave: this many rounds, every path once per round (its own process: a warm-up and "
                         "one timed run), so drift in the box's speed falls on all paths alike; ratios are medians "
                         "of the per-round ratios (0: --repeats runs of one path after another)")
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args(argv)
    if args.path:
        args.threads = int(args.threads)
        sys.path.insert(0, HERE)  # cpu_suite (the OpenVINO wheels)
        child(args)
        return 0
    paths = args.paths.split(",")
    bad = [p for p in paths if p not in NEEDS]
    if bad:
        raise SystemExit(f"--paths: unknown {', '.join(bad)}; known: {', '.join(NEEDS)}")
    from fewstep.report import machine, write_results

    cfg = SD15_UNET if args.config == "sd15" else TINY_UNET
    folder = os.path.abspath(os.path.join(args.work, args.config))
    t0 = time.perf_counter()
    build_pipeline(folder, cfg)
    built = time.perf_counter() - t0
    os.makedirs(os.path.join(folder, "onnx"), exist_ok=True)
    # each export in its own process too: the parent stays small while the children run
    d = os.path.join(folder, "onnx")
    jobs = {"unet_only": ("unet.onnx", lambda: run_child("export_unet", folder, args.config, os.cpu_count(), 0)),
            "unet_only_fused": ("unet_fused.onnx",
                                lambda: run_child("export_unet_fused", folder, args.config, os.cpu_count(), 0)),
            "fewstep_sampler": ("fewstep.onnx", lambda: export_fewstep(folder, os.path.join(d, "fewstep.onnx"))),
            "fewstep_sampler_fused": ("fewstep_fused.onnx",
                                      lambda: export_fewstep(folder, os.path.join(d, "fewstep_fused.onnx"), "ort"))}
    exports = {k: _export(os.path.join(d, f), job, args.reuse_exports) for k, (f, job) in jobs.items()
               if k in {NEEDS[p] for p in paths}}
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        if args.rounds:
            rounds = {p: [] for p in paths}
            for k in range(args.rounds):
                for path in paths:
                    r = run_child(path, folder, args.config, threads, 1)
                    rounds[path].append(r)
                    print(f"round {k + 1}", path, threads, {k: v for k, v in r.items() if k != "bench"}, flush=True)
            rows += [_merge_rounds(path, threads, rs) for path, rs in rounds.items()]
            continue
        for path in paths:
            r = run_child(path, folder, args.config, threads, args.repeats)
            rows.append({"path": path, "threads": threads, **r})
            print(path, threads, {k: v for k, v in r.items() if k != "bench"}, flush=True)
    n_params = None
    try:
        from diffusers import UNet2DConditionModel

        n_params = sum(p.numel() for p in UNet2DConditionModel(**cfg).parameters())
    except Exception:  # noqa: BLE001 - only for the header line
        pass
    res = {"config": args.config, "unet": cfg, "unet_parameters": n_params, "nfe": NFE, "guidance": GUIDANCE,
           "batch": 1, "repeats": args.repeats, "rounds": args.rounds, "note": args.note,
           "build_seconds": round(built, 1), "exports": exports, "rows": rows,
           "machine": machine(None, ort=True)}
    stem = args.stem or ("sd15_latency" if args.config == "sd15" else "sd_latency_tiny")
    write_results(args.out, stem, res, markdown(res))
    print(f"-> {os.path.join(args.out, stem)}.json/.md")
    return 0


def _merge_rounds(path: str, threads: int, rs: list[dict]) -> dict:
    """One path's rounds as one row: the median of its per-round times (``round_s``, one per round, None where
    that round failed), the largest peak RSS."""
    ok = [r for r in rs if "error" not in r]
    row = {"path": path, "threads": threads, "round_s": [r.get("median_s") for r in rs]}
    if not ok:
        return {**row, "error": rs[-1]["error"]}
    return {**row, "median_s": statistics.median(r["median_s"] for r in ok),
            "peak_rss_mib": max(r.get("peak_rss_mib", 0) for r in ok)}


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def markdown(r: dict) -> str:
    m = r["machine"]
    out = [f"# SD 1.5 UNet ({r['config']}, {r['unet_parameters'] or '?':,} parameters, random weights) on the CPU",
           "", f"DPM-Solver++(2M), {r['nfe']} evaluations, CFG W = {r['guidance']} (2 rows per call), batch 1, "
           + (f"latents out; {r['rounds']} rounds, every path once per round in its own process (a warm-up, "
              "then one timed run): times are medians over the rounds, ratios medians of the per-round ratios"
              if r.get("rounds") else f"latents out; median of {r.get('repeats', '?')} timed run(s) after one "
              "warm-up") + f". Machine: {m['cpu']}, "
           f"{m['cores']} cores (shared with other jobs; load average "
           f"{m['load_average'][0]:.1f} at the end), torch {m['torch']}, onnxruntime {m['onnxruntime']}. "
           "Generated by `python benchmarks/sd_latency.py" + ("" if r["config"] == "sd15" else " --config tiny")
           + (f" --rounds {r['rounds']}" if r.get("rounds") else "") + "`."
           + (f" {r['note']}" if r.get("note") else ""), "", "| export | seconds | size | peak RSS (MiB) |",
           "|---|---:|---:|---:|"]
    for k, e in r["exports"].items():
        out.append(f"| {k}{' (reused)' if e.get('reused') else ''} | {e.get('export_seconds', '–')} | "
                   + (_size(e["bytes"]) if "bytes" in e else e.get("error", "–")[:80])
                   + f" | {e.get('peak_rss_mib', '–')} |")
    labels = {"fewstep": ("(a)", "fewstep engine, fused attention"),
              "fewstep_plain": ("(a0)", "fewstep engine, plain"),
              "fewstep_ov": ("(a_ov)", "fewstep engine (plain) on the OpenVINO EP"),
              "ort_loop": ("(b)", "UNet ONNX + Python scheduler"),
              "ort_loop_fused": ("(b')", "(b) with fused attention"),
              "ov_loop": ("(b_ov)", "UNet ONNX in OpenVINO + Python scheduler"), "eager": ("(c)", "diffusers eager")}
    present = {x["path"] for x in r["rows"]}
    cols = [k for k in labels if k in present]
    ratios = [(a, b) for a, b in (("fewstep", "ort_loop"), ("fewstep", "eager"), ("fewstep_plain", "ort_loop"),
                                  ("ort_loop_fused", "ort_loop"), ("fewstep_ov", "ort_loop"), ("fewstep_ov", "eager"),
                                  ("fewstep_ov", "ov_loop"), ("fewstep_ov", "fewstep_plain"), ("ov_loop", "ort_loop"),
                                  ("ov_loop", "eager"))
              if a in present and b in present]
    out += ["", "| threads | " + " | ".join(" ".join(labels[k]) for k in cols) + " | "
            + "".join(f"{labels[a][0]}÷{labels[b][0]} | " for a, b in ratios)
            + "peak RSS " + " / ".join(labels[k][0].strip("()") for k in cols) + " (MiB) |",
            "|---:|" + "---:|" * (len(cols) + len(ratios)) + "---|"]
    for t in sorted({x["threads"] for x in r["rows"]}):
        by = {x["path"]: x for x in r["rows"] if x["threads"] == t}
        med = {k: by.get(k, {}).get("median_s") for k in cols}

        def f(v):
            return "–" if v is None else f"{v:.3f} s"

        def ratio(a, b, med=med, by=by):
            if med[a] is None or med[b] is None:
                return "–"
            pairs = [(x, y) for x, y in zip(by[a].get("round_s") or [], by[b].get("round_s") or [])
                     if x is not None and y is not None]
            return f"{statistics.median(x / y for x, y in pairs):.2f}" if pairs else f"{med[a] / med[b]:.2f}"

        rss = " / ".join(str(by.get(k, {}).get("peak_rss_mib", "–")) for k in cols)
        out.append(f"| {t} | " + " | ".join(f(med[k]) for k in cols) + " | "
                   + "".join(f"{ratio(a, b)} | " for a, b in ratios) + f"{rss} |")
    errs = [f"- {x['path']} at {x['threads']} thread(s): {x['error']}" for x in r["rows"] if "error" in x]
    if errs:
        out += ["", "Paths that did not run:", *errs]
    out += ["", "Peak RSS (`getrusage` ru_maxrss): the process that runs the sampler — fewstep-run for the (a) "
            "paths, the Python process for the (b) paths and (c)."]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
