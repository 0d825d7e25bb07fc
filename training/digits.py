"""The digits teacher: a small class-conditional UNet on scikit-learn's 8×8 handwritten digits.

Data: ``training/data.py`` (scikit-learn's digits, a fixed stratified split).

Model: EDM preconditioning (Karras et al. 2022) around a two-level UNet (8×8 → 4×4, GroupNorm +
SiLU residual blocks, scale/shift conditioning on a sinusoidal embedding of t = ¼ ln σ plus a
class embedding with 11 entries: the digits 0..9 and the null label 10 for classifier-free
guidance). Training: the EDM loss (ln σ ~ N(−1.2, 1.2²), weight (σ² + σd²)/(σ·σd)²), Adam with
warm-up, label dropout 0.1, an EMA of the weights for sampling.

Reproduce the shipped weights (runtime/weights/digits_teacher.*)::

    OMP_NUM_THREADS=1 python -m fewstep.training.digits   # trains in out/digits_teacher, copies the result

(one thread: on the shared 2-core machine two OpenMP threads ran 10× slower than one.)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from ..report import cpu_name
from ..runtime.denoisers import EDMDenoiser
from ..runtime.digits_net import (
    NULL_LABEL,
    NUM_CLASSES,
    TEACHER_FILE,
    WEIGHTS_DIR,
    DigitsUNet,
    UNetConfig,
    _resolve,
    load_teacher,
    make_denoiser,
    teacher_hash,
)
from ..runtime.plan import atomic_write_text
from . import trainer
from .data import SPLIT_SEED, TEST_PER_CLASS, load_digits_split, measure_sigma_data


# --- training --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 200  # linear LR warm-up steps; constant afterwards (so resuming never depends on the total)
    ema_halflife: int = 500  # steps; EMA decay 0.5^(1/halflife), with a (1+k)/(10+k) ramp early on
    p_uncond: float = 0.1  # label dropout → the null label, for classifier-free guidance
    p_mean: float = -1.2
    p_std: float = 1.2
    grad_clip: float = 1.0
    ckpt_every: int = 500

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["unet"] = UNetConfig.from_dict(d["unet"])
        return cls(**d)


SHIPPED_STEPS = 4000  # 712 s measured, 1 thread on the shared 2-core machine (0.11–0.18 s/step)


def edm_loss(den: EDMDenoiser, x0, labels, sigma_data: float, cfg: TrainConfig, gen: torch.Generator):
    """EDM's loss: σ log-normal, λ(σ) = (σ² + σd²)/(σ·σd)² so every σ contributes ~unit target variance."""
    b = x0.shape[0]
    sigma = (torch.randn(b, generator=gen) * cfg.p_std + cfg.p_mean).exp()
    noise = torch.randn(x0.shape, generator=gen) * sigma[:, None, None, None]
    drop = torch.rand(b, generator=gen) < cfg.p_uncond
    labels = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)
    d = den(x0 + noise, sigma, labels)
    w = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return (w[:, None, None, None] * (d - x0) ** 2).mean()


def _teacher_step_seed(seed: int, step: int, rank: int) -> int:
    # The shipped teacher was trained with (seed, step) → seed·1000003 + step; other ranks stay far from it.
    return seed * 1_000_003 + step + rank * 2**40


def train_teacher(out_dir: str, seed: int = 0, steps: int = SHIPPED_STEPS, batch: int | None = None,
                  progress: bool = True, resume: bool = True, config: TrainConfig | None = None) -> str:
    """Train (or resume) the digits teacher in ``out_dir``; returns the path of its EMA weights.

    The shared training loop (``trainer.run``: checkpoints every ``ckpt_every`` steps, exact resume, EMA,
    torchrun) with the teacher's per-step seed, so the shipped weights are reproduced bit for bit; at the
    end ``digits_teacher.safetensors`` + ``.json`` (the EMA weights, the sampling artifact).
    """
    cfg = config or TrainConfig()
    if batch is not None:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "batch": batch})
    x_train, y_train, _, _ = load_digits_split()
    sigma_data = round(measure_sigma_data(x_train), 4)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = DigitsUNet(cfg.unet)
    den = make_denoiser(model, sigma_data)

    def loss_fn(net, gen, b):
        idx = torch.randint(x_train.shape[0], (b,), generator=gen)
        den.model = net  # the model or its DDP wrapper
        return edm_loss(den, x_train[idx], y_train[idx], sigma_data, cfg, gen)

    loop = trainer.LoopConfig(steps=steps, batch=cfg.batch, lr=cfg.lr, warmup=cfg.warmup, grad_clip=cfg.grad_clip,
                              ema_halflife=cfg.ema_halflife, ckpt_every=cfg.ckpt_every)
    record = {"stage": "digits-teacher", "config": cfg.to_dict(), "sigma_data": sigma_data}
    ema, info = trainer.run(model, loss_fn, loop, out_dir, seed, record, "digits teacher", progress, resume,
                            step_seed=_teacher_step_seed)
    path = os.path.join(out_dir, TEACHER_FILE)
    trainer.save_safetensors(path, ema.state_dict())
    meta = {"format": "fewstep.digits-teacher/1", "config": trainer.jsonable(cfg.unet.__dict__),
            "sigma_data": sigma_data,
            "sigma_min": 0.002, "sigma_max": 80.0, "null_label": NULL_LABEL, "seed": seed, "steps": info["steps"],
            "batch": cfg.batch, "train": trainer.jsonable(cfg.to_dict()), "loss": info["loss"],
            "wall_seconds": info["wall_seconds"], "threads": info["threads"], "torch": torch.__version__,
            "data": f"sklearn load_digits, x/8-1, stratified split seed {SPLIT_SEED}, {TEST_PER_CLASS}/class held out"}
    atomic_write_text(path[: -len(".safetensors")] + ".json", json.dumps(meta, indent=1) + "\n")
    return path


