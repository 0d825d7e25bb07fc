"""Catch-Up Distillation (Shao et al. 2023): a flow-velocity model trained to agree with itself one step ahead.

No pretrained teacher: one run trains a class-conditional velocity model on digits that samples in few Euler
steps. Model: the digits UNet (``runtime.digits_net.DigitsUNet``) predicting v at x_t = t·z + (1 − t)·x,
target z − x, t ∈ [0, 1] as its time input; it samples through ``FlowDenoiser`` (σ = t/(1 − t)), so every
Plan — Euler rows here, any solver or fitted solver elsewhere — runs it unchanged.

Per training sample (t ~ U(ε, 1), Δ ~ U(0, ``delta_max``), z ~ N(0, I)):
- catch-up (``heads="none"``): the same online network, no grad, one Euler step toward the data:
  target ``sg[v(x_t − Δ·v(x_t, t), t − Δ)]``; loss = MSE(v, target) + MSE(v, z − x).
- Runge–Kutta alignment: zero-initialised extra heads on the UNet's last features predict velocities
  further ahead. RK2 (one extra head): k1 = v(x_t, t), k2 = v(x_t − Δk1, t − Δ); targets
  v(x_t − Δ(k1 + k2)/2, t − Δ) for the main output and v(x_t − Δ(k1 + k2), t − 2Δ) for the head.
  RK3 (two extra heads): k3 = v(x_t − Δ(7k1 + k2)/4, t − 2Δ), φ = 5/12·k1 + 2/3·k2 − 1/12·k3, targets
  v(x_t − jΔφ, t − jΔ) for j = 1, 2, 3. Every output is also regressed to z − x. Where t − KΔ < ε
  (K outputs) the target is z − x itself (the released code's mask).
- ``method="fm"``: the plain flow-matching baseline (MSE(v, z − x) only), same network, budget, seed, data.
- Additional training (optional, ``extra_steps`` > 0): the trained model's 16-step Euler samples from
  ``traj_n`` fixed noises are saved; a copy of the model is then trained so that one Euler step from σ_max·z
  (D(σ_max·z; σ_max) = x_t − t·v) lands on its own 16-step endpoint. That copy is the bundle's 1-step model.

The sampling heads are not shipped: the checkpoint (``digits_net.FLOW_FORMAT``) is the UNet alone.
On the shared loop (``trainer.run``): checkpoints, bitwise resume, per-step seeds, torchrun.
Bundle layout (``students.json``, ``fewstep.students/1``): stage1 = the flow model (what any solver
samples); students 1, 2, 4, 8, 16 = Euler on the uniform-t grid (the 1-step one on the additionally
trained weights when there are any).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..runtime.digits_net import FLOW_FORMAT, NULL_LABEL, STUDENT_FILE, DigitsUNet, UNetConfig, make_flow_denoiser
from ..runtime.plan import Plan, atomic_write_text
from . import trainer
from .bundle import INDEX, INDEX_FORMAT
from .guided import DistillError, run_info, write_student

HEADS = {"none": 0, "rk2": 1, "rk3": 2}  # extra (alignment) heads beyond the main velocity
METHODS = ("cud", "fm")
BUNDLE_STEPS = (1, 2, 4, 8, 16)
ONESTEP_DIR = "onestep"
TRAJ_FILE = "traj.safetensors"


@dataclass(frozen=True)
class CUDConfig:
    method: str = "cud"  # cud | fm (the flow-matching baseline)
    heads: str = "rk2"  # none | rk2 | rk3 (ignored by fm)
    steps: int = 1000
    batch: int = 64
    lr: float = 2e-3
    warmup: int = 200
    grad_clip: float = 1.0
    ema_halflife: float = 300.0  # loop steps; the shipped weights are the EMA
    ckpt_every: int = 250
    delta_max: float = 1 / 16  # Δ ~ U(0, delta_max): the catch-up step (the paper's 1/16)
    t_eps: float = 1e-5  # t ~ U(t_eps, 1)
    p_uncond: float = 0.1  # label dropout → the null label (classifier-free guidance stays possible)
    extra_steps: int = 300  # additional one-step training on the model's own 16-step samples; 0 = none
    extra_lr: float = 2e-4
    extra_ema_halflife: float = 100.0
    traj_n: int = 4096  # saved 16-step trajectories (their endpoints) for the additional training
    traj_steps: int = 16
    sigma_min: float = 0.002
    sigma_max: float = 80.0  # the sampler starts at t = σ_max/(1 + σ_max) ≈ 0.988

    def loop(self) -> trainer.LoopConfig:
        return trainer.LoopConfig(steps=self.steps, batch=self.batch, lr=self.lr, warmup=self.warmup,
                                  grad_clip=self.grad_clip, ema_halflife=self.ema_halflife,
                                  ckpt_every=self.ckpt_every)

    def extra_loop(self) -> trainer.LoopConfig:
        return trainer.LoopConfig(steps=self.extra_steps, batch=self.batch, lr=self.extra_lr,
                                  warmup=min(50, self.extra_steps), grad_clip=self.grad_clip,
                                  ema_halflife=self.extra_ema_halflife, ckpt_every=self.ckpt_every)

    @property
    def outputs(self) -> int:
        return 1 if self.method == "fm" else 1 + HEADS[self.heads]


def check_config(cfg: CUDConfig) -> None:
    if cfg.method not in METHODS:
        raise DistillError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.heads not in HEADS:
        raise DistillError(f"--heads must be one of {', '.join(HEADS)}, got {cfg.heads!r}")
    for name in ("steps", "batch", "ckpt_every", "traj_n", "traj_steps"):
        if getattr(cfg, name) < 1:
            raise DistillError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(cfg, name)}")
    if cfg.extra_steps < 0:
        raise DistillError(f"--extra-steps must be ≥ 0, got {cfg.extra_steps}")
    for name in ("lr", "extra_lr"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v > 0):
            raise DistillError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    if not (math.isfinite(cfg.delta_max) and 0 < cfg.delta_max <= 1 / 3):
        raise DistillError(f"--delta-max must be in (0, 1/3] (RK3 looks 3Δ ahead), got {cfg.delta_max}")
    if not (0 < cfg.sigma_min < cfg.sigma_max and math.isfinite(cfg.sigma_max)):
        raise DistillError(f"need 0 < σ_min < σ_max < ∞, got {cfg.sigma_min}, {cfg.sigma_max}")


# --- the network -------------------------------------------------------------------------------
class CUDNet(nn.Module):
    """The digits UNet plus ``heads`` zero-initialised alignment heads reading its last features.

    ``forward(x_t, t, labels)`` → [v, head_1, …] (each [B, 1, 8, 8]). Only ``unet`` is shipped."""

    def __init__(self, cfg: UNetConfig | None = None, heads: int = 0):
        super().__init__()
        self.unet = DigitsUNet(cfg or UNetConfig())
        c = self.unet.out.in_channels
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 3, padding=1) for _ in range(heads))
        for h in self.heads:
            nn.init.zeros_(h.weight)  # starts predicting nothing: the trunk is not disturbed at first
            nn.init.zeros_(h.bias)

    def forward(self, x, t, labels):
        if not len(self.heads):
            return [self.unet(x, t, labels)]
        feats = []
        # The features are the final conv's input (silu(out_norm(h))); a hook scoped to this call, so the
        # module holds no hook a deepcopy (the loop's EMA) would have to follow.
        hook = self.unet.out.register_forward_hook(lambda m, inp, out: feats.append(inp[0]))
        try:
            v = self.unet(x, t, labels)
        finally:
            hook.remove()
        return [v] + [h(feats[0]) for h in self.heads]


def _bc(s: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, 1, 1, 1)


def catchup_targets(v: Callable, x_t: torch.Tensor, t: torch.Tensor, delta: torch.Tensor, k1: torch.Tensor,
                    outputs: int) -> list[torch.Tensor]:
    """The catch-up targets for ``outputs`` = 1 (Euler), 2 (RK2) or 3 (RK3) velocity outputs.

    ``v(x, t)`` is the online network's main velocity (called without grad), ``k1`` = v(x_t, t). The
    targets' points are evaluated in one batched call."""
    d = _bc(delta)
    if outputs == 1:
        pts = [x_t - d * k1]
    elif outputs == 2:
        k2 = v(x_t - d * k1, t - delta)
        pts = [x_t - d * (k1 + k2) / 2, x_t - d * (k1 + k2)]
    elif outputs == 3:
        k2 = v(x_t - d * k1, t - delta)
        k3 = v(x_t - d * (7 * k1 + k2) / 4, t - 2 * delta)
        phi = 5 / 12 * k1 + 2 / 3 * k2 - 1 / 12 * k3
        pts = [x_t - j * d * phi for j in (1, 2, 3)]
    else:
        raise ValueError(f"catch-up targets for 1–3 outputs, not {outputs}")
    ts = torch.cat([t - j * delta for j in range(1, outputs + 1)])
    return list(v(torch.cat(pts), ts).chunk(outputs))


