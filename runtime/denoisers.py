"""Denoiser adapters: every model is seen as D(x; σ, cond) ≈ E[x0 | x_σ] in EDM space.

In the style of k-diffusion's ``external.py`` and EDM's ``*Precond``: a subclass supplies
``get_scalings(σ) → (c_skip, c_out, c_in)`` and ``sigma_to_t``; the wrapped network sees
``F(c_in·x, t(σ), cond)`` and ``D = c_skip·x + c_out·F``. Scalings are computed in float64
and cast to the state's dtype at the end (σ maths never runs in fp16).

Diffusers models: ``fewstep.runtime.diffusers_adapter.from_diffusers`` / ``load_diffusers``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import nn

# How a denoiser takes the guidance scale W (``Denoiser.guidance_mode``): every executor and the exporter
# read this, never the denoiser's type.
GUIDANCE_CFG = "cfg"  # classifier-free guidance: one batched call over [null; cond], D_u + W·(D_c − D_u)
GUIDANCE_INPUT = "input"  # W is a network input (a guidance-distilled student): one evaluation of B rows
GUIDANCE_NONE = "none"  # no null conditioning: W must be 1


def guidance_applies(cond, w) -> bool:
    """Whether W changes the result: a conditioning is set and W ≠ 1 (None means 1; a tensor W may be anything)."""
    if cond is None or w is None:
        return False
    return isinstance(w, torch.Tensor) or w != 1.0


def cfg_combine(d_u, d_c, w):
    """Classifier-free guidance (diffusers' convention): W = 1 is the conditional model."""
    return d_u + w * (d_c - d_u)


class Denoiser(nn.Module):
    """Base adapter. ``model(x_in, t, cond)`` is the raw network.

    What a denoiser is, for the executors and the exporter (no type tests downstream):
    - ``preconditioned``: D = c_skip·x + c_out·F(c_in·x, t(σ)) around ``self.model``, with ``get_scalings``
      and ``sigma_to_t`` written in ops that trace into ONNX (so σ maths can be baked per Plan row); False
      for a denoiser with its own closed-form ``_denoise`` (the exact GMM).
    - ``guidance_mode``: how W enters (``GUIDANCE_CFG`` / ``GUIDANCE_INPUT`` / ``GUIDANCE_NONE``).
    ``null_cond(cond)`` gives the unconditional input for classifier-free guidance.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    preconditioned: bool = True

    def __init__(self, model: nn.Module | None = None):
        super().__init__()
        self.model = model

    # --- hooks -------------------------------------------------------------------------
    def get_scalings(self, sigma: torch.Tensor):
        raise NotImplementedError

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def has_null_cond(self) -> bool:
        return False

    def null_cond(self, cond):
        raise ValueError(f"{type(self).__name__} has no unconditional input: classifier-free guidance needs one")

    def run_model(self, x_in, t, cond):
        return self.model(x_in, t, cond)

    @property
    def guidance_mode(self) -> str:
        return GUIDANCE_CFG if self.has_null_cond() else GUIDANCE_NONE

    # Where ``features`` reads the network: the first module so named (diffusers UNets: ``mid_block``; the digits
    # UNet: ``mid``, a list whose last block is taken), else the middle one of ``transformer_blocks`` (SD3, Flux).
    FEATURE_MODULES = ("mid_block", "mid")
    FEATURE_BLOCK_LISTS = ("transformer_blocks",)

    def feature_module(self) -> nn.Module | None:
        """The module whose output ``features`` returns; None where the network has none (or there is no network)."""
        if not isinstance(self.model, nn.Module):
            return None
        mods = list(self.model.named_modules())
        for names, pick in ((self.FEATURE_MODULES, lambda m: m[-1]),
                            (self.FEATURE_BLOCK_LISTS, lambda m: m[len(m) // 2])):
            for name, m in mods:
                if name.rsplit(".", 1)[-1] in names:
                    if isinstance(m, nn.ModuleList):
                        if not len(m):
                            continue
                        m = pick(m)
                    return m
        return None

    def features(self, x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
        """[B, F]: the network's activations at its middle (``feature_module``) for input x at noise level σ, the
        rest of the network not run. A distance in them is a perceptual distance in the model's own terms (the
        learned Plan's ``--features`` term); taken with the unconditional input where the denoiser has one, so
        they describe the image, not the prompt or class."""
        mod = self.feature_module()
        if mod is None:
            raise ValueError(f"{type(self).__name__}: its network has no middle block to take features from "
                             f"(looked for {', '.join(self.FEATURE_MODULES + self.FEATURE_BLOCK_LISTS)})")
        if cond is not None and self.has_null_cond():
            try:
                cond = self.null_cond(cond)
            except ValueError:  # e.g. a pipeline batch without negative inputs: its own conditioning
                pass
        got = []

        def hook(_m, _inp, out):
            got.append(out)
            raise _FeaturesTaken

        handle = mod.register_forward_hook(hook)
        try:
            _, _, c_in, t = self.preconditioning(sigma, x.ndim, x.dtype)
            self.run_model(x * c_in, t, cond)
        except _FeaturesTaken:
            pass
        finally:
            handle.remove()
        if not got:
            raise ValueError(f"{type(self).__name__}: the forward pass did not reach {type(mod).__name__}")
        outs = got[0] if isinstance(got[0], (tuple, list)) else (got[0],)
        n = x.shape[0]
        feats = [o.reshape(n, -1) for o in outs if isinstance(o, torch.Tensor) and o.shape[:1] == (n,)]
        if not feats:
            raise ValueError(f"{type(self).__name__}: {type(mod).__name__} gave no tensor with the batch's {n} rows")
        return torch.cat(feats, 1)

    # --- the denoiser ------------------------------------------------------------------
    def preconditioning(self, sigma: torch.Tensor, ndim: int, dtype: torch.dtype):
        """σ [B] → (c_skip, c_out, c_in) shaped [B, 1, …] (``ndim`` dims) in ``dtype``, and t [B] in float64.
        σ maths runs in float64 (never in fp16); the one place every path takes it from."""
        sig = sigma.to(torch.float64)
        c = self.get_scalings(sig.reshape(-1, *([1] * (ndim - 1))))
        return (*(v.to(dtype) for v in c), self.sigma_to_t(sig))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond=None, guidance: float | None = None):
        if self.guidance_mode == GUIDANCE_INPUT:
            return self._denoise(x, sigma, (cond, guidance))
        if guidance_applies(cond, guidance):
            return self._guided(x, sigma, cond, guidance)
        return self._denoise(x, sigma, cond)

    def _denoise(self, x, sigma, cond):
        c_skip, c_out, c_in, t = self.preconditioning(sigma, x.ndim, x.dtype)
        f = self.run_model(x * c_in, t, cond)
        return c_skip * x + c_out * f.to(x.dtype)

    def _guided(self, x, sigma, cond, w):
        """CFG as one batched call over [unconditional; conditional]."""
        n = x.shape[0]
        with self.shared_rows(n):
            both = self._denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(self.null_cond(cond), cond))
        return cfg_combine(both[:n], both[n:], w)

    @contextmanager
    def shared_rows(self, n):
        """Within: a network call whose rows repeat with period ``n`` — classifier-free guidance's [uncond; cond]
        halves, one x and one σ — runs the network's ``cfg_prefix()`` modules (those before the conditioning first
        enters) on the first n rows only, and copies their output to every row. The other rows would compute
        the same values, so the result is the batched call's; the prefix's FLOPs are paid once, not twice.
        ``n`` may be a traced size: the rows taken and copied follow the dynamic batch in an export."""
        prefix = getattr(self.model, "cfg_prefix", None)
        handles = []
        try:
            for m in prefix() if callable(prefix) else ():
                handles += _first_rows(m, n)
            yield
        finally:
            for h in handles:
                h.remove()


def _first_rows(module: nn.Module, n):
    """Hooks that run ``module`` on the first n rows of its batch inputs and give its output for all of them
    (row r is row r mod n)."""
    rows = []

    def pre(_m, args, kwargs):
        r = next((a.shape[0] for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim()), None)
        rows.append(r)
        if r is None:
            return None

        def cut(a):
            return a[:n] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == r else a

        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

    def post(_m, _args, out):
        r = rows.pop()
        return out if r is None else out.index_select(0, torch.arange(r, device=out.device) % n)

    return [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]


class _FeaturesTaken(Exception):
    """Raised by ``Denoiser.features``' hook: the features are taken, the rest of the network need not run."""


