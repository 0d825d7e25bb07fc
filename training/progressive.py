"""Progressive distillation (Salimans & Ho, 2022), stage 2 of guided distillation (Meng et al., 2023).

Time t ∈ [0, 1] maps to σ(t) = (σ_min^(1/ρ) + t·(σ_max^(1/ρ) − σ_min^(1/ρ)))^ρ (EDM's ρ = 7 spacing)
for t > 0 and σ(0) = 0, and an N-step sampler visits t = 1, 1 − 1/N, …, 1/N, then 0. Halving
keeps every other point, so the 2N-step grid contains the N-step one exactly.

One halving: the teacher (the previous student, at 2N steps) takes two DDIM steps
t → t − ½/N → t − 1/N from z_t = x0 + σ_t·ε, giving z_s; the student's one-step target is the x̃
whose DDIM step lands on z_s: ``x̃ = (z_s − (σ_s/σ_t)·z_t) / (1 − σ_s/σ_t)`` (``z_s`` when σ_s = 0;
the paper's VP formula with α = 1). Loss: x-MSE weighted by max(SNR, 1) = max(1/σ_t², 1)
("SNR-truncated"); Adam, grad clip 1, no EMA, LR decayed linearly to 0 within each halving.
The student is initialised from the teacher, and the W-conditioned student of stage 1 is
distilled at a random W ~ U[W_min, W_max] per sample, the teacher at the same W.

Each halving writes ``steps_N/student.safetensors`` (+ JSON: seeds, config, the teacher's
hash) and the Plans that sample it: ``plan.json`` (deterministic DDIM on the grid) and
``plan_stochastic.json`` (the paper's stochastic sampler: a deterministic step of twice the
length, then fresh noise back up to the next σ). ``students.json`` indexes the bundle.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch

from ..runtime.digits_net import NULL_LABEL, STUDENT_FILE, STUDENT_FORMAT, GuidedDenoiser
from ..runtime.plan import Plan, Row
from . import trainer
from .bundle import INDEX_FORMAT, write_index
from .data import load_digits_split
from .guided import DistillError, run_info, student_call, write_student

RHO = 7.0


def sigma_of_t(t: torch.Tensor | float, sigma_min: float, sigma_max: float) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / RHO), sigma_max ** (1 / RHO)
    s = (lo + t * (hi - lo)) ** RHO
    return torch.where(t > 0, s, torch.zeros_like(s))


def grid(n: int, sigma_min: float, sigma_max: float) -> list[float]:
    """σ's of the n-step sampler: n evaluation points then 0 (n + 1 values)."""
    t = torch.tensor([1 - i / n for i in range(n)] + [0.0], dtype=torch.float64)
    return [float(v) for v in sigma_of_t(t, sigma_min, sigma_max)]


def student_plan(n: int, sigma_min: float, sigma_max: float, stochastic: bool = False,
                 provenance: dict | None = None) -> Plan:
    """The Plan that samples an n-step student: one DDIM row per step (x ← D + (σ'/σ)(x − D)); the
    stochastic variant steps to two grid points on, then adds noise back up to the next one."""
    g = grid(n, sigma_min, sigma_max)
    rows = []
    for i in range(n):
        last = i == n - 1
        to = g[i + 1] if (last or not stochastic) else g[i + 2]
        r = to / g[i]
        noise = 0.0 if (last or not stochastic) else math.sqrt(g[i + 1] ** 2 - to**2)
        rows.append(Row(sigma=g[i], a=1.0, c=r, q=(1.0 - r,), g=noise))
    kind = "stochastic" if stochastic and n > 1 else "deterministic"
    prov = {"method": "progressive-distillation", "steps": n, "sampler": kind, "rho": RHO, **(provenance or {})}
    return Plan(name=f"pd{'-stoch' if kind == 'stochastic' else ''}-{n}", sigma_init=g[0], rows=tuple(rows),
                provenance=prov)


@dataclass(frozen=True)
class ProgressiveConfig:
    from_steps: int = 64  # the first teacher: the stage-1 student at this many DDIM steps
    to_steps: int = 1
    iters: int = 1000  # per halving
    batch: int = 64
    lr: float = 3e-4
    warmup: int = 20
    grad_clip: float = 1.0
    ckpt_every: int = 100
    w_min: float = 1.0
    w_max: float = 5.0
    p_uncond: float = 0.1

    def halvings(self) -> list[int]:
        """The student step counts, largest first."""
        out, n = [], self.from_steps
        while n > self.to_steps:
            n //= 2
            out.append(n)
        return out


def check_config(cfg: ProgressiveConfig) -> None:
    for name in ("from_steps", "to_steps"):
        v = getattr(cfg, name)
        if v < 1 or v & (v - 1):
            raise DistillError(f"--{name.replace('_', '-')} must be a power of two ≥ 1, got {v}")
    if cfg.to_steps >= cfg.from_steps:
        raise DistillError(f"--to-steps ({cfg.to_steps}) must be below --from-steps ({cfg.from_steps})")
    if cfg.iters < 1 or cfg.batch < 1:
        raise DistillError("--iters and --batch must be ≥ 1")


def _ddim(den, net, x, sigma, sigma_to, labels, w):
    d = student_call(den, den.model if net is None else net, x, sigma, labels, w)
    r = (sigma_to / sigma).reshape(-1, 1, 1, 1).to(x.dtype)
    return d + r * (x - d)