def make_loss(cfg: CUDConfig, data: Callable, stats: dict | None = None) -> Callable:
    """The loop's loss: ``data(gen, b)`` → (x [b,1,8,8], labels [b])."""
    k_out = cfg.outputs

    def loss_fn(net, gen, b):
        x, labels = data(gen, b)
        z = torch.randn(x.shape, generator=gen)
        t = cfg.t_eps + (1 - cfg.t_eps) * torch.rand(b, generator=gen)
        delta = cfg.delta_max * torch.rand(b, generator=gen)
        drop = torch.rand(b, generator=gen) < cfg.p_uncond
        labels = torch.where(drop, torch.full_like(labels, NULL_LABEL), labels)
        x_t = _bc(t) * z + (1 - _bc(t)) * x
        gt = z - x
        preds = net(x_t, t, labels)
        if cfg.method == "fm":
            loss = F.mse_loss(preds[0], gt)
            if stats is not None:
                stats["fm"] = float(loss.detach())
            return loss
        online = getattr(net, "module", net)  # the DDP-wrapped model's own module for the no-grad calls
        with torch.no_grad():
            lab = labels

            def v(xx, tt):
                reps = xx.shape[0] // b
                return online(xx, tt, lab.repeat(reps))[0]

            targets = catchup_targets(v, x_t, t, delta, preds[0].detach(), k_out)
            late = _bc(t - k_out * delta < cfg.t_eps)  # the last target point would pass t = 0
            targets = [torch.where(late, gt, tg) for tg in targets]
        cu = sum(F.mse_loss(p, tg) for p, tg in zip(preds, targets))
        reg = sum(F.mse_loss(p, gt) for p in preds)
        if stats is not None:
            stats["catchup"], stats["gt"] = float(cu.detach()), float(reg.detach())
        return cu + reg

    return loss_fn


