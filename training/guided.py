"""Guided distillation, stage 1 (Meng et al., CVPR 2023): one network that takes the guidance scale.

A classifier-free-guided teacher costs two evaluations per step (conditional and unconditional).
The student ``x̂_η(z_σ; σ, c, W)`` takes W through a Fourier embedding and is trained to match the
guided teacher ``x̂_u + W·(x̂_c − x̂_u)`` (fewstep's / diffusers' convention; the paper's
``(1+w)x̂_c − w·x̂_u`` is W = 1 + w, its w ∈ [0, 4] is W ∈ [1, 5]) over W ~ U[W_min, W_max], class
labels from the data (10% null: the student stays the unconditional model there), and σ drawn half
from the teacher's training distribution, half log-uniform over the sampling range (a few-step
sampler evaluates at large σ, where EDM's log-normal rarely looks). Loss: EDM-weighted x-MSE.

The student starts as the teacher: same weights, plus a W embedding whose last layer is zero, so
at step 0 it is the plain conditional teacher. Its denoiser (``GuidedDenoiser``) takes the
guidance the executor passes as an input instead of running two batches; everything downstream
(Plans, the executor, export, the C++ runtime) treats it as a model like any other.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import FewstepError
from ..runtime.denoisers import EDMDenoiser, cfg_combine
from ..runtime.digits_net import NULL_LABEL, STUDENT_FILE, STUDENT_FORMAT, GuidedDenoiser, GuidedUNet
from ..runtime.plan import atomic_write_text
from . import trainer
from .data import load_digits_split


class DistillError(FewstepError):
    pass


@dataclass(frozen=True)
class GuidedConfig:
    steps: int = 2500
    batch: int = 64
    lr: float = 5e-4  # fine-tuning from the teacher's weights (the teacher trained at 2e-3)
    warmup: int = 100
    ema_halflife: float = 200.0
    grad_clip: float = 1.0
    ckpt_every: int = 250
    w_min: float = 1.0
    w_max: float = 5.0
    p_uncond: float = 0.1
    p_mean: float = -1.2  # the teacher's log-normal σ distribution (half of each batch)
    p_std: float = 1.2
    w_fourier: int = 16

    def loop(self) -> trainer.LoopConfig:
        return trainer.LoopConfig(steps=self.steps, batch=self.batch, lr=self.lr, warmup=self.warmup,
                                  grad_clip=self.grad_clip, ema_halflife=self.ema_halflife,
                                  ckpt_every=self.ckpt_every)


def guided_target(teacher: EDMDenoiser, x, sigma, labels, w):
    """The guided teacher ``D_u + W·(D_c − D_u)`` with a per-sample W, one batched call."""
    n = x.shape[0]
    null = torch.full_like(labels, NULL_LABEL)
    both = teacher._denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([null, labels]))
    return cfg_combine(both[:n], both[n:], w.reshape(-1, 1, 1, 1))


def sample_sigma(n: int, gen: torch.Generator, cfg: GuidedConfig, sigma_min: float, sigma_max: float):
    lognormal = (torch.randn(n, generator=gen) * cfg.p_std + cfg.p_mean).exp()
    u = torch.rand(n, generator=gen)
    loguniform = (math.log(sigma_min) + u * (math.log(sigma_max) - math.log(sigma_min))).exp()
    pick = torch.rand(n, generator=gen) < 0.5
    return torch.where(pick, lognormal, loguniform)


def student_from_teacher(teacher: EDMDenoiser, w_fourier: int = 16) -> GuidedDenoiser:
    model = GuidedUNet(teacher.model.cfg, w_fourier)
    missing, unexpected = model.load_state_dict(teacher.model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("w_mlp.") for k in missing):
        raise DistillError(f"the teacher is not a digits UNet (unexpected {unexpected[:3]}, missing {missing[:3]})")
    # the layout the loader gives every digits UNet (digits_net.load_checked): the same kernels as the teacher's,
    # so the student starts as the same function bit for bit
    model = model.to(memory_format=torch.channels_last)
    return GuidedDenoiser(model, sigma_data=teacher.sigma_data, sigma_min=teacher.sigma_min,
                          sigma_max=teacher.sigma_max, null_label=NULL_LABEL)


def train_guided(out_dir: str, teacher: str | None = None, config: GuidedConfig | None = None, seed: int = 0,
                 progress: bool = True, resume: bool = True) -> str:
    """Distil the guided digits teacher (None = the shipped one, or a checkpoint path) into a W-conditioned
    student in ``out_dir``; returns the path of ``student.safetensors`` (its JSON beside it)."""
    from ..runtime.digits_net import load_teacher, teacher_hash

    cfg = config or GuidedConfig()
    if not cfg.w_min <= cfg.w_max:
        raise DistillError(f"guidance range [{cfg.w_min}, {cfg.w_max}] is empty")
    tden = load_teacher(teacher)
    t_hash = teacher_hash(teacher)
    with torch.random.fork_rng(devices=[]):  # the W embedding's init is seeded: a rerun is the same run
        torch.manual_seed(seed)
        student = student_from_teacher(tden, cfg.w_fourier)
    x_train, y_train, _, _ = load_digits_split()
    sd = tden.sigma_data

    def loss_fn(net, gen, b):
        idx = torch.randint(x_train.shape[0], (b,), generator=gen)
        x0, labels = x_train[idx], y_train[idx]
        drop = torch.rand(b, generator=gen) < cfg.p_uncond
        labels = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)
        sigma = sample_sigma(b, gen, cfg, tden.sigma_min, tden.sigma_max)
        w = cfg.w_min + (cfg.w_max - cfg.w_min) * torch.rand(b, generator=gen)
        x = x0 + torch.randn(x0.shape, generator=gen) * sigma.reshape(-1, 1, 1, 1)
        with torch.no_grad():
            target = guided_target(tden, x, sigma, labels, w)
        d = student_call(student, net, x, sigma, labels, w)
        lam = (sigma**2 + sd**2) / (sigma * sd) ** 2
        return (lam.reshape(-1, 1, 1, 1) * (d - target) ** 2).mean()

    record = {"stage": "guided", "config": asdict(cfg), "teacher_hash": t_hash}
    final, info = trainer.run(student.model, loss_fn, cfg.loop(), out_dir, seed, record, "guided distillation",
                              progress, resume)
    path = os.path.join(out_dir, STUDENT_FILE)
    if info["rank"] == 0:
        meta = {"format": STUDENT_FORMAT, "kind": "guided", "config": trainer.jsonable(student.model.cfg.__dict__),
                "w_fourier": cfg.w_fourier, "sigma_data": sd, "sigma_min": tden.sigma_min,
                "sigma_max": tden.sigma_max, "null_label": NULL_LABEL, "guidance_range": [cfg.w_min, cfg.w_max],
                "teacher_hash": t_hash, "seed": seed, "train": asdict(cfg), **run_info(info)}
        write_student(path, final, meta)
    return path


def student_call(student: GuidedDenoiser, net: nn.Module, x, sigma, labels, w):
    """The student's denoiser with ``net`` (the model, or its DDP wrapper) as the network."""
    c_skip, c_out, c_in, t = student.preconditioning(sigma, x.ndim, x.dtype)
    return c_skip * x + c_out * net(x * c_in, t, labels, w)


def run_info(info: dict) -> dict:
    return {"steps": info["steps"], "loss": info["loss"], "wall_seconds": info["wall_seconds"],
            "world_size": info["world_size"], "threads": info["threads"], "torch": torch.__version__}


def write_student(path: str, model: nn.Module, meta: dict) -> None:
    trainer.save_safetensors(path, {k: v.contiguous() for k, v in model.state_dict().items()})
    atomic_write_text(path[: -len(".safetensors")] + ".json", json.dumps(meta, indent=1) + "\n")
