"""The digits networks as the runtime loads them: the class-conditional UNet of the shipped teacher, the
guidance-conditioned UNet of the distilled students, and their checkpoint format.

Training lives in ``fewstep.training.digits`` (the teacher) and ``fewstep.training.guided`` /
``progressive`` / ``dmd2`` (students); this module only builds and loads what they write: a
``.safetensors`` file of weights beside a ``.json`` of config and provenance.

Model: EDM preconditioning (Karras et al. 2022) around a two-level UNet (8×8 → 4×4, GroupNorm +
SiLU residual blocks, scale/shift conditioning on a sinusoidal embedding of t = ¼ ln σ plus a
class embedding with 11 entries: the digits 0..9 and the null label 10 for classifier-free
guidance). A student adds an embedding of the guidance scale W (guidance as an input).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .denoisers import GUIDANCE_INPUT, EDMDenoiser, FlowDenoiser

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
TEACHER_FILE = "digits_teacher.safetensors"
STUDENT_FILE = "student.safetensors"
STUDENT_FORMAT = "fewstep.digits-student/1"
# A flow-velocity digits model (catch-up distillation, its flow-matching baseline): the same UNet predicting
# v = z − x at x_t = t·z + (1 − t)·x, t ∈ [0, 1] as its time input, sampled through ``FlowDenoiser``.
FLOW_FORMAT = "fewstep.digits-flow/1"
NUM_CLASSES = 10
NULL_LABEL = 10


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
        # Log-spaced frequencies cover t = ¼ ln σ ∈ [−1.6, 1.1] (σ from 0.002 to 80) and beyond. On the CPU even
        # under load_checked's meta device, where exp would import torch._dynamo (see _SkipInit).
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(100.0), cfg.fourier_dim // 2,
                                                               device="cpu")), persistent=False)
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


class GuidedUNet(DigitsUNet):
    """The digits UNet plus an embedding of the guidance scale W, added to the time + class embedding."""

    def __init__(self, cfg: UNetConfig | None = None, w_fourier: int = 16):
        cfg = cfg or UNetConfig()
        super().__init__(cfg)
        # W of interest lies in [1, 5]; periods from ~0.6 to ~60 resolve it without aliasing over [0, 10].
        self.register_buffer("w_freqs", torch.exp(torch.linspace(math.log(0.1), math.log(10.0), w_fourier // 2,
                                                                 device="cpu")), persistent=False)  # see freqs
        self.w_mlp = nn.Sequential(nn.Linear(w_fourier, cfg.emb_dim), nn.SiLU(), nn.Linear(cfg.emb_dim, cfg.emb_dim))
        nn.init.zeros_(self.w_mlp[2].weight)  # starts as the teacher: the W embedding adds nothing
        nn.init.zeros_(self.w_mlp[2].bias)

    def extra_embedding(self, x, w):
        # float32 phases whatever the network dtype, as for t
        w = w.to(torch.float32).reshape(-1)
        if w.shape[0] == 1 and x.shape[0] > 1:
            w = w.expand(x.shape[0])
        arg = w[:, None] * self.w_freqs[None].to(torch.float32)
        return self.w_mlp(torch.cat([arg.cos(), arg.sin()], dim=1).to(x.dtype))


class GuidedDenoiser(EDMDenoiser):
    """EDM preconditioning around a W-conditioned network: guidance is an input, one evaluation per call.
    W = 1 (or no guidance) is the plain conditional model."""

    @property
    def guidance_mode(self) -> str:
        return GUIDANCE_INPUT

    def run_model(self, x_in, t, cond):
        labels, w = cond if isinstance(cond, tuple) else (cond, None)
        if labels is None:
            labels = torch.full((x_in.shape[0],), NULL_LABEL, dtype=torch.long, device=x_in.device)
        if w is None:
            w = 1.0
        if not isinstance(w, torch.Tensor):
            w = torch.tensor(float(w), dtype=torch.float32, device=x_in.device)
        return self.model(x_in, t, labels, w.reshape(-1).expand(x_in.shape[0]) if w.numel() == 1 else w.reshape(-1))


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


class _SkipInit(torch.overrides.TorchFunctionMode):
    """In-place initialisers are no-ops: ``load_checked`` reads only shapes. On meta tensors torch runs them as
    Python references that import torch._dynamo, ≈ 2.8 s of every command that loads a digits model."""

    SKIP = frozenset({"normal_", "uniform_", "zero_", "fill_", "trunc_normal_", "kaiming_uniform_",
                      "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "ones_", "zeros_", "constant_",
                      "orthogonal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        t = args[0] if args else kwargs.get("tensor")  # nn.init passes the tensor by keyword
        if getattr(func, "__name__", "") in self.SKIP and getattr(t, "is_meta", False):
            return t
        return func(*args, **kwargs)


def load_checked(make, path: str) -> nn.Module:
    """``make()`` with the weights at ``path``, every tensor's name and shape checked against the file's
    header on the meta device first: a config that does not match its weights (or asks for a huge
    network) fails in one line before anything is allocated."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .files import check_regular

    check_regular(path, "weights file")
    with safe_open(path, framework="pt") as f:
        have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    with torch.device("meta"), _SkipInit():
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
    # Channels-last convolutions: 0.77–0.88× the time per sample on the CPU at batch 32–512 (oneDNN's
    # NHWC kernels; benchmarks/results/digits_net_layout.md); the input needs no conversion (1 channel).
    return model.to(memory_format=torch.channels_last)