# --- plans -------------------------------------------------------------------------------------
def euler_sigmas(n: int, sigma_max: float) -> list[float]:
    """Euler on the uniform-t grid t_i = t_max·(n − i)/n (t_max = σ_max/(1 + σ_max)), as σ = t/(1 − t), ending
    at 0: DDIM on these σ's is exactly flow Euler x ← x_t − (t_i − t_{i+1})·v."""
    t_max = sigma_max / (1 + sigma_max)
    ts = [t_max * (n - i) / n for i in range(n + 1)]
    return [t / (1 - t) for t in ts]


def euler_plan(n: int, sigma_max: float, provenance: dict | None = None) -> Plan:
    from ..runtime.solvers import build

    p = build("ddim", n, 0.0, sigma_max, sigmas=euler_sigmas(n, sigma_max))
    prov = {**p.provenance, "method": "catchup", "sampler": "flow Euler, uniform t", **(provenance or {})}
    return p.replace(name=f"cud-euler-{n}", provenance=prov)


# --- digits ------------------------------------------------------------------------------------
def digits_data():
    from .data import load_digits_split

    x_train, y_train, _, _ = load_digits_split()

    def data(gen, b):
        idx = torch.randint(x_train.shape[0], (b,), generator=gen)
        return x_train[idx], y_train[idx]

    return data, x_train


