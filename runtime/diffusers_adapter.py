"""Diffusers models as fewstep denoisers.

``from_diffusers(unet, scheduler_config)`` reads what the model was trained on from its
scheduler config and wraps the unet in the matching adapter of ``denoisers``:

- DDPM-family configs (DDPM, DDIM, Euler, DPM-Solver, …): the discrete ᾱ table rebuilt
  from ``beta_schedule`` / ``trained_betas`` (float64, our own β tables) and
  ``prediction_type`` epsilon / v_prediction / sample → ``VP*Denoiser``; the unet gets the
  fractional timestep t(σ) (exactly the integer diffusers passes at grid σ's).
- FlowMatch configs → ``FlowDenoiser`` with t_scale = num_train_timesteps (diffusers passes
  ``timesteps = sigmas · num_train_timesteps``, its "sigma" being our t).
- EDM configs (EDMEulerScheduler, ε-prediction, edm preconditioning) → ``EDMDenoiser``.

Sampling-time options of the scheduler (timestep spacing, clip_sample, thresholding,
Karras σ's, …) are not part of the model and are ignored: a Plan decides how to sample.
diffusers itself is imported only by ``load_diffusers``; this module needs torch alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .denoisers import VP_DENOISERS, Denoiser, EDMDenoiser, FlowDenoiser

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


# --- scheduler config → noise table -------------------------------------------------------
def scheduler_config_dict(scheduler_config) -> dict:
    """A scheduler config as a plain dict, from a dict, a diffusers scheduler (``.config``),
    a ``scheduler_config.json`` path, or a directory holding one."""
    if hasattr(scheduler_config, "config") and isinstance(scheduler_config.config, Mapping):
        # a live scheduler's config lacks the "_class_name" that save_config writes
        return {"_class_name": type(scheduler_config).__name__, **scheduler_config.config}
    if isinstance(scheduler_config, Mapping):
        return dict(scheduler_config)
    if isinstance(scheduler_config, (str, Path)):
        p = Path(scheduler_config)
        if p.is_dir():
            p = p / "scheduler_config.json"
        if not p.is_file():
            raise FileNotFoundError(f"scheduler config not found: {p}")
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    raise TypeError(f"scheduler_config: expected a dict, a scheduler or a path, got {type(scheduler_config).__name__}")


MAX_TRAIN_TIMESTEPS = 1_000_000  # published schedulers train on 1,000 (a few on 4,000)


def config_number(cfg, key: str, default, ok, want: str, where: str = "scheduler config") -> float:
    """A number from a diffusers config (absent: ``default``), checked (``ok``; NaN fails any comparison) before it
    is used."""
    v = cfg.get(key, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not ok(v):
        raise ValueError(f"{where}: {key} must be {want}, got {str(v)[:40]}")
    return float(v)


def _train_steps(cfg: dict) -> int:
    return int(config_number(cfg, "num_train_timesteps", 1000, lambda v: 2 <= v <= MAX_TRAIN_TIMESTEPS and v == int(v),
                       f"an integer in [2, {MAX_TRAIN_TIMESTEPS:,}]"))


def _linear(n, start, end):
    return torch.linspace(start, end, n, dtype=torch.float64)


def _scaled_linear(n, start, end):
    # latent diffusion: linear in √β
    return torch.linspace(math.sqrt(start), math.sqrt(end), n, dtype=torch.float64) ** 2


def _cosine(n, start, end):
    # Nichol & Dhariwal (2021) eq. 17: ᾱ(t) = cos²((t + s)/(1 + s)·π/2), s = 0.008, β capped at 0.999
    # (start/end unused: the schedule has none)
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float64)


def _sigmoid(n, start, end):
    # GeoDiff: β = sigmoid(linspace(−6, 6))·(end − start) + start
    return torch.sigmoid(torch.linspace(-6, 6, n, dtype=torch.float64)) * (end - start) + start


BETA_SCHEDULES = {"linear": _linear, "scaled_linear": _scaled_linear, "squaredcos_cap_v2": _cosine,
                  "sigmoid": _sigmoid}


def _zero_terminal_snr(ac: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023) Algorithm 1: shift and scale √ᾱ so ᾱ_T = 0 and ᾱ_0 is unchanged.

    σ_T = ∞ has no place on a σ grid, so ᾱ_T is then set to 2⁻²⁴ (σ_T ≈ 4096), the value
    diffusers' Euler / DPM-Solver / UniPC schedulers use for the same reason.
    """
    s = ac.sqrt()
    s = (s - s[-1]) * (s[0] / (s[0] - s[-1]))
    ac = s**2
    ac[-1] = 2.0**-24
    return ac


