"""DMD2 (Yin et al., NeurIPS 2024): one- and few-step generators trained to match the teacher's distribution.

Three networks share one training state (``DMD2Nets``): the generator G (initialised from the teacher),
the fake score μ_fake (a trainable copy of the teacher) and a small classifier head on μ_fake's
bottleneck features. The real score μ_real is the frozen teacher, guided at a fixed W (``guidance``).

- Generator update (one in every ``fake_updates + 1`` steps of the shared loop): x̂ = G(x_k; σ_k); at
  σ ~ the ρ = 7 grid over t ∈ [t_min, t_max] (the middle of the grid) and x_σ = x̂ + σε,
  ``g = (μ_fake(x_σ) − μ_real(x_σ)) / mean|x̂ − μ_real(x_σ)|`` (per sample), ``L_DM = ½‖x̂ − sg(x̂ − g)‖²``
  (mean), plus ``gan_g · softplus(−D(x̂ + σ'ε'))``. No regression loss.
- Critic update (the other ``fake_updates`` steps): μ_fake's EDM-weighted denoising loss on G's samples
  (detached), plus ``gan_d · [softplus(D(fake)) + softplus(−D(real))]`` with real = noised train-split
  data; D's gradient also trains μ_fake's encoder (the head sits on it).
- Multi-step (``steps`` K > 1): K fixed σ's (the ρ = 7 grid of ``progressive.grid``); each step predicts
  x̂ and re-noises to the next σ with fresh noise. Backward simulation: a sample's input at step k is
  made by running G itself from σ_0·z for k steps (no grad), so training sees what sampling sees.

On the shared loop (``trainer.run``): checkpoints, exact resume, per-step seeds, torchrun. The loop
has one optimiser over all three networks; each step's loss hands it the gradient of the phase's own
parameters only (a surrogate whose gradient is exactly that gradient, all-reduced over the
processes), so the other networks' Adam states are untouched that step. Which phase a step is comes
from the step index (recovered from the loop's per-step seed), so a resumed run is the same run.

The shipped artifacts are students like the progressive ones (``digits_net.STUDENT_FORMAT``, a W-conditioned
UNet whose W input is pinned by its Plans to the training W): ``dmd2_plan(K)`` — K rows
``x ← D(x; σ_k) + σ_{k+1}·ε`` (c = 0, q0 = 1, g = σ_{k+1}; the last row g = 0).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..runtime.denoisers import GUIDANCE_INPUT
from ..runtime.digits_net import STUDENT_FILE, STUDENT_FORMAT
from ..runtime.plan import Plan, Row
from . import trainer
from .bundle import INDEX_FORMAT, write_index
from .guided import DistillError, run_info, student_from_teacher, write_student
from .progressive import grid, sigma_of_t

NETS_FILE = "dmd2_nets.safetensors"  # the final G + μ_fake + head: a later (multi-step) stage starts from it
TEACHER_DIR = "teacher"


@dataclass(frozen=True)
class DMD2Config:
    steps: int = 1  # the generator's sampling steps K (fixed σ's)
    iters: int = 500  # generator updates (the loop runs iters · (fake_updates + 1) steps)
    fake_updates: int = 5  # μ_fake / classifier updates per generator update (two time-scale)
    batch: int = 32
    lr: float = 3e-4
    warmup: int = 60  # loop steps
    grad_clip: float = 10.0
    ema_halflife: float = 0.0  # loop steps; 0: ship the generator's own weights
    ckpt_every: int = 240  # loop steps
    guidance: float = 1.0  # μ_real = the teacher at this CFG scale W
    gan: bool = True
    gan_g: float = 3e-3
    gan_d: float = 1e-2
    t_min: float = 0.02  # the DM / GAN σ's: the ρ = 7 grid position t ~ U[t_min, t_max] (1 = σ_max)
    t_max: float = 0.98

    @property
    def loop_steps(self) -> int:
        return self.iters * (self.fake_updates + 1)

    def loop(self) -> trainer.LoopConfig:
        return trainer.LoopConfig(steps=self.loop_steps, batch=self.batch, lr=self.lr, warmup=self.warmup,
                                  grad_clip=self.grad_clip, ema_halflife=self.ema_halflife,
                                  ckpt_every=self.ckpt_every)


def check_config(cfg: DMD2Config) -> None:
    for name in ("steps", "iters", "fake_updates", "batch", "ckpt_every"):
        if getattr(cfg, name) < 1:
            raise DistillError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise DistillError(f"--lr must be > 0, got {cfg.lr}")
    if not (math.isfinite(cfg.guidance) and cfg.guidance >= 0):
        raise DistillError(f"--guidance must be finite and ≥ 0, got {cfg.guidance}")
    for name in ("gan_g", "gan_d"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise DistillError(f"--{name.replace('_', '-')} must be finite and ≥ 0, got {v}")
    if not 0 <= cfg.t_min < cfg.t_max <= 1:
        raise DistillError(f"the DM σ range needs 0 ≤ t_min < t_max ≤ 1, got [{cfg.t_min}, {cfg.t_max}]")


class DMD2Nets(nn.Module):
    """The trained state: generator, fake score and the classifier head on the fake score's features."""

    def __init__(self, g: nn.Module, fake: nn.Module, head: nn.Module):
        super().__init__()
        self.g, self.fake, self.head = g, fake, head