def halve(teacher: GuidedDenoiser, n: int, out_dir: str, cfg: ProgressiveConfig, seed: int, teacher_hash: str,
          progress: bool = True, resume: bool = True) -> str:
    """Train the n-step student from ``teacher`` sampled at 2n steps; returns the student's path."""
    import copy

    x_train, y_train, _, _ = load_digits_split()
    smin, smax = teacher.sigma_min, teacher.sigma_max
    g2 = torch.tensor(grid(2 * n, smin, smax), dtype=torch.float64)
    student = copy.deepcopy(teacher)
    student.model.requires_grad_(True)

    def loss_fn(net, gen, b):
        idx = torch.randint(x_train.shape[0], (b,), generator=gen)
        x0, labels = x_train[idx], y_train[idx]
        drop = torch.rand(b, generator=gen) < cfg.p_uncond
        labels = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=gen)
        i = torch.randint(n, (b,), generator=gen)
        s_t, s_mid, s_s = g2[2 * i], g2[2 * i + 1], g2[2 * i + 2]
        z_t = x0 + torch.randn(x0.shape, generator=gen) * s_t.reshape(-1, 1, 1, 1).float()
        with torch.no_grad():
            z_mid = _ddim(teacher, None, z_t, s_t, s_mid, labels, w)
            z_s = _ddim(teacher, None, z_mid, s_mid, s_s, labels, w)
            r = (s_s / s_t).reshape(-1, 1, 1, 1).float()
            target = (z_s - r * z_t) / (1 - r)
        d = student_call(student, net, z_t, s_t.float(), labels, w)
        snr = (1.0 / s_t**2).clamp(min=1.0).reshape(-1, 1, 1, 1).float()
        return (snr * (d - target) ** 2).mean()

    loop = trainer.LoopConfig(steps=cfg.iters, batch=cfg.batch, lr=cfg.lr, warmup=cfg.warmup,
                              grad_clip=cfg.grad_clip, ema_halflife=0.0, ckpt_every=cfg.ckpt_every, lr_decay=True)
    record = {"stage": "progressive", "steps": n, "config": asdict(cfg), "teacher_hash": teacher_hash}
    final, info = trainer.run(student.model, loss_fn, loop, out_dir, seed, record, f"progressive {2 * n}→{n}",
                              progress, resume)
    path = os.path.join(out_dir, STUDENT_FILE)
    if info["rank"] == 0:
        meta = {"format": STUDENT_FORMAT, "kind": "progressive", "steps_per_sample": n,
                "config": trainer.jsonable(student.model.cfg.__dict__), "w_fourier": len(student.model.w_freqs) * 2,
                "sigma_data": teacher.sigma_data, "sigma_min": smin, "sigma_max": smax, "null_label": NULL_LABEL,
                "guidance_range": [cfg.w_min, cfg.w_max], "teacher_hash": teacher_hash, "teacher_steps": 2 * n,
                "seed": seed, "train": asdict(cfg), **run_info(info)}
        write_student(path, final, meta)
        from ..runtime.digits_net import teacher_hash as file_hash

        prov = {"teacher_hash": file_hash(path), "distilled_from": teacher_hash, "sample_shape": [1, 8, 8],
                "iters": cfg.iters, "batch": cfg.batch, "train_seconds": info["wall_seconds"], "seed": seed}
        for stoch, name in ((False, "plan.json"), (True, "plan_stochastic.json")):
            student_plan(n, smin, smax, stoch, prov).save(os.path.join(out_dir, name))
    trainer.barrier()
    return path


def train_progressive(out_dir: str, student: str, config: ProgressiveConfig | None = None, seed: int = 0,
                      progress: bool = True, resume: bool = True) -> dict:
    """Halve from ``config.from_steps`` to ``config.to_steps``, starting from the stage-1 student at
    ``student`` (a ``student.safetensors`` or its directory). Finished halvings are kept and skipped on
    a rerun; an interrupted one resumes from its checkpoint. Returns the bundle index (students.json)."""
    from ..runtime.digits_net import _resolve, load_teacher, teacher_hash

    cfg = config or ProgressiveConfig()
    check_config(cfg)
    src = _resolve(student)
    teacher = load_teacher(src)
    if not isinstance(teacher, GuidedDenoiser):
        raise DistillError(f"{src}: progressive distillation starts from a guidance-conditioned student "
                           f"(`fewstep distill guided` output), not a plain teacher")
    t_hash = teacher_hash(src)
    rank, _ = trainer.dist_info()
    os.makedirs(out_dir, exist_ok=True)
    index = {"format": INDEX_FORMAT, "model": "digits", "sample_shape": [1, 8, 8], "num_classes": 10,
             "guidance_range": [cfg.w_min, cfg.w_max], "stage1": os.path.relpath(src, out_dir),
             "stage1_hash": t_hash, "from_steps": cfg.from_steps, "students": {}}
    for k, n in enumerate(cfg.halvings()):
        d = os.path.join(out_dir, f"steps_{n}")
        path = os.path.join(d, STUDENT_FILE)
        done = os.path.exists(path) and os.path.exists(os.path.join(d, "plan_stochastic.json"))
        if done:
            with open(path[: -len(".safetensors")] + ".json") as f:
                meta = json.load(f)
            done = meta.get("teacher_hash") == t_hash and meta.get("train") == trainer.jsonable(asdict(cfg))
        if not done:
            path = halve(teacher, n, d, cfg, seed + k, t_hash, progress, resume)
        teacher = load_teacher(path)
        t_hash = teacher_hash(path)
        index["students"][str(n)] = {"weights": os.path.relpath(path, out_dir),
                                     "plan": os.path.relpath(os.path.join(d, "plan.json"), out_dir),
                                     "plan_stochastic": os.path.relpath(os.path.join(d, "plan_stochastic.json"),
                                                                        out_dir)}
        if rank == 0:
            write_index(out_dir, index)
    return index