def alphas_cumprod_from_config(config) -> torch.Tensor:
    """ᾱ_t (float64, length num_train_timesteps) of a DDPM-family scheduler config."""
    cfg = scheduler_config_dict(config)
    n = _train_steps(cfg)  # the table below is n float64s
    if cfg.get("trained_betas") is not None:
        tb = cfg["trained_betas"]
        if not isinstance(tb, list) or not 2 <= len(tb) <= MAX_TRAIN_TIMESTEPS \
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in tb):
            raise ValueError(f"scheduler config: trained_betas must be a list of 2 to {MAX_TRAIN_TIMESTEPS:,} numbers")
        betas = torch.tensor(tb, dtype=torch.float64)
    else:
        name = cfg.get("beta_schedule", "linear")
        if name not in BETA_SCHEDULES:
            raise ValueError(f"scheduler config: unknown beta_schedule {name!r}; supported: {sorted(BETA_SCHEDULES)}")
        ends = [config_number(cfg, k, d, lambda v: 0 <= v < 1, "a number in [0, 1)")
                for k, d in (("beta_start", 1e-4), ("beta_end", 0.02))]
        betas = BETA_SCHEDULES[name](n, ends[0], ends[1])
    ac = torch.cumprod(1 - betas, 0)
    if cfg.get("rescale_betas_zero_snr", False):
        ac = _zero_terminal_snr(ac)
    return ac


def _kind(cfg: dict) -> str:
    cls = str(cfg.get("_class_name", ""))
    if cls.startswith("FlowMatch") or cfg.get("prediction_type") == "flow_prediction" or cfg.get("use_flow_sigmas"):
        return "flow"
    if cls.startswith("EDM"):
        return "edm"
    if cls.startswith(("ScoreSdeVe", "KarrasVe", "ScoreSdeVp", "CMStochastic")):
        raise ValueError(f"scheduler config: {cls} is not supported (DDPM-family, FlowMatch and EDM configs are)")
    return "vp"