@dataclass
class Problem:
    """What the DMD2 loss needs of a model family; every callable takes the network it runs.

    gen(g, x, σ, labels) → x̂; fake(f, x, σ, labels) → D_fake; features(f, x, σ, labels) → μ_fake's
    bottleneck; real(x, σ, labels) → μ_real (no grad); data(gen, b) → (x0, labels or None).
    """

    gen: Callable
    fake: Callable
    features: Callable
    real: Callable
    data: Callable
    shape: tuple[int, ...]
    sigma_data: float
    sigma_min: float
    sigma_max: float


def step_sigmas(k: int, sigma_min: float, sigma_max: float) -> list[float]:
    """The K-step generator's σ's: the ρ = 7 grid's first K points (σ_max first)."""
    return grid(k, sigma_min, sigma_max)[:k]


def dmd2_plan(k: int, sigma_min: float, sigma_max: float, guidance: float = 1.0,
              provenance: dict | None = None) -> Plan:
    """K rows of predict-then-renoise: ``x ← D(x; σ_i) + σ_{i+1}·ε`` (the last row adds nothing).

    Each row pins the guidance to the W the generator was trained at (its W input), so a caller's
    --guidance cannot feed it a W it never saw."""
    s = step_sigmas(k, sigma_min, sigma_max)
    rows = tuple(Row(sigma=s[i], a=1.0, c=0.0, q=(1.0,), g=s[i + 1] if i + 1 < k else 0.0, guidance=guidance)
                 for i in range(k))
    prov = {"method": "dmd2", "steps": k, "sampler": "predict-then-renoise", "rho": 7.0, "guidance": guidance,
            **(provenance or {})}
    return Plan(name=f"dmd2-{k}", sigma_init=s[0], rows=rows, provenance=prov)


def _sigma_mid(b: int, gen: torch.Generator, cfg: DMD2Config, p: Problem) -> torch.Tensor:
    t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(b, generator=gen, dtype=torch.float64)
    return sigma_of_t(t, p.sigma_min, p.sigma_max).to(torch.float32)


def _sigma_fake(b: int, gen: torch.Generator, p: Problem) -> torch.Tensor:
    t = torch.rand(b, generator=gen, dtype=torch.float64).clamp_min(1e-6)  # (0, 1]: the whole sampling range
    return sigma_of_t(t, p.sigma_min, p.sigma_max).to(torch.float32)