def _meta(cfg: CUDConfig, unet: DigitsUNet, seed: int, info: dict, kind: str, extra: dict | None = None) -> dict:
    return {"format": FLOW_FORMAT, "kind": kind, "config": trainer.jsonable(unet.cfg.__dict__),
            "sigma_min": cfg.sigma_min, "sigma_max": cfg.sigma_max, "null_label": NULL_LABEL, "seed": seed,
            "train": asdict(cfg), **(extra or {}), **run_info(info)}


def _done(path: str, cfg: CUDConfig, seed: int) -> bool:
    meta_path = path[: -len(".safetensors")] + ".json"
    if not (os.path.exists(path) and os.path.exists(meta_path)):
        return False
    with open(meta_path) as f:
        meta = json.load(f)
    return meta.get("train") == trainer.jsonable(asdict(cfg)) and meta.get("seed") == seed


def train_main(out_dir: str, cfg: CUDConfig, seed: int = 0, progress: bool = True, resume: bool = True) -> str:
    """Train the flow model in ``out_dir`` (checkpoints there); writes student.safetensors + .json."""
    check_config(cfg)
    data, x_train = digits_data()
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        net = CUDNet(UNetConfig(), HEADS[cfg.heads] if cfg.method == "cud" else 0)
    stats: dict = {}
    record = {"stage": "catchup-main", "config": asdict(cfg), "data_sha": _hash(x_train)}
    desc = f"{cfg.method}" + (f" {cfg.heads}" if cfg.method == "cud" else "")
    final, info = trainer.run(net, make_loss(cfg, data, stats), cfg.loop(), out_dir, seed, record, desc,
                              progress, resume)
    path = os.path.join(out_dir, STUDENT_FILE)
    if info["rank"] == 0:
        write_student(path, final.unet, _meta(cfg, final.unet, seed, info, cfg.method, {"last_losses": stats}))
    trainer.barrier()
    return path


@torch.no_grad()
def trajectories(den, cfg: CUDConfig, seed: int) -> dict[str, torch.Tensor]:
    """``traj_n`` fixed noises (seeded), classes 0..9 in turn, and the model's ``traj_steps``-step Euler endpoints."""
    from ..runtime.executor import sample

    gen = torch.Generator().manual_seed(seed * 7919 + 17)
    z = torch.randn((cfg.traj_n, 1, 8, 8), generator=gen)
    labels = torch.arange(cfg.traj_n) % 10
    plan = euler_plan(cfg.traj_steps, cfg.sigma_max)
    xs = [sample(plan, den, z[i:i + 1024], cond=labels[i:i + 1024]) for i in range(0, cfg.traj_n, 1024)]
    return {"z": z, "labels": labels, "x": torch.cat(xs)}


def onestep_loss(cfg: CUDConfig, traj: dict[str, torch.Tensor]) -> Callable:
    """One Euler step from σ_max·z onto the saved endpoint: MSE(D(σ_max·z; σ_max), x_16)."""
    s = cfg.sigma_max
    t_max = s / (1 + s)

    def loss_fn(net, gen, b):
        idx = torch.randint(traj["z"].shape[0], (b,), generator=gen)
        z, lab, x = traj["z"][idx], traj["labels"][idx], traj["x"][idx]
        v = net(t_max * z, torch.full((b,), t_max), lab)
        return F.mse_loss(t_max * z - t_max * v, x)

    return loss_fn