# --- the network wrapper ------------------------------------------------------------------
class DiffusersUNet(nn.Module):
    """``F(x_in, t, cond)`` over a diffusers ``UNet2DModel`` / ``UNet2DConditionModel``.

    cond: class labels ([B] long) for a class-conditional UNet2DModel, encoder hidden states
    ([B, seq, dim]) for a UNet2DConditionModel, or a dict of keyword arguments for the unet
    (e.g. ``{"encoder_hidden_states": …, "added_cond_kwargs": {…}}``). The input is cast to
    the unet's dtype; t is passed as float32 (diffusers' time embedding casts to float32
    anyway). Learned-variance unets (2C output channels) give their first C channels.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        name = type(unet).__name__
        cfg = unet.config
        if name == "UNet2DConditionModel":
            self.cond_kind = "encoder_hidden_states"
        elif cfg.get("num_class_embeds") is not None or cfg.get("class_embed_type") is not None:
            self.cond_kind = "class_labels"
        else:
            self.cond_kind = None
        if cfg.get("time_embedding_type", "positional") != "positional":
            # "learned" embeds integer timesteps only; "fourier" is the score-SDE VE convention
            raise ValueError(f"{name}: time_embedding_type {cfg.get('time_embedding_type')!r} is not supported")
        self.unet = unet
        self.split = cfg.get("out_channels") == 2 * cfg.get("in_channels")

    def cfg_prefix(self) -> list[nn.Module]:
        return unet_cfg_prefix(self.unet)

    def forward(self, x_in, t, cond=None):
        dtype = self.unet.dtype
        if isinstance(cond, Mapping):
            kwargs = dict(cond)
        elif cond is None:
            if self.cond_kind == "encoder_hidden_states":
                raise ValueError("UNet2DConditionModel needs cond: encoder hidden states [B, seq, dim]")
            kwargs = {}
        elif self.cond_kind is None:
            raise ValueError("this unet is unconditional: cond must be None")
        elif self.cond_kind == "encoder_hidden_states":
            kwargs = {"encoder_hidden_states": cond.to(dtype)}
        else:
            kwargs = {"class_labels": cond}
        t = t.to(torch.float32).expand(x_in.shape[0])
        out = self.unet(x_in.to(dtype), t, return_dict=False, **kwargs)[0]
        return out[:, : x_in.shape[1]] if self.split else out


def unet_cfg_prefix(unet: nn.Module) -> list[nn.Module]:
    """The modules a diffusers ``UNet2DConditionModel`` runs before the conditioning first enters it, in order:
    conv_in, the down path's resnets (and downsamplers) up to the first transformer, and that transformer's input
    norm, projection and first self-attention (norm1, attn1) — the first cross-attention (attn2) is where the
    prompt comes in. They see x and the time embedding only, so on classifier-free guidance's two halves they
    compute the same rows (``Denoiser.shared_rows``). SD 1.5 at 64² latents: about 2.5 % of a call's FLOPs per
    row, most of it in the 4096-token self-attention. Empty where the time embedding carries conditioning too
    (class labels, SDXL's pooled text and time ids) or for a layout not recognised here: nothing is shared."""
    if type(unet).__name__ != "UNet2DConditionModel" or getattr(unet, "class_embedding", None) is not None \
            or getattr(unet, "add_embedding", None) is not None or unet.config.get("addition_embed_type"):
        return []
    mods = [unet.conv_in]
    for block in unet.down_blocks:
        kind = type(block).__name__
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            return mods
        attns = list(getattr(block, "attentions", None) or [None] * len(block.resnets))
        for resnet, attn in zip(block.resnets, attns):
            if type(resnet).__name__ != "ResnetBlock2D":
                return mods
            mods.append(resnet)
            if attn is not None:
                return mods + _transformer_prefix(attn)
        mods += list(getattr(block, "downsamplers", None) or [])
    return mods


def _transformer_prefix(attn: nn.Module) -> list[nn.Module]:
    """A ``Transformer2DModel``'s modules before its first cross-attention: norm, proj_in, and the first block's
    norm1 and attn1 where attn1 is a plain self-attention."""
    if type(attn).__name__ != "Transformer2DModel" or not getattr(attn, "is_input_continuous", False) \
            or not len(attn.transformer_blocks):
        return []
    mods = [attn.norm, attn.proj_in]
    blk = attn.transformer_blocks[0]
    if type(blk).__name__ == "BasicTransformerBlock" and blk.norm_type == "layer_norm" \
            and not blk.only_cross_attention and blk.pos_embed is None and not blk.attn1.is_cross_attention:
        mods += [blk.norm1, blk.attn1]
    return mods


def denoiser_for(net: nn.Module, scheduler_config, null=None) -> Denoiser:
    """The denoiser adapter a scheduler config says ``net`` (``F(x_in, t, cond)``) was trained for; ``null``:
    the stored unconditional input (a class label or a tensor), None for none."""
    cfg = scheduler_config_dict(scheduler_config)
    kind = _kind(cfg)
    if kind == "flow":
        n = _train_steps(cfg)
        # diffusers' training grid is t = k/N, k = 1..N; shifting t' = s·t/(1 + (s−1)·t) is σ' = s·σ.
        # t = 1 is σ = ∞, so σ_max is the next point, t = (N−1)/N.
        key = "shift" if "shift" in cfg or "flow_shift" not in cfg else "flow_shift"
        shift = 1.0 if cfg.get("use_dynamic_shifting") else \
            config_number(cfg, key, 1.0, lambda v: 0 < v < math.inf, "a positive number")
        if cfg.get("invert_sigmas"):
            raise ValueError("scheduler config: invert_sigmas (reversed flow time) is not supported")
        den = FlowDenoiser(net, t_scale=float(n), sigma_min=shift / (n - 1), sigma_max=shift * (n - 1),
                           null_cond_value=null)
    elif kind == "edm":
        pred = cfg.get("prediction_type", "epsilon")
        if pred != "epsilon" or cfg.get("precondition_type", "edm") != "edm":
            raise ValueError(f"scheduler config: EDM with prediction_type {pred!r} / precondition_type "
                             f"{cfg.get('precondition_type')!r} is not supported (epsilon + edm is)")
        pos = (lambda v: 0 < v < math.inf, "a positive number")
        sd, lo, hi = (config_number(cfg, k, d, *pos) for k, d in (("sigma_data", 0.5), ("sigma_min", 0.002),
                                                             ("sigma_max", 80.0)))
        den = EDMDenoiser(net, sigma_data=sd, sigma_min=lo, sigma_max=hi, null_label=null)
    else:
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in VP_DENOISERS:
            raise ValueError(f"scheduler config: unknown prediction_type {pred!r}; supported: {sorted(VP_DENOISERS)}")
        den = VP_DENOISERS[pred](net, alphas_cumprod_from_config(cfg), null_cond_value=null)
    return den


# --- public entry points ------------------------------------------------------------------
def from_diffusers(unet: nn.Module, scheduler_config, *, null_label: int | None = None,
                   uncond: torch.Tensor | None = None, sigma_min: float | None = None,
                   sigma_max: float | None = None) -> Denoiser:
    """Wrap a diffusers unet as the denoiser its scheduler config says it was trained for.

    null_label: the class label meaning "no class" (classifier-free guidance with a
    class-conditional UNet2DModel). uncond: the unconditional encoder hidden states for a
    UNet2DConditionModel (e.g. the empty-prompt embedding, [1, seq, dim]). Without them
    guidance ≠ 1 raises. sigma_min / sigma_max override the defaults taken from the config.
    """
    name = type(unet).__name__
    if name not in UNET_CLASSES:
        raise ValueError(f"from_diffusers: expected one of {UNET_CLASSES}, got {name}")
    net = DiffusersUNet(unet)
    if null_label is not None and net.cond_kind != "class_labels":
        raise ValueError(f"from_diffusers: null_label given but {name} takes no class labels")
    if uncond is not None and net.cond_kind != "encoder_hidden_states":
        raise ValueError(f"from_diffusers: uncond given but {name} takes no encoder hidden states")
    null = null_label if null_label is not None else uncond
    den = denoiser_for(net, scheduler_config, null)
    if sigma_min is not None:
        den.sigma_min = float(sigma_min)
    if sigma_max is not None:
        den.sigma_max = float(sigma_max)
    return den


def load_diffusers(path, scheduler_config=None, *, torch_dtype: torch.dtype | None = None, device=None,
                   null_label: int | None = None, uncond: torch.Tensor | None = None,
                   sigma_min: float | None = None, sigma_max: float | None = None) -> Denoiser:
    """Load a unet from a local directory (never the network) and wrap it with ``from_diffusers``.

    ``path`` is a pipeline-like directory (``unet/`` + ``scheduler/scheduler_config.json``) or
    a bare unet directory (``config.json`` + weights; the scheduler config is taken from
    ``scheduler_config`` — a dict, a json path or a directory — or a ``scheduler_config.json``
    next to the unet's config, as in google/ddpm-* repositories).
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"load_diffusers: no such directory: {root}")
    if (root / "unet" / "config.json").is_file():
        unet_dir, default_sched = root / "unet", root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        unet_dir, default_sched = root, root / "scheduler_config.json"
    else:
        raise FileNotFoundError(f"load_diffusers: {root} has neither unet/config.json (a pipeline) nor config.json "
                                "(a bare unet)")
    if scheduler_config is None:
        if not default_sched.is_file():
            raise FileNotFoundError(f"load_diffusers: no scheduler config at {default_sched}; pass scheduler_config=")
        scheduler_config = default_sched
    with open(unet_dir / "config.json", encoding="utf-8") as f:
        cls_name = json.load(f).get("_class_name")
    if cls_name not in UNET_CLASSES:
        raise ValueError(f"load_diffusers: {unet_dir / 'config.json'} describes {cls_name!r}; "
                         f"supported: {UNET_CLASSES}")
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("load_diffusers needs the diffusers package: pip install diffusers") from e
    from .folder_check import check_component

    cls = getattr(diffusers, cls_name)
    check_component(str(unet_dir), cls, "diffusers")
    unet = cls.from_pretrained(unet_dir, torch_dtype=torch_dtype, local_files_only=True,
                               low_cpu_mem_usage=False)  # without accelerate: no six-line warning to stderr
    if device is not None:
        unet = unet.to(device)
    return from_diffusers(unet.eval(), scheduler_config, null_label=null_label, uncond=uncond,
                          sigma_min=sigma_min, sigma_max=sigma_max)