# --- quality ---------------------------------------------------------------------------------
def sample_teacher(den, n: int, nfe: int = 35, seed: int = 0, guidance: float | None = None, batch: int = 500):
    """n samples with EDM Heun at ``nfe``; labels i mod 10 (classes evenly drawn); z from a seeded torch generator."""
    from ..runtime import sample, solvers

    plan = solvers.build("heun", nfe, den.sigma_min, den.sigma_max)
    z = torch.randn((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(n) % NUM_CLASSES
    out = []
    with torch.no_grad():
        for i in range(0, n, batch):
            out.append(sample(plan, den, z[i:i + batch], cond=labels[i:i + batch], guidance=guidance))
    return torch.cat(out), labels


def teacher_quality(n: int = 1000, nfe: int = 35, seed: int = 0, guidances=(1.0, 2.0), path: str | None = None,
                    out_dir: str | None = "benchmarks/results") -> dict:
    """FD-digits and class accuracy of the teacher (Heun, ``nfe``) against the 300 held-out digits,
    with real-vs-real floors; writes ``teacher_quality.json`` + ``.md`` in ``out_dir`` (None: don't)."""
    import platform

    from . import metrics

    den = load_teacher(path)
    x_train, y_train, x_test, y_test = load_digits_split()
    machine = (f"{cpu_name()} ({platform.machine()}), {os.cpu_count()} cpus, "
               f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    with open(_resolve(path)[: -len(".safetensors")] + ".json") as f:
        meta = json.load(f)
    res = {"teacher": teacher_hash(path), "teacher_steps": meta["steps"], "teacher_seed": meta["seed"],
           "teacher_train_seconds": meta["wall_seconds"], "solver": "heun", "nfe": nfe, "n": n, "seed": seed,
           "reference": "300 held-out real digits (30/class)", "machine": machine, "rows": []}
    for w in guidances:
        t0 = time.perf_counter()
        x, labels = sample_teacher(den, n, nfe, seed, None if w == 1.0 else w)
        secs = time.perf_counter() - t0
        res["rows"].append({"what": f"teacher, guidance {w:g}", "guidance": w,
                            "fd_digits": float(metrics.fd_digits(x, x_test)),
                            "class_accuracy": float(metrics.class_accuracy(x, labels)),
                            "sample_seconds": round(secs, 2)})
    res["rows"].append({"what": "real train (1497) vs held-out (floor)", "guidance": None,
                        "fd_digits": float(metrics.fd_digits(x_train, x_test)),
                        "class_accuracy": float(metrics.class_accuracy(x_train, y_train))})
    res["rows"].append({"what": "real held-out vs itself (sanity: FD 0; the classifier's accuracy)", "guidance": None,
                        "fd_digits": float(metrics.fd_digits(x_test, x_test)),
                        "class_accuracy": float(metrics.class_accuracy(x_test, y_test))})
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "teacher_quality.json"), json.dumps(res, indent=1) + "\n")
        lines = [f"# Digits teacher quality\n\nTeacher `{res['teacher'][:19]}…`, EDM Heun at {nfe} NFE, n = {n} "
                 f"(classes evenly drawn), seed {seed}. FD-digits: Fréchet distance of the shipped classifier's "
                 f"64-d features against the {res['reference']}; the floor row compares 1,497 real train digits "
                 f"with the same 300. Teacher: {meta['steps']} steps, seed {meta['seed']}, trained in "
                 f"{meta['wall_seconds']:.0f} s. Machine: {res['machine']}.\n",
                 "| samples | FD-digits | class accuracy |", "|---|---:|---:|"]
        for r in res["rows"]:
            lines.append(f"| {r['what']} | {r['fd_digits']:.3f} | {r['class_accuracy']:.3f} |")
        atomic_write_text(os.path.join(out_dir, "teacher_quality.md"), "\n".join(lines) + "\n")
    return res


def main(argv=None) -> None:
    """Reproduce the shipped teacher: train in ``out/digits_teacher`` (resumable), copy the EMA weights
    and their JSON into runtime/weights/ (the training state, 4× larger, stays behind)."""
    import shutil
    import sys

    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else os.path.join("out", "digits_teacher")
    path = train_teacher(out, seed=0, steps=SHIPPED_STEPS)
    for src in (path, path[: -len(".safetensors")] + ".json"):
        shutil.copyfile(src, os.path.join(WEIGHTS_DIR, os.path.basename(src)))
    print(f"digits teacher -> {os.path.join(WEIGHTS_DIR, TEACHER_FILE)} ({teacher_hash()})")


if __name__ == "__main__":
    main()
