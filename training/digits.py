"""The digits teacher: a small class-conditional UNet on scikit-learn's 8×8 handwritten digits.

Data: ``sklearn.datasets.load_digits`` (1,797 real images, values 0..16, 10 classes; ships
inside scikit-learn), scaled to [−1, 1] by x/8 − 1, split by a fixed stratified permutation
(seed 0): 30 images per class held out (300 test), the other 1,497 train.

Model: EDM preconditioning (Karras et al. 2022) around a two-level UNet (8×8 → 4×4, GroupNorm +
SiLU residual blocks, scale/shift conditioning on a sinusoidal embedding of t = ¼ ln σ plus a
class embedding with 11 entries: the digits 0..9 and the null label 10 for classifier-free
guidance). Training: the EDM loss (ln σ ~ N(−1.2, 1.2²), weight (σ² + σd²)/(σ·σd)²), Adam with
warm-up, label dropout 0.1, an EMA of the weights for sampling.

Reproduce the shipped weights (training/weights/digits_teacher.*)::

    OMP_NUM_THREADS=1 python -m fewstep.training.digits   # trains in out/digits_teacher, copies the result

(one thread: on the shared 2-core machine two OpenMP threads ran 10× slower than one.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..runtime.denoisers import EDMDenoiser
from ..runtime.plan import atomic_write_bytes, atomic_write_text

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
TEACHER_FILE = "digits_teacher.safetensors"
STATE_FILE = "train_state.safetensors"  # full training state (model, EMA, Adam) for resuming
NUM_CLASSES = 10
NULL_LABEL = 10
SPLIT_SEED = 0
TEST_PER_CLASS = 30


# --- data ------------------------------------------------------------------------------------
def load_digits_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train [1497,1,8,8], y_train, x_test [300,1,8,8], y_test): float32 in [−1, 1], long labels.

    Stratified: a seed-0 permutation of each class's indices, its first 30 held out.
    """
    return tuple(t.clone() for t in _split())


@functools.lru_cache(maxsize=1)
def _split():
    # cached: sklearn parses its CSV on every call (1–3 s on the shared machine)
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 8.0 - 1.0
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:TEST_PER_CLASS] for c in range(NUM_CLASSES)])
    test = np.sort(test)
    train = np.setdiff1d(np.arange(len(y)), test)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return t(x[train, None]), t(y[train]), t(x[test, None]), t(y[test])


def measure_sigma_data(x: torch.Tensor) -> float:
    """RMS of the data: EDM's c_skip/c_out derivation uses E[x0²] (its σd assumes zero mean;
    these digits have mean −0.39, so the plain std, 0.75, would understate it)."""
    return float(x.double().pow(2).mean().sqrt())


# --- the network -----------------------------------------------------------------------------
@dataclass(frozen=True)
class UNetConfig:
    # Sized for minutes of training on 2 CPU cores and < 2 MB of float32 weights (412k parameters).
    channels: tuple[int, ...] = (32, 48)  # per resolution level: 8×8, 4×4
    blocks: int = 1  # residual blocks per level on the way down (one more on the way up)
    emb_dim: int = 64
    fourier_dim: int = 32
    groups: int = 8
    num_classes: int = NUM_CLASSES  # + 1 embedding row: the null label

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)  # scale and shift of the second norm
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return (self.skip(x) + h) / math.sqrt(2)