def _bc(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def simulate(p: Problem, g: nn.Module, sig: torch.Tensor, k: torch.Tensor, labels, gen: torch.Generator):
    """Backward simulation: each sample's generator input at its step k (no grad), and that σ.

    Starts at σ_0·z and runs G's own predict-then-renoise steps; a sample stops at its k. The same
    random draws are made whatever k is (one z, one ε per step), so the stream is fixed per step."""
    b, n = k.shape[0], sig.shape[0]
    x = torch.randn((b, *p.shape), generator=gen) * sig[0]
    eps = [torch.randn((b, *p.shape), generator=gen) for _ in range(n - 1)]
    top = int(k.max()) if b else 0
    with torch.no_grad():
        for j in range(top):
            xh = p.gen(g, x, torch.full((b,), float(sig[j])), labels)
            x = torch.where((k > j).reshape(-1, *([1] * (x.ndim - 1))), xh + float(sig[j + 1]) * eps[j], x)
    return x, sig[k]


def _grads_to_loss(value: torch.Tensor, params: list[nn.Parameter], grads, world: int) -> torch.Tensor:
    """A loss worth ``value`` whose gradient is exactly ``grads`` on ``params`` (averaged over the
    processes) and nothing elsewhere: Adam then updates only these parameters this step."""
    if world > 1:
        import torch.distributed as dist

        for gr in grads:
            if gr is not None:
                dist.all_reduce(gr)
                gr.div_(world)
    sur = sum(((pa * gr).sum() for pa, gr in zip(params, grads) if gr is not None), torch.zeros(()))
    return value.detach() + (sur - sur.detach())


def make_loss(p: Problem, cfg: DMD2Config, seed: int, stats: dict | None = None) -> Callable:
    """The loop's ``loss_fn``: a generator update on every (fake_updates + 1)-th step, else a critic update."""
    sig = torch.tensor(step_sigmas(cfg.steps, p.sigma_min, p.sigma_max), dtype=torch.float32)
    sd = p.sigma_data
    period = cfg.fake_updates + 1

    def loss_fn(net, gen, b):
        nets = getattr(net, "module", net)  # the networks themselves: gradients are all-reduced here, not by DDP
        rank, world = trainer.dist_info()
        step = loop_step(gen, seed, rank)
        x0, labels = p.data(gen, b)
        k = torch.randint(cfg.steps, (b,), generator=gen)
        x_in, s_in = simulate(p, nets.g, sig, k, labels, gen)
        if step % period == period - 1:  # generator
            params = list(nets.g.parameters())
            xg = p.gen(nets.g, x_in, s_in, labels)
            s = _sigma_mid(b, gen, cfg, p)
            x_s = xg.detach() + _bc(s, xg) * torch.randn(xg.shape, generator=gen)
            with torch.no_grad():
                d_real = p.real(x_s, s, labels)
                d_fake = p.fake(nets.fake, x_s, s, labels)
                norm = (xg.detach() - d_real).abs().reshape(b, -1).mean(1).clamp_min(1e-12)
                grad = torch.nan_to_num((d_fake - d_real) / _bc(norm, xg))
            loss = 0.5 * F.mse_loss(xg, (xg - grad).detach())
            parts = {"dm": loss}
            if cfg.gan and cfg.gan_g > 0:
                s2 = _sigma_mid(b, gen, cfg, p)
                xn = xg + _bc(s2, xg) * torch.randn(xg.shape, generator=gen)
                g_gan = F.softplus(-nets.head(p.features(nets.fake, xn, s2, labels))).mean()
                loss = loss + cfg.gan_g * g_gan
                parts["gan_g"] = g_gan
        else:  # fake score + classifier
            params = list(nets.fake.parameters()) + list(nets.head.parameters())
            with torch.no_grad():
                xg = p.gen(nets.g, x_in, s_in, labels)
            s = _sigma_fake(b, gen, p)
            d = p.fake(nets.fake, xg + _bc(s, xg) * torch.randn(xg.shape, generator=gen), s, labels)
            lam = (s.double() ** 2 + sd**2) / (s.double() * sd) ** 2
            loss = (_bc(lam, d) * (d - xg) ** 2).mean()
            parts = {"fake": loss}
            if cfg.gan and cfg.gan_d > 0:
                s2 = _sigma_mid(b, gen, cfg, p)
                xf = xg + _bc(s2, xg) * torch.randn(xg.shape, generator=gen)
                xr = x0 + _bc(s2, x0) * torch.randn(x0.shape, generator=gen)
                lf = nets.head(p.features(nets.fake, xf, s2, labels))
                lr = nets.head(p.features(nets.fake, xr, s2, labels))
                d_gan = F.softplus(lf).mean() + F.softplus(-lr).mean()
                loss = loss + cfg.gan_d * d_gan
                parts["gan_d"] = d_gan
                parts["d_acc"] = 0.5 * ((lf < 0).float().mean() + (lr > 0).float().mean())
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        if stats is not None:
            for key, v in parts.items():
                v = float(v.detach())
                stats[key] = v if key not in stats else 0.95 * stats[key] + 0.05 * v
        return _grads_to_loss(loss, params, grads, world)

    return loss_fn


def loop_step(gen: torch.Generator, seed: int, rank: int) -> int:
    """The loop step a generator was seeded for: ``trainer.run`` seeds step k with
    ``(seed · 1_000_003 + k) · 1024 + rank``; the step index decides the phase, statelessly (resume)."""
    s = gen.initial_seed() - rank
    if s % 1024:
        raise DistillError("dmd2: the training loop's per-step seed has an unexpected form")
    return s // 1024 - seed * 1_000_003


def train(nets: DMD2Nets, p: Problem, cfg: DMD2Config, out_dir: str, seed: int, record: dict,
          progress: bool = True, resume: bool = True) -> tuple[DMD2Nets, DMD2Nets, dict]:
    """Run DMD2 on the shared loop; returns (the weights to ship: EMA or model, the model, info)."""
    check_config(cfg)
    stats: dict = {}
    record = {"stage": "dmd2", "config": asdict(cfg), **record}
    final, info = trainer.run(nets, make_loss(p, cfg, seed, stats), cfg.loop(), out_dir, seed, record,
                              f"dmd2 {cfg.steps}-step", progress, resume)
    info["losses"] = {k: round(v, 5) for k, v in stats.items()}
    return final, nets, info


# --- digits ------------------------------------------------------------------------------------------
class BottleneckHead(nn.Module):
    """The GAN classifier on the digits UNet's bottleneck [B, C, 4, 4] → one logit per sample."""

    def __init__(self, channels: int, groups: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels),
                                 nn.SiLU(), nn.Conv2d(channels, 1, 4))

    def forward(self, h):
        return self.net(h).reshape(-1)