def train_onestep(out_dir: str, main_path: str, cfg: CUDConfig, seed: int = 0, progress: bool = True,
                  resume: bool = True) -> str:
    """The additional one-step training from the model at ``main_path``, in ``out_dir``."""
    from safetensors.torch import load_file

    from ..runtime.digits_net import load_flow, teacher_hash

    den = load_flow(main_path)
    traj_path = os.path.join(out_dir, TRAJ_FILE)
    os.makedirs(out_dir, exist_ok=True)
    main_hash = teacher_hash(main_path)
    if os.path.exists(traj_path) and resume:
        traj = load_file(traj_path)
        ok = traj["x"].shape[0] == cfg.traj_n
        with open(traj_path + ".json") as f:
            ok = ok and json.load(f).get("from") == main_hash
        if not ok:
            traj = None
    else:
        traj = None
    if traj is None:
        traj = trajectories(den, cfg, seed)
        if trainer.dist_info()[0] == 0:
            trainer.save_safetensors(traj_path, traj)
            atomic_write_text(traj_path + ".json", json.dumps({"from": main_hash, "steps": cfg.traj_steps}) + "\n")
    net = DigitsUNet(den.model.cfg)
    net.load_state_dict(den.model.state_dict())
    net.requires_grad_(True)
    record = {"stage": "catchup-onestep", "config": asdict(cfg), "from": main_hash}
    final, info = trainer.run(net, onestep_loss(cfg, traj), cfg.extra_loop(), out_dir, seed, record, "one-step",
                              progress, resume)
    path = os.path.join(out_dir, STUDENT_FILE)
    if info["rank"] == 0:
        write_student(path, final, _meta(cfg, final, seed, info, f"{cfg.method}-onestep", {"from": main_hash}))
    trainer.barrier()
    return path


def train_bundle(out_dir: str, cfg: CUDConfig, seed: int = 0, progress: bool = True, resume: bool = True) -> dict:
    """The flow model, its additional one-step training (``extra_steps`` > 0) and the Euler plans, indexed by
    ``students.json``. Finished stages are kept on a rerun; an interrupted one resumes."""
    from ..runtime.digits_net import teacher_hash

    check_config(cfg)
    os.makedirs(out_dir, exist_ok=True)
    main = os.path.join(out_dir, STUDENT_FILE)
    if not (resume and _done(main, cfg, seed)):
        main = train_main(out_dir, cfg, seed, progress, resume)
    one = main
    if cfg.extra_steps > 0:
        one = os.path.join(out_dir, ONESTEP_DIR, STUDENT_FILE)
        if not (resume and _done(one, cfg, seed)):
            one = train_onestep(os.path.join(out_dir, ONESTEP_DIR), main, cfg, seed, progress, resume)
    index = {"format": INDEX_FORMAT, "method": "catchup", "model": "digits", "sample_shape": [1, 8, 8],
             "num_classes": 10, "stage1": STUDENT_FILE, "stage1_hash": teacher_hash(main),
             "train": asdict(cfg), "seed": seed, "students": {}}
    if trainer.dist_info()[0] == 0:
        for n in BUNDLE_STEPS:
            w = one if n == 1 else main
            rel = os.path.relpath(w, out_dir)
            prov = {"teacher_hash": teacher_hash(w), "sample_shape": [1, 8, 8], "seed": seed}
            euler_plan(n, cfg.sigma_max, prov).save(os.path.join(out_dir, f"plan_euler_{n}.json"))
            # Euler on an ODE has no stochastic variant: the deterministic plan is the sampler either way
            index["students"][str(n)] = {"weights": rel, "plan": f"plan_euler_{n}.json",
                                         "plan_stochastic": f"plan_euler_{n}.json"}
        atomic_write_text(os.path.join(out_dir, INDEX), json.dumps(index, indent=1) + "\n")
    trainer.barrier()
    return index


def _hash(x: torch.Tensor) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest()[:16]


__all__ = ["CUDConfig", "CUDNet", "catchup_targets", "euler_plan", "make_loss", "make_flow_denoiser",
           "train_bundle", "train_main", "train_onestep"]