def cat_cond(a, b):
    """Concatenate two conditionings along the batch (tensors, or dicts of them, nested)."""
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    raise TypeError(f"cannot batch conditioning of type {type(a).__name__}")


def null_like(value, cond):
    """The null conditioning ``value`` shaped like ``cond``.

    A number fills a label tensor (a class label reserved for "no class"); a tensor (e.g.
    the empty-prompt embedding, [1, seq, dim] or [seq, dim]) is broadcast over the batch;
    dicts recurse key by key.
    """
    if isinstance(cond, dict):
        if not isinstance(value, dict):
            raise TypeError("null conditioning for a dict conditioning must be a dict with the same keys")
        return {k: null_like(value[k], c) for k, c in cond.items()}
    if isinstance(value, torch.Tensor):
        return value.to(cond.device, cond.dtype).expand_as(cond)
    return torch.full_like(cond, value)


class _NullCondMixin:
    """``null_cond`` from a stored value (``null_cond_value``); None means no CFG."""

    null_cond_value = None

    def has_null_cond(self) -> bool:
        return self.null_cond_value is not None

    def null_cond(self, cond):
        if self.null_cond_value is None:
            return Denoiser.null_cond(self, cond)
        return null_like(self.null_cond_value, cond)


class EDMDenoiser(Denoiser):
    """Karras et al. (2022) Table 1 preconditioning; c_noise = t = ¼ ln σ."""

    def __init__(self, model, sigma_data: float = 0.5, sigma_min=0.002, sigma_max=80.0, null_label=None):
        super().__init__(model)
        self.sigma_data, self.sigma_min, self.sigma_max = sigma_data, sigma_min, sigma_max
        self.null_label = null_label

    def get_scalings(self, sigma):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        return c_skip, c_out, c_in

    def sigma_to_t(self, sigma):
        return sigma.log() / 4

    def has_null_cond(self) -> bool:
        return self.null_label is not None

    def null_cond(self, cond):
        if self.null_label is None:
            return super().null_cond(cond)
        return null_like(self.null_label, cond)