def unet_bottleneck(model: nn.Module, x_in, t, cond):
    """The digits UNet's encoder (``DigitsUNet.forward`` up to the middle blocks): [B, C, 4, 4]."""
    t = t.to(torch.float32).reshape(-1)
    if t.shape[0] == 1 and x_in.shape[0] > 1:
        t = t.expand(x_in.shape[0])
    arg = t[:, None] * model.freqs[None].to(torch.float32)
    emb = model.t_mlp(torch.cat([arg.cos(), arg.sin()], dim=1).to(x_in.dtype)) + model.label(cond)
    emb = F.silu(emb)
    h = model.stem(x_in)
    for level in model.down:
        for m in level:
            h = m(h, emb) if m.__class__.__name__ == "ResBlock" else m(h)
    for m in model.mid:
        h = m(h, emb)
    return h


def digits_problem(teacher, guidance: float = 1.0) -> tuple[Problem, Callable]:
    """The digits DMD2 problem around an ``EDMDenoiser`` teacher; returns (problem, nets factory)."""
    import copy

    from ..runtime.digits_net import NULL_LABEL, make_denoiser
    from .data import load_digits_split

    x_train, y_train, _, _ = load_digits_split()
    sd = teacher.sigma_data
    w = None if guidance == 1.0 else guidance
    g_den = student_from_teacher(teacher)
    f_den = make_denoiser(copy.deepcopy(teacher.model), sd)

    def gen(g, x, s, labels):
        g_den.model = g
        return g_den._denoise(x, s, (labels, guidance))

    def fake(f, x, s, labels):
        f_den.model = f
        return f_den._denoise(x, s, labels)

    def features(f, x, s, labels):
        _, _, c_in, t = f_den.preconditioning(s, x.ndim, x.dtype)
        return unet_bottleneck(f, x * c_in, t, labels)

    def real(x, s, labels):
        return teacher(x, s, labels, guidance=w)

    def data(gen_, b):
        idx = torch.randint(x_train.shape[0], (b,), generator=gen_)
        return x_train[idx], y_train[idx]

    def nets_factory(seed: int) -> DMD2Nets:
        with torch.random.fork_rng(devices=[]):  # the head's init (and G's W embedding) is seeded
            torch.manual_seed(seed)
            g = student_from_teacher(teacher).model
            f = copy.deepcopy(teacher.model)
            head = BottleneckHead(teacher.model.cfg.channels[-1], teacher.model.cfg.groups)
        for m in (g, f, head):
            m.requires_grad_(True)
        return DMD2Nets(g, f, head)

    assert NULL_LABEL == teacher.null_label
    return Problem(gen, fake, features, real, data, (1, 8, 8), sd, teacher.sigma_min, teacher.sigma_max), \
        nets_factory