def read_meta(path: str) -> dict:
    """The JSON beside a .safetensors checkpoint (its config, format and provenance)."""
    from .files import load_json

    meta = load_json(path[: -len(".safetensors")] + ".json", "checkpoint config", 1 << 20)
    if not isinstance(meta, dict):
        raise ValueError(f"{path[: -len('.safetensors')]}.json: expected a JSON object")
    return meta


def load_teacher(path: str | None = None) -> EDMDenoiser:
    """The digits teacher as an ``EDMDenoiser`` (eval mode, float32). None = the shipped weights."""
    path = _resolve(path)
    meta = read_meta(path)
    if meta.get("format") == STUDENT_FORMAT:  # a distilled student: same loader path
        return load_student(path, meta)
    if meta.get("format") == FLOW_FORMAT:
        return load_flow(path, meta)
    model = load_checked(lambda: DigitsUNet(UNetConfig.from_dict(meta["config"])), path)
    model.eval().requires_grad_(False)
    den = make_denoiser(model, meta["sigma_data"])
    return den.eval()


def teacher_hash(path: str | None = None) -> str:
    """sha256 of the weights file's bytes: the teacher id recorded in fitted plans."""
    with open(_resolve(path), "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()


def load_student(path: str, meta: dict | None = None) -> GuidedDenoiser:
    """A student written by ``train_guided`` or ``progressive`` (eval mode, float32)."""
    if meta is None:
        meta = read_meta(path)
    if meta.get("format") != STUDENT_FORMAT:
        raise ValueError(f"{path}: not a fewstep digits student (format {meta.get('format')!r})")
    model = load_checked(lambda: GuidedUNet(UNetConfig.from_dict(meta["config"]), meta["w_fourier"]), path)
    model.eval().requires_grad_(False)
    den = GuidedDenoiser(model, sigma_data=meta["sigma_data"], sigma_min=meta["sigma_min"],
                         sigma_max=meta["sigma_max"], null_label=meta["null_label"])
    return den.eval()


def make_flow_denoiser(model: nn.Module, sigma_min: float = 0.002, sigma_max: float = 80.0) -> FlowDenoiser:
    """A flow-velocity digits UNet as a denoiser: σ = t/(1 − t), D = x_t − t·v (the null label for CFG)."""
    return FlowDenoiser(model, t_scale=1.0, sigma_min=sigma_min, sigma_max=sigma_max, null_cond_value=NULL_LABEL)


def load_flow(path: str, meta: dict | None = None) -> FlowDenoiser:
    """A flow-velocity digits model (``FLOW_FORMAT``, written by ``training.catchup``), eval mode, float32."""
    if meta is None:
        meta = read_meta(path)
    if meta.get("format") != FLOW_FORMAT:
        raise ValueError(f"{path}: not a fewstep digits flow model (format {meta.get('format')!r})")
    model = load_checked(lambda: DigitsUNet(UNetConfig.from_dict(meta["config"])), path)
    model.eval().requires_grad_(False)
    return make_flow_denoiser(model, float(meta["sigma_min"]), float(meta["sigma_max"])).eval()