class DiscreteVPDenoiser(_NullCondMixin, Denoiser):
    """A model trained on a discrete VP table ``alphas_cumprod`` (DDPM / Stable Diffusion).

    σ_t = sqrt((1−ᾱ_t)/ᾱ_t); σ → t by linear interpolation in log σ between table entries
    (k-diffusion's DiscreteSchedule), so grid σ's map to the integer timesteps diffusers
    passes and σ's between them to fractional ones; σ outside the table is clamped to its
    ends. Subclasses pick what the network predicts (``prediction``, diffusers' names).
    """

    prediction = "epsilon"

    def __init__(self, model, alphas_cumprod: Sequence[float] | torch.Tensor, null_cond_value=None):
        super().__init__(model)
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
        sigmas = ((1 - ac) / ac).sqrt()
        if ac.numel() < 2 or not torch.all(torch.isfinite(sigmas)) or not torch.all(sigmas > 0) \
                or not torch.all(sigmas[1:] > sigmas[:-1]):
            raise ValueError("alphas_cumprod must have ≥ 2 entries, strictly decreasing inside (0, 1)")
        # A plain attribute, not a buffer: Module.to(float16) would otherwise round the table.
        self.log_sigmas = sigmas.log()
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])
        self.null_cond_value = null_cond_value

    @property
    def num_timesteps(self) -> int:
        return self.log_sigmas.numel()

    def _table(self, device):
        if self.log_sigmas.device != device:
            self.log_sigmas = self.log_sigmas.to(device)
        return self.log_sigmas

    def sigma_to_t(self, sigma):
        ls = self._table(sigma.device)
        # Clamp in log space so a grid σ keeps its exact log (bit-equal to the table entry). The bracketing
        # index is searchsorted's (left side) written as a count, which traces into ONNX opset 17.
        log_sigma = sigma.to(torch.float64).log().clamp(ls[0], ls[-1])
        idx = (ls < log_sigma.reshape(-1, 1)).sum(1).reshape(log_sigma.shape).clamp(1, len(ls) - 1)
        lo, hi = ls[idx - 1], ls[idx]
        frac = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return (idx - 1).to(torch.float64) + frac

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        ls = self._table(t.device)
        t = t.to(torch.float64).clamp(0, len(ls) - 1)
        lo = t.floor().long().clamp(max=len(ls) - 2)
        w = t - lo
        return ((1 - w) * ls[lo] + w * ls[lo + 1]).exp()

    def get_scalings(self, sigma):
        return PREDICTION_SCALINGS[self.prediction](sigma)