def _load_nets(nets: DMD2Nets, path: str) -> None:
    from safetensors.torch import load_file

    nets.load_state_dict(load_file(path))


def train_digits(out_dir: str, cfg: DMD2Config, teacher: str | None = None, init: str | None = None,
                 seed: int = 0, progress: bool = True, resume: bool = True) -> str:
    """Train a K-step digits generator in ``out_dir`` (from the teacher, or from ``init``: an earlier run's
    ``dmd2_nets.safetensors``); writes student.safetensors + .json, plan.json; returns the student's path."""
    from ..runtime.digits_net import NULL_LABEL, load_teacher, teacher_hash

    check_config(cfg)
    tden = load_teacher(teacher)
    if tden.guidance_mode == GUIDANCE_INPUT:
        raise DistillError("dmd2 distils a plain class-conditional digits teacher, not a distilled student")
    t_hash = teacher_hash(teacher)
    p, factory = digits_problem(tden, cfg.guidance)
    nets = factory(seed)
    init_hash = None
    if init is not None:
        _load_nets(nets, init)
        import hashlib

        with open(init, "rb") as f:
            init_hash = "sha256:" + hashlib.sha256(f.read()).hexdigest()
    final, model, info = train(nets, p, cfg, out_dir, seed, {"teacher_hash": t_hash, "init_hash": init_hash},
                               progress, resume)
    path = os.path.join(out_dir, STUDENT_FILE)
    if info["rank"] == 0:
        state = {f"g.{k}": v for k, v in final.g.state_dict().items()}
        state.update({f"fake.{k}": v for k, v in model.fake.state_dict().items()})
        state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
        trainer.save_safetensors(os.path.join(out_dir, NETS_FILE), state)
        meta = {"format": STUDENT_FORMAT, "kind": "dmd2", "steps_per_sample": cfg.steps,
                "config": trainer.jsonable(final.g.cfg.__dict__), "w_fourier": len(final.g.w_freqs) * 2,
                "sigma_data": tden.sigma_data, "sigma_min": tden.sigma_min, "sigma_max": tden.sigma_max,
                "null_label": NULL_LABEL, "guidance_range": [cfg.guidance, cfg.guidance], "teacher_hash": t_hash,
                "init_hash": init_hash, "seed": seed, "train": asdict(cfg), "losses": info["losses"], **run_info(info)}
        write_student(path, final.g, meta)
        prov = {"teacher_hash": teacher_hash(path), "distilled_from": t_hash, "sample_shape": [1, 8, 8],
                "iters": cfg.iters, "batch": cfg.batch, "train_seconds": info["wall_seconds"], "seed": seed}
        dmd2_plan(cfg.steps, tden.sigma_min, tden.sigma_max, cfg.guidance, prov).save(
            os.path.join(out_dir, "plan.json"))
    trainer.barrier()
    return path


