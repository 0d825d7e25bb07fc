"""Text-to-image latent pipelines in diffusers' format (a folder with ``model_index.json``) as fewstep models.

One adapter per family, each on the ordinary denoiser interface (the Plan stays blind to all of it):

- ``sd``: Stable Diffusion 1.x / 2.x — ``UNet2DConditionModel`` + one CLIP text encoder; ε or v prediction
  (the scheduler config says which). Conditioning: ``encoder_hidden_states`` [77, D].
- ``sdxl``: SDXL — the UNet's ``text_time`` added conditioning + two CLIP encoders. Conditioning:
  ``encoder_hidden_states`` [77, D1 + D2] (both encoders' penultimate layers), ``text_embeds`` [P] (the
  second encoder's pooled projection) and ``time_ids`` [6] (original size, crop corner, target size).
- ``sd3``: Stable Diffusion 3 — ``SD3Transformer2DModel`` on rectified flow (FlowMatchEulerDiscreteScheduler,
  ``FlowDenoiser``). Conditioning: ``encoder_hidden_states`` [77 + T, J] (two CLIP encoders padded to the
  T5 width, then T5's tokens — zeros when the folder has no T5) and ``pooled_projections`` [P].
  SD3 rather than Flux: it uses plain classifier-free guidance over (cond, uncond) like SD / SDXL, so the
  engine's CFG is the same one batched call, and its latents are unpacked [C, h, w] images (Flux packs
  2×2 patches into a token sequence and takes guidance as a distilled input).

Conditioning is a dict of named tensors [N, …] (``NamedCond``) under the diffusers keyword names; the
unconditional half of classifier-free guidance reads the same names prefixed ``negative_`` (the negative /
empty-prompt encodings), so an engine takes them as inputs of their own. Text encoders (transformers) and the
VAE are loaded only when prompts are encoded or latents decoded.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import FewstepError
from . import denoisers as _d
from .files import one_line
from .folder_check import check_component

NEG = "negative_"
FAMILIES = ("sd", "sdxl", "sd3")
MAX_PROMPTS = 4096
MAX_PROMPT_CHARS = 10_000


class PipelineError(FewstepError):
    """A pipeline folder or a conditioning input fewstep cannot use (one line, exit 2)."""


class NamedCond(dict):
    """Named conditioning tensors, all [N, …]. Indexing with a name gives a tensor; with anything else (a slice,
    an index tensor) every tensor is indexed along the batch, so code written for label tensors slices it."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return NamedCond({k: v[key] for k, v in self.items()})

    @property
    def batch(self) -> int:
        return next(iter(self.values())).shape[0]