def _eps_scalings(sigma):
    # x_t = x_σ/√(1+σ²), x0 = x_σ − σ·ε
    return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt()


def _v_scalings(sigma):
    # v = α·ε − s·x0 with α = 1/√(1+σ²), s = σ·α, so x0 = α·x_t − s·v = x_σ/(1+σ²) − s·v
    c_in = 1 / (sigma**2 + 1).sqrt()
    return 1 / (sigma**2 + 1), -sigma * c_in, c_in


def _x0_scalings(sigma):
    return torch.zeros_like(sigma), torch.ones_like(sigma), 1 / (sigma**2 + 1).sqrt()


PREDICTION_SCALINGS = {"epsilon": _eps_scalings, "v_prediction": _v_scalings, "sample": _x0_scalings}


class VPEpsDenoiser(DiscreteVPDenoiser):
    """ε-prediction: D = x − σ·ε̂(x/√(σ²+1), t)."""

    prediction = "epsilon"


class VPVDenoiser(DiscreteVPDenoiser):
    """v-prediction (Salimans & Ho 2022): D = x/(σ²+1) − σ/√(σ²+1)·v̂."""

    prediction = "v_prediction"


class VPX0Denoiser(DiscreteVPDenoiser):
    """x0-prediction: D = x̂0 (the network sees the VP-scaled input)."""

    prediction = "sample"


VP_DENOISERS = {"epsilon": VPEpsDenoiser, "v_prediction": VPVDenoiser, "sample": VPX0Denoiser}


class FlowDenoiser(_NullCondMixin, Denoiser):
    """Rectified flow / flow matching: x_t = (1−t)·x0 + t·z, the network predicts v = z − x0.

    σ = t/(1−t), so x_t = x_σ/(1+σ) and x0 = x_t − t·v. ``t_scale`` maps t ∈ [0, 1] to the
    model's time input (diffusers' FlowMatchEulerDiscreteScheduler passes t·num_train_timesteps).
    """

    def __init__(self, model, t_scale: float = 1.0, sigma_min=0.002, sigma_max=80.0, null_cond_value=None):
        super().__init__(model)
        self.t_scale, self.sigma_min, self.sigma_max = t_scale, sigma_min, sigma_max
        self.null_cond_value = null_cond_value

    def get_scalings(self, sigma):
        c_in = 1 / (1 + sigma)
        return c_in, -sigma / (1 + sigma), c_in

    def sigma_to_t(self, sigma):
        return sigma / (1 + sigma) * self.t_scale