def check_bundle(base: DMD2Config, steps: list[int], iters: list[int]) -> None:
    if len(steps) != len(iters) or not steps:
        raise DistillError(f"--iters needs one count per student ({len(steps)}), got {len(iters)}")
    if len(set(steps)) != len(steps):
        raise DistillError(f"--steps has repeats: {steps}")
    for k, n in zip(steps, iters):
        check_config(DMD2Config(**{**asdict(base), "steps": k, "iters": n}))


def train_bundle(out_dir: str, base: DMD2Config, steps: list[int], iters: list[int], teacher: str | None = None,
                 seed: int = 0, progress: bool = True, resume: bool = True) -> dict:
    """Students for each K in ``steps`` (in order), each initialised from the previous one's networks (the
    first from the teacher), in ``out_dir/steps_K``; the teacher is copied to ``out_dir/teacher`` (the
    bundle's stage-1 model: what a classic solver samples, and the eval reference). Finished students are
    kept on a rerun, an interrupted one resumes. Returns the index (students.json)."""
    from ..runtime.digits_net import _resolve, teacher_hash

    check_bundle(base, steps, iters)
    src = _resolve(teacher)
    t_hash = teacher_hash(teacher)
    rank, _ = trainer.dist_info()
    os.makedirs(out_dir, exist_ok=True)
    tdir = os.path.join(out_dir, TEACHER_DIR)
    if rank == 0:
        os.makedirs(tdir, exist_ok=True)
        for s in (src, src[: -len(".safetensors")] + ".json"):
            dst = os.path.join(tdir, "digits_teacher" + os.path.splitext(s)[1])
            shutil.copyfile(s, dst + ".tmp")
            os.replace(dst + ".tmp", dst)
    trainer.barrier()
    index = {"format": INDEX_FORMAT, "method": "dmd2", "model": "digits", "sample_shape": [1, 8, 8],
             "num_classes": 10, "guidance_range": [base.guidance, base.guidance],
             "stage1": f"{TEACHER_DIR}/digits_teacher.safetensors", "stage1_hash": t_hash, "students": {}}
    init = None
    for i, (k, n) in enumerate(zip(steps, iters)):
        cfg = DMD2Config(**{**asdict(base), "steps": k, "iters": n})
        d = os.path.join(out_dir, f"steps_{k}")
        path = os.path.join(d, STUDENT_FILE)
        done = all(os.path.exists(os.path.join(d, f)) for f in (STUDENT_FILE, "plan.json", NETS_FILE))
        if done:
            with open(path[: -len(".safetensors")] + ".json") as f:
                meta = json.load(f)
            done = meta.get("teacher_hash") == t_hash and meta.get("train") == trainer.jsonable(asdict(cfg))
        if not done:
            path = train_digits(d, cfg, teacher, init, seed + i, progress, resume)
        init = os.path.join(d, NETS_FILE)
        index["students"][str(k)] = {"weights": f"steps_{k}/{STUDENT_FILE}", "plan": f"steps_{k}/plan.json",
                                     "plan_stochastic": f"steps_{k}/plan.json"}  # the sampler is its own
        if rank == 0:
            write_index(out_dir, index)
    return index