@dataclass(frozen=True)
class CondInput:
    """One named conditioning input: per-sample shape and dtype (the engine's input is [batch, *shape])."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def spec(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


# --- the denoiser --------------------------------------------------------------------------------
class _NegativesMixin:
    """Classifier-free guidance whose unconditional input is the ``negative_<name>`` tensors of the cond."""

    def has_null_cond(self) -> bool:
        return True

    def null_cond(self, cond):
        if not isinstance(cond, Mapping):
            raise ValueError("a pipeline's conditioning is a dict of named tensors")
        names = [k for k in cond if not k.startswith(NEG)]
        missing = [NEG + k for k in names if NEG + k not in cond]
        if missing:
            raise ValueError(f"classifier-free guidance needs the unconditional inputs {', '.join(missing)} "
                             f"(a negative prompt, or those names in --embeddings)")
        return NamedCond({k: cond[NEG + k] for k in names})


def _with_negatives(cls):
    return type(f"Pipeline{cls.__name__}", (_NegativesMixin, cls), {"__module__": __name__})


PIPELINE_DENOISERS = {cls: _with_negatives(cls) for cls in (*_d.VP_DENOISERS.values(), _d.FlowDenoiser,
                                                            _d.EDMDenoiser)}
globals().update({c.__name__: c for c in PIPELINE_DENOISERS.values()})  # importable by name (pickle, deepcopy)
for _c in PIPELINE_DENOISERS.values():
    _c.__qualname__ = _c.__name__


class PipelineNet(nn.Module):
    """F(x_in, t, cond) over the pipeline's backbone, with the named conditioning as its keyword arguments."""

    def __init__(self, backbone: nn.Module, family: str):
        super().__init__()
        self.backbone, self.family = backbone, family

    def cfg_prefix(self) -> list[nn.Module]:
        from .diffusers_adapter import unet_cfg_prefix

        return unet_cfg_prefix(self.backbone)

    def forward(self, x_in, t, cond):
        if not isinstance(cond, Mapping):
            raise ValueError(f"the {self.family} pipeline takes named conditioning (--prompt or --embeddings)")
        dt = self.backbone.dtype
        c = {k: v.to(dt) for k, v in cond.items() if not k.startswith(NEG)}
        t = t.to(torch.float32).expand(x_in.shape[0])
        x = x_in.to(dt)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():  # export / compile errors keep their own
            return self._call(x, t, c)
        try:
            return self._call(x, t, c)
        except (TypeError, AttributeError, KeyError, IndexError, ValueError, ZeroDivisionError) as exc:
            # a config field the constructor took but the forward cannot use (a dict for freq_shift) fails only
            # here; torch's own RuntimeErrors stay what they were
            if isinstance(exc, FewstepError):
                raise
            raise PipelineError(f"the {type(self.backbone).__name__} of this pipeline fails on its inputs "
                                f"({type(exc).__name__}: {one_line(exc, 200)})") from None

    def _call(self, x, t, c):
        if self.family == "sd3":
            return self.backbone(hidden_states=x, timestep=t, encoder_hidden_states=c["encoder_hidden_states"],
                                 pooled_projections=c["pooled_projections"], return_dict=False)[0]
        kw = {}
        if self.family == "sdxl":
            kw["added_cond_kwargs"] = {"text_embeds": c["text_embeds"], "time_ids": c["time_ids"]}
        return self.backbone(x, t, encoder_hidden_states=c["encoder_hidden_states"], return_dict=False, **kw)[0]