class DigitsUNet(nn.Module):
    """``model(x_in, t, cond)``: x_in [B,1,8,8] (already c_in-scaled), t [B] (¼ ln σ), cond [B] long."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.cfg = cfg
        ch, e = cfg.channels, cfg.emb_dim
        # Log-spaced frequencies cover t = ¼ ln σ ∈ [−1.6, 1.1] (σ from 0.002 to 80) and beyond.
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), cfg.fourier_dim // 2)),
                             persistent=False)
        self.t_mlp = nn.Sequential(nn.Linear(cfg.fourier_dim, e), nn.SiLU(), nn.Linear(e, e))
        self.label = nn.Embedding(cfg.num_classes + 1, e)
        self.stem = nn.Conv2d(1, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [ch[0]]
        c = ch[0]
        for i, co in enumerate(ch):
            level = nn.ModuleList()
            for _ in range(cfg.blocks):
                level.append(ResBlock(c, co, e, cfg.groups))
                c = co
                skips.append(c)
            if i < len(ch) - 1:
                level.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
            self.down.append(level)
        self.mid = nn.ModuleList([ResBlock(c, c, e, cfg.groups), ResBlock(c, c, e, cfg.groups)])
        self.up = nn.ModuleList()
        for i, co in reversed(list(enumerate(ch))):
            level = nn.ModuleList()
            for _ in range(cfg.blocks + 1):
                level.append(ResBlock(c + skips.pop(), co, e, cfg.groups))
                c = co
            if i > 0:
                level.append(nn.Conv2d(c, c, 3, padding=1))  # after a nearest-neighbour ×2
            self.up.append(level)
        self.out_norm = nn.GroupNorm(cfg.groups, c)
        self.out = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def extra_embedding(self, x, extra):
        raise TypeError("DigitsUNet takes no extra conditioning (a guidance-conditioned student does)")

    def forward(self, x, t, cond, extra=None):
        # The sinusoidal embedding runs in float32 whatever the network's dtype (fp16/bf16 phases
        # are too coarse, and ONNX opset 17 has no bf16 Cos/Sin); only its output is cast.
        t = t.to(torch.float32).reshape(-1)
        if t.shape[0] == 1 and x.shape[0] > 1:
            t = t.expand(x.shape[0])
        arg = t[:, None] * self.freqs[None].to(torch.float32)
        emb = self.t_mlp(torch.cat([arg.cos(), arg.sin()], dim=1).to(x.dtype))
        if cond is None:
            cond = torch.full((x.shape[0],), self.cfg.num_classes, dtype=torch.long, device=x.device)
        emb = emb + self.label(cond)
        if extra is not None:
            emb = emb + self.extra_embedding(x, extra)
        emb = F.silu(emb)
        h = self.stem(x)
        hs = [h]
        for level in self.down:
            for m in level:
                h = m(h, emb) if isinstance(m, ResBlock) else m(h)
                hs.append(h)
        for m in self.mid:
            h = m(h, emb)
        for level in self.up:
            for m in level:
                if isinstance(m, ResBlock):
                    h = m(torch.cat([h, hs.pop()], dim=1), emb)
                else:
                    h = m(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


def make_denoiser(model: nn.Module, sigma_data: float) -> EDMDenoiser:
    return EDMDenoiser(model, sigma_data=sigma_data, sigma_min=0.002, sigma_max=80.0, null_label=NULL_LABEL)


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


def train_teacher(out_dir: str, seed: int = 0, steps: int = SHIPPED_STEPS, batch: int | None = None,
                  progress: bool = True, resume: bool = True, config: TrainConfig | None = None) -> str:
    """Train (or resume) the digits teacher in ``out_dir``; returns the path of its EMA weights.

    ``out_dir`` gets ``train_state.safetensors`` + ``.json`` (model, EMA, Adam moments, step) every
    ``ckpt_every`` steps and at the end, both written atomically, and ``digits_teacher.safetensors``
    + ``.json`` (the EMA weights, the sampling artifact) at the end. Each step's randomness comes
    from a generator seeded by (seed, step), so a resumed run is bitwise the uninterrupted one.
    """
    from safetensors.torch import load_file
    from tqdm import tqdm

    cfg = config or TrainConfig()
    if batch is not None:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "batch": batch})
    os.makedirs(out_dir, exist_ok=True)
    x_train, y_train, _, _ = load_digits_split()
    sigma_data = round(measure_sigma_data(x_train), 4)

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = DigitsUNet(cfg.unet)
    ema = DigitsUNet(cfg.unet)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=False)
    den = make_denoiser(model, sigma_data)
    params = dict(model.named_parameters())

    start, wall, loss_avg = 0, 0.0, float("nan")
    state_json = os.path.join(out_dir, STATE_FILE.replace(".safetensors", ".json"))
    if resume and os.path.exists(state_json):
        with open(state_json) as f:
            st = json.load(f)
        if st["config"] != _jsonable(cfg.to_dict()) or st["seed"] != seed:
            raise ValueError(f"{state_json}: written by a run with another config or seed; use a fresh --out "
                             f"or resume=False")
        tensors = load_file(os.path.join(out_dir, STATE_FILE))
        if int(tensors["step"]) != st["step"]:
            raise ValueError(f"{out_dir}: {STATE_FILE} and its JSON disagree on the step (interrupted write?)")
        start, wall, loss_avg = st["step"], st["wall_seconds"], st["loss"]
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        if start > 0:
            sd = opt.state_dict()
            names = list(params)
            sd["state"] = {i: {"step": torch.tensor(float(start)), "exp_avg": tensors[f"adam_m.{n}"],
                               "exp_avg_sq": tensors[f"adam_v.{n}"]} for i, n in enumerate(names)}
            opt.load_state_dict(sd)

    def save_state(step):
        t = {f"model.{k}": v for k, v in model.state_dict().items()}
        t.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
        for n in params:
            s = opt.state.get(params[n], {})
            t[f"adam_m.{n}"] = s.get("exp_avg", torch.zeros_like(params[n]))
            t[f"adam_v.{n}"] = s.get("exp_avg_sq", torch.zeros_like(params[n]))
        t["step"] = torch.tensor(step)
        _save_safetensors(os.path.join(out_dir, STATE_FILE), t)
        atomic_write_text(state_json, json.dumps({"format": "fewstep.digits-train-state/1", "step": step,
                                                  "seed": seed, "loss": loss_avg, "wall_seconds": wall,
                                                  "sigma_data": sigma_data, "config": _jsonable(cfg.to_dict())},
                                                 indent=1) + "\n")

    gen = torch.Generator()
    decay = 0.5 ** (1.0 / cfg.ema_halflife)
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    bar = tqdm(total=steps, initial=start, disable=not progress, desc="digits teacher", dynamic_ncols=True)
    try:
        t0 = time.perf_counter()
        for step in range(start, steps):
            gen.manual_seed(seed * 1_000_003 + step)
            idx = torch.randint(x_train.shape[0], (cfg.batch,), generator=gen)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
            loss = edm_loss(den, x_train[idx], y_train[idx], sigma_data, cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            k = min(decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - k)
            li = float(loss.detach())
            loss_avg = li if math.isnan(loss_avg) else 0.98 * loss_avg + 0.02 * li
            bar.update(1)
            bar.set_postfix(loss=f"{loss_avg:.4f}")
            done = step + 1
            if done % cfg.ckpt_every == 0 or done == steps:
                wall += time.perf_counter() - t0
                t0 = time.perf_counter()
                save_state(done)
    finally:
        bar.close()
        torch.use_deterministic_algorithms(prev_det)

    path = os.path.join(out_dir, TEACHER_FILE)
    st = ema.state_dict()
    _save_safetensors(path, {k: v.contiguous() for k, v in st.items()})
    meta = {"format": "fewstep.digits-teacher/1", "config": _jsonable(cfg.unet.__dict__), "sigma_data": sigma_data,
            "sigma_min": 0.002, "sigma_max": 80.0, "null_label": NULL_LABEL, "seed": seed, "steps": max(steps, start),
            "batch": cfg.batch, "train": _jsonable(cfg.to_dict()), "loss": loss_avg, "wall_seconds": round(wall, 1),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "data": f"sklearn load_digits, x/8-1, stratified split seed {SPLIT_SEED}, {TEST_PER_CLASS}/class held out"}
    atomic_write_text(path[: -len(".safetensors")] + ".json", json.dumps(meta, indent=1) + "\n")
    return path


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown cpu"


def _jsonable(d):
    return json.loads(json.dumps(d))


def _save_safetensors(path: str, tensors: dict) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().contiguous() for k, v in tensors.items()}))


# --- loading ---------------------------------------------------------------------------------
def _resolve(path: str | None) -> str:
    if path is None:
        path = os.path.join(WEIGHTS_DIR, TEACHER_FILE)
    if os.path.isdir(path):
        student = os.path.join(path, "student.safetensors")
        path = student if os.path.exists(student) else os.path.join(path, TEACHER_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"digits teacher weights not found: {path}")
    return path


def load_checked(make, path: str) -> nn.Module:
    """``make()`` with the weights at ``path``, every tensor's name and shape checked against the file's
    header on the meta device first: a config that does not match its weights (or asks for a huge
    network) fails in one line before anything is allocated."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..runtime.files import check_regular

    check_regular(path, "weights file")
    with safe_open(path, framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in make().state_dict().items()}
    for k in want:
        if k not in have:
            raise ValueError(f"{path}: tensor {k} missing ({len(have)} tensors in the file, {len(want)} expected)")
        if have[k] != want[k]:
            raise ValueError(f"{path}: tensor {k} has shape {list(have[k])}, the config says {list(want[k])}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"{path}: tensor {extra[0]} is not part of this network ({len(extra)} unexpected)")
    model = make()
    model.load_state_dict(load_file(path))
    return model


def read_meta(path: str) -> dict:
    """The JSON beside a .safetensors checkpoint (its config, format and provenance)."""
    from ..runtime.files import load_json

    meta = load_json(path[: -len(".safetensors")] + ".json", "checkpoint config", 1 << 20)
    if not isinstance(meta, dict):
        raise ValueError(f"{path[: -len('.safetensors')]}.json: expected a JSON object")
    return meta


def load_teacher(path: str | None = None) -> EDMDenoiser:
    """The digits teacher as an ``EDMDenoiser`` (eval mode, float32). None = the shipped weights."""
    path = _resolve(path)
    meta = read_meta(path)
    if str(meta.get("format", "")).startswith("fewstep.digits-student/"):  # a distilled student: same loader path
        from .guided import load_student

        return load_student(path, meta)
    model = load_checked(lambda: DigitsUNet(UNetConfig.from_dict(meta["config"])), path)
    model.eval().requires_grad_(False)
    den = make_denoiser(model, meta["sigma_data"])
    return den.eval()


def teacher_hash(path: str | None = None) -> str:
    """sha256 of the weights file's bytes: the teacher id recorded in fitted plans."""
    with open(_resolve(path), "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


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
    machine = (f"{_cpu_name()} ({platform.machine()}), {os.cpu_count()} cpus, "
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
    and their JSON into training/weights/ (the training state, 4× larger, stays behind)."""
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