class Decoder(nn.Module):
    """Latents → pixels in [−1, 1] (unclamped) through the pipeline's VAE: z / scaling_factor + shift_factor."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        from .diffusers_adapter import config_number

        where = f"{getattr(vae.config, '_name_or_path', None) or 'vae'}/config.json"  # the folder (from_pretrained)
        cfg = dict(vae.config)
        if cfg.get("shift_factor") is None:  # SD / SDXL VAEs have none (null): no shift
            cfg["shift_factor"] = 0.0
        try:
            self.scaling = config_number(cfg, "scaling_factor", None, lambda v: 0 < v < math.inf,
                                         "a positive number", where)
            self.shift = config_number(cfg, "shift_factor", 0.0, math.isfinite, "a finite number", where)
        except ValueError as exc:
            raise PipelineError(str(exc)) from None

    def forward(self, latents):
        z = latents.to(self.vae.dtype) / self.scaling + self.shift
        return self.vae.decode(z, return_dict=False)[0].to(latents.dtype)


# --- the folder -----------------------------------------------------------------------------------
def _read_json(path, what):
    from .files import load_json

    cfg = load_json(path, what, 1 << 20, foreign=True)  # diffusers / transformers wrote it
    if not isinstance(cfg, dict):
        raise PipelineError(f"{path}: expected a JSON object")
    return cfg


@dataclass
class Pipeline:
    """What fewstep reads from a pipeline folder; the heavy parts (text encoders, VAE) are loaded on first use."""

    root: str
    family: str
    index: dict
    backbone: nn.Module
    scheduler_config: dict
    cond_inputs: tuple[CondInput, ...]
    sample_shape: tuple[int, int, int]
    _encoders: list | None = field(default=None, repr=False)
    _decoder: nn.Module | None = field(default=None, repr=False)

    @property
    def vae_scale(self) -> int:
        p = os.path.join(self.root, "vae", "config.json")
        if not os.path.isfile(p):
            return 8
        return 2 ** (len(_read_json(p, "vae config").get("block_out_channels", [0] * 4)) - 1)

    def component(self, name: str):
        """A component named in model_index.json, loaded from its subfolder (never the network); None if absent."""
        ent = self.index.get(name)
        if not isinstance(ent, list) or len(ent) != 2 or ent[1] is None:
            return None
        lib, cls = ent
        sub = os.path.join(self.root, name)
        if not os.path.isdir(sub):
            raise PipelineError(f"{self.root}: model_index.json names {name} but there is no {name}/ folder")
        if lib == "transformers":
            try:
                import transformers
            except ImportError:
                raise PipelineError("prompts need the transformers package (the pipeline's text encoders): "
                                    "pip install 'fewstep[pipelines]', or pass --embeddings FILE") from None
            transformers.utils.logging.disable_progress_bar()  # weight-loading bars would break one-line stderr
            mod = transformers
        elif lib == "diffusers":
            import diffusers as mod
        else:
            raise PipelineError(f"{self.root}: component {name} is from {lib!r}; diffusers/transformers expected")
        if not hasattr(mod, cls):
            raise PipelineError(f"{self.root}: component {name} is a {cls}, which {lib} does not have")
        kw = {"low_cpu_mem_usage": False} if lib == "diffusers" else {}  # no "install accelerate" warning
        cls = getattr(mod, cls)
        quiet = lib == "transformers" and transformers.utils.logging.get_verbosity()
        try:
            if quiet:  # its config warnings and load reports are many lines; fewstep says what is wrong in one
                transformers.utils.logging.set_verbosity_error()
            with _foreign(f"{sub}: cannot load the {getattr(cls, '__name__', cls)}"):
                if isinstance(cls, type) and issubclass(cls, nn.Module):  # not the tokenizers
                    check_component(sub, cls, lib)
                obj = cls.from_pretrained(sub, local_files_only=True, **kw)
        finally:
            if quiet:
                transformers.utils.logging.set_verbosity(quiet)
        return obj.eval() if isinstance(obj, nn.Module) else obj

    # --- text → embeddings
    def encoders(self):
        if self._encoders is None:
            names = {"sd": [("tokenizer", "text_encoder")],
                     "sdxl": [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")],
                     "sd3": [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"),
                             ("tokenizer_3", "text_encoder_3")]}[self.family]
            encs = []
            for tok, enc in names:
                t, e = self.component(tok), self.component(enc)
                if (t is None or e is None) and not (self.family == "sd3" and tok == "tokenizer_3"):
                    raise PipelineError(f"{self.root}: no {tok}/{enc}: pass --embeddings FILE instead of prompts")
                encs.append((t, e))
            self._encoders = encs
        return self._encoders

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompts → the named conditioning (float32, [len(prompts), …]), as diffusers' pipeline encodes them."""
        encs = self.encoders()
        with _foreign(f"{self.root}: its tokenizers and text encoders cannot encode the prompts"):
            return self._encode(encs, list(prompts))

    def _encode(self, encs, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.family == "sd":
            (tok, enc), = encs
            ids = _tokens(tok, prompts)
            mask = None
            if getattr(enc.config, "use_attention_mask", False):
                mask = _tokens(tok, prompts, "attention_mask")
            out = {"encoder_hidden_states": enc(ids, attention_mask=mask)[0]}
        elif self.family == "sdxl":
            hidden, pooled = [], None
            for tok, enc in encs:
                o = enc(_tokens(tok, prompts), output_hidden_states=True)
                if o[0].ndim == 2:  # the projection encoder's pooled output
                    pooled = o[0]
                hidden.append(o.hidden_states[-2])
            h, w = self.sample_shape[1] * self.vae_scale, self.sample_shape[2] * self.vae_scale
            ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(len(prompts), 6)
            out = {"encoder_hidden_states": torch.cat(hidden, -1), "text_embeds": pooled, "time_ids": ids}
        else:
            hidden, pooled = [], []
            for tok, enc in encs[:2]:
                o = enc(_tokens(tok, prompts), output_hidden_states=True)
                pooled.append(o[0])
                hidden.append(o.hidden_states[-2])
            clip = torch.cat(hidden, -1)
            spec = {c.name: c for c in self.cond_inputs}["encoder_hidden_states"]
            t5_len, width = spec.shape[0] - clip.shape[1], spec.shape[1]
            tok3, enc3 = encs[2]
            if enc3 is None:
                t5 = torch.zeros(len(prompts), t5_len, width)
            else:
                t5 = enc3(_tokens(tok3, prompts, max_length=t5_len))[0]
            clip = nn.functional.pad(clip, (0, width - clip.shape[-1]))
            out = {"encoder_hidden_states": torch.cat([clip, t5], -2), "pooled_projections": torch.cat(pooled, -1)}
        return {k: v.to(torch.float32).contiguous() for k, v in out.items()}

    def zero_negatives(self) -> bool:
        """SDXL's force_zeros_for_empty_prompt: no negative prompt means zero unconditional embeddings."""
        return self.family == "sdxl" and bool(self.index.get("force_zeros_for_empty_prompt", True))

    def decoder(self) -> nn.Module:
        if self._decoder is None:
            vae = self.component("vae")
            if vae is None:
                raise PipelineError(f"{self.root}: no vae in model_index.json: pass --latents")
            self._decoder = Decoder(vae).eval().requires_grad_(False)
        return self._decoder


@contextmanager
def _foreign(what: str):
    """A library call on the user's folder (loading a component, tokenising): its failure is bad input, one line
    naming ``what``, not an internal error."""
    try:
        yield
    except FewstepError:
        raise
    except Exception as exc:  # noqa: BLE001 — transformers / diffusers raise anything on a malformed folder
        raise PipelineError(f"{what} ({type(exc).__name__}: {one_line(exc, 200)})") from None


def _tokens(tok, prompts, key: str = "input_ids", max_length: int | None = None):
    return tok(prompts, padding="max_length", max_length=max_length or tok.model_max_length, truncation=True,
               return_tensors="pt")[key]


def _seq_len(root: str, tok: str, enc: str, default: int = 77) -> int:
    """The prompt length the tokenizer pads to (else the encoder's position count), which the encoder must hold."""
    got = {}
    for sub, file, key in ((tok, "tokenizer_config.json", "model_max_length"), (enc, "config.json",
                                                                                 "max_position_embeddings")):
        p = os.path.join(root, sub, file)
        if os.path.isfile(p):
            n = _read_json(p, f"{sub} config").get(key)
            if isinstance(n, int) and 0 < n < 1 << 20:  # Hugging Face writes int(1e30) for "no limit"
                got[sub] = n
    if tok in got and enc in got and got[tok] > got[enc]:
        raise PipelineError(f"{root}: {tok} pads prompts to {got[tok]} tokens (model_max_length) but {enc} holds "
                            f"{got[enc]} positions (max_position_embeddings)")
    return got.get(tok, got.get(enc, default))


def _family(index: dict, cfg: dict, backbone_cls: str) -> str:
    if backbone_cls == "SD3Transformer2DModel":
        return "sd3"
    if backbone_cls != "UNet2DConditionModel":
        raise PipelineError(f"pipeline backbone {backbone_cls} is not supported (SD 1.x/2.x, SDXL and SD3 are)")
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl"
    if cfg.get("addition_embed_type") is not None:
        raise PipelineError(f"UNet addition_embed_type {cfg['addition_embed_type']!r} is not supported")
    return "sd"


def _cond_inputs(root: str, family: str, cfg: dict) -> tuple[CondInput, ...]:
    seq = _seq_len(root, "tokenizer", "text_encoder")
    if family == "sd":
        return (CondInput("encoder_hidden_states", (seq, int(cfg["cross_attention_dim"]))),)
    if family == "sdxl":
        pooled = int(cfg["projection_class_embeddings_input_dim"]) - 6 * int(cfg["addition_time_embed_dim"])
        return (CondInput("encoder_hidden_states", (seq, int(cfg["cross_attention_dim"]))),
                CondInput("text_embeds", (pooled,)), CondInput("time_ids", (6,)))
    t5 = 256  # diffusers' SD3 max_sequence_length default
    return (CondInput("encoder_hidden_states", (seq + t5, int(cfg["joint_attention_dim"]))),
            CondInput("pooled_projections", (int(cfg["pooled_projection_dim"]),)))


def load_pipeline(path: str, torch_dtype: torch.dtype | None = None) -> Pipeline:
    """The backbone and scheduler of a local pipeline folder (model_index.json), never the network."""
    root = os.fspath(path)
    index = _read_json(os.path.join(root, "model_index.json"), "model_index.json")
    name = "transformer" if isinstance(index.get("transformer"), list) and index["transformer"][1] else "unet"
    ent = index.get(name)
    if not isinstance(ent, list) or len(ent) != 2 or not isinstance(ent[1], str):
        raise PipelineError(f"{root}/model_index.json names no unet or transformer")
    cfg_path = os.path.join(root, name, "config.json")
    if not os.path.isfile(cfg_path):
        raise PipelineError(f"{root}: no {name}/config.json")
    cfg = _read_json(cfg_path, f"{name} config")
    family = _family(index, cfg, ent[1])
    sched_path = os.path.join(root, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched_path):
        raise PipelineError(f"{root}: no scheduler/scheduler_config.json")
    sched = _read_json(sched_path, "scheduler config")
    try:
        import diffusers
    except ImportError:
        raise PipelineError("a pipeline folder needs the diffusers package: pip install 'fewstep[pipelines]'") \
            from None
    cls, sub = getattr(diffusers, ent[1]), os.path.join(root, name)
    size = cfg.get("sample_size", 64)
    hw = [size, size] if isinstance(size, int) else size
    shape = (cfg.get("in_channels"), *hw) if isinstance(hw, list) and len(hw) == 2 else ()
    if len(shape) != 3 or not all(type(v) is int and v > 0 for v in shape):
        raise PipelineError(f"{sub}/config.json: in_channels and sample_size must be positive integers "
                            f"(got {cfg.get('in_channels')!r}, {size!r})")
    check_component(sub, cls, "diffusers")
    backbone = cls.from_pretrained(sub, torch_dtype=torch_dtype, local_files_only=True, low_cpu_mem_usage=False)
    backbone = backbone.eval().requires_grad_(False)
    return Pipeline(root, family, index, backbone, sched, _cond_inputs(root, family, cfg), shape)


def pipeline_denoiser(pipe: Pipeline) -> _d.Denoiser:
    """The backbone as the denoiser its scheduler config says it was trained for, CFG over negative_* inputs."""
    from .diffusers_adapter import denoiser_for

    den = denoiser_for(PipelineNet(pipe.backbone, pipe.family), pipe.scheduler_config)
    den.__class__ = PIPELINE_DENOISERS[type(den)]
    return den


def content_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(v.dtype).encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


# --- conditioning from the command line ---------------------------------------------------------------
@dataclass
class CondSource:
    """What `--prompt` / `--negative-prompt` / `--embeddings` asked for; ``__call__(n)`` gives the [n, …] dict.

    Prompts: one for all samples, or one per sample (cycled when fewer than n: fitting batches draw them
    evenly, as digits draws classes). Negative prompts likewise; none means the empty prompt (SDXL: zeros,
    its force_zeros_for_empty_prompt). An embeddings file holds [N, …] or [1, …] tensors under the input names
    (``negative_<name>`` for the unconditional half).
    """

    pipe: Pipeline
    prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    embeddings: dict[str, torch.Tensor] | None = None

    @property
    def default_n(self) -> int | None:
        if self.embeddings is not None:
            return max(v.shape[0] for v in self.embeddings.values())
        return max(len(self.prompts), len(self.negative_prompts)) or None

    def describe(self) -> dict:
        """What the conditioning was (a fitted plan's provenance)."""
        if self.embeddings is not None:
            return {"embeddings": sorted(self.embeddings)}
        return {"prompts": list(self.prompts), "negative_prompts": list(self.negative_prompts)}

    def captions(self, n: int) -> list[str]:
        return [self.prompts[i % len(self.prompts)] for i in range(n)] if self.prompts else [""] * n

    def __call__(self, n: int) -> NamedCond:
        if self.embeddings is not None:
            out = {}
            for k, v in self.embeddings.items():
                if v.shape[0] not in (1, n):
                    raise PipelineError(f"--embeddings: {k} holds {v.shape[0]} rows; expected {n} (one per "
                                        f"sample) or 1 (for all)")
                out[k] = v.expand(n, *v.shape[1:]).contiguous()
            return NamedCond(out)
        for what, ps in (("--prompt", self.prompts), ("--negative-prompt", self.negative_prompts)):
            if len(ps) > n:
                raise PipelineError(f"{what}: {len(ps)} given for {n} samples (give one, or one per sample)")
        pos = _encode_cycled(self.pipe, self.prompts, n)
        if self.negative_prompts or not self.pipe.zero_negatives():
            neg = _encode_cycled(self.pipe, self.negative_prompts or ("",), n)
        else:
            neg = {k: torch.zeros_like(v) for k, v in pos.items()}
            if "time_ids" in pos:
                neg["time_ids"] = pos["time_ids"].clone()  # SDXL's negative time ids are the same sizes
        return NamedCond({**pos, **{NEG + k: v for k, v in neg.items()}})


def _encode_cycled(pipe: Pipeline, prompts, n: int) -> dict[str, torch.Tensor]:
    uniq = list(dict.fromkeys(prompts))
    enc = pipe.encode(uniq)
    idx = torch.tensor([uniq.index(prompts[i % len(prompts)]) for i in range(n)])
    return {k: v[idx] for k, v in enc.items()}


def check_prompts(prompts) -> tuple[str, ...]:
    prompts = tuple(prompts or ())
    if len(prompts) > MAX_PROMPTS:
        raise PipelineError(f"{len(prompts)} prompts: at most {MAX_PROMPTS}")
    for p in prompts:
        if len(p) > MAX_PROMPT_CHARS:
            raise PipelineError(f"a prompt of {len(p):,} characters: at most {MAX_PROMPT_CHARS:,}")
    return prompts


MAX_EMBEDDING_BYTES = 1 << 30
MAX_EMBEDDING_HEADER = 1 << 20
ST_DTYPES = {"F32": ("float32", torch.float32, 4), "F16": ("float16", torch.float16, 2),
             "BF16": ("bfloat16", torch.bfloat16, 2), "F64": ("float64", torch.float64, 8)}


def read_embeddings(path: str, inputs: Sequence[CondInput], max_elements: int) -> dict[str, torch.Tensor]:
    """A safetensors file of named conditioning tensors, checked before it is trusted: a regular file ≤ 1 GiB,
    a bounded strict-JSON header whose byte ranges lie in the file without sharing bytes, only the model's input
    names (and their ``negative_`` twins), shapes [N or 1, *shape], float dtypes (cast to float32), finite values."""
    from .files import check_regular, read_span, safetensors_header

    size = check_regular(path, "embeddings file")
    if size > MAX_EMBEDDING_BYTES:
        raise PipelineError(f"--embeddings {path}: {size:,} bytes; at most {MAX_EMBEDDING_BYTES:,}")
    specs = {c.name: c for c in inputs}
    specs.update({NEG + c.name: c for c in inputs})
    try:
        with open(path, "rb") as f:
            header = safetensors_header(f, size, f"--embeddings {path}", MAX_EMBEDDING_HEADER, PipelineError)
            total = 0
            for name, (dtype, shape, _, _) in header.items():  # every entry, before any data is read
                if name not in specs:
                    raise PipelineError(f"--embeddings {path}: unknown tensor {name!r}; this model takes "
                                        f"{', '.join(specs)}")
                if dtype not in ST_DTYPES:
                    raise PipelineError(f"--embeddings {path}: {name} is {dtype}; float tensors only "
                                        f"({', '.join(ST_DTYPES)})")
                want = specs[name].shape
                if len(shape) != len(want) + 1 or shape[1:] != want or shape[0] < 1:
                    raise PipelineError(f"--embeddings {path}: {name} has shape {list(shape)}; "
                                        f"expected [N, {', '.join(map(str, want))}]")
                total += math.prod(shape)
                if total > max_elements:
                    raise PipelineError(f"--embeddings {path}: more than {max_elements:,} values")
            out = {}
            for name, (dtype, shape, lo, hi) in header.items():
                buf = read_span(f, lo, hi, f"--embeddings {path}", PipelineError)
                t = torch.frombuffer(buf, dtype=ST_DTYPES[dtype][1]).reshape(shape).to(torch.float32)
                if not torch.isfinite(t).all():
                    raise PipelineError(f"--embeddings {path}: {name} contains NaN or inf")
                out[name] = t
    except OSError as exc:
        raise PipelineError(f"--embeddings {path}: {exc.strerror}") from None
    missing = [c.name for c in inputs if c.name not in out]
    if missing:
        raise PipelineError(f"--embeddings {path}: missing {', '.join(missing)}")
    rows = {v.shape[0] for v in out.values()} - {1}
    if len(rows) > 1:
        raise PipelineError(f"--embeddings {path}: tensors hold different numbers of rows {sorted(rows)}")
    return out


def save_embeddings(path: str, cond: Mapping[str, torch.Tensor]) -> None:
    """Write named conditioning as the safetensors file --embeddings reads (atomically)."""
    from safetensors.torch import save

    from .plan import atomic_write_bytes

    atomic_write_bytes(path, save({k: v.detach().to(torch.float32).contiguous() for k, v in cond.items()}))
