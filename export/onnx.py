"""Export a Plan + denoiser as one ONNX graph (DESIGN §7; the contract in docs shared with the C++ runtime).

The sampler graph is the reference executor's loop unrolled by tracing: E evaluations sharing
one set of weights, every Plan coefficient a constant. σ is a per-row constant, so the
denoiser's σ maths (c_skip, c_out, c_in and the network's time input t) is done here in
float64, once per row, and baked as constants — the graph holds no float64 arithmetic for
scalings denoisers. Models whose denoiser is not a scalings adapter (the exact GMM) are traced
as they are, float64 ops included.

onnx is imported inside functions: ``fewstep.export.cli`` imports this module at CLI start and
must work where onnx is missing.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FewstepError
from ..runtime.denoisers import GUIDANCE_INPUT, cat_cond, cfg_combine, guidance_applies
from ..runtime.executor import run_rows
from ..runtime.plan import Plan, atomic_write_bytes
from .attention import ATTENTION_KINDS, fused_attention

FORMAT = "fewstep.engine/1"
OPSET = 17
# bfloat16 Conv / Cos / GroupNorm inputs are valid ONNX only from opset 22 on; fp32/fp16 stay at 17,
# which every ONNX Runtime and TensorRT release in use reads.
OPSET_BF16 = 22
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class ExportError(FewstepError):
    """An export that cannot be done as asked (plan/model mismatch, dtype, path)."""


def require_onnx():
    try:
        import onnx
    except ImportError:
        raise ExportError("the onnx package is not installed: pip install onnx (fewstep export needs it)") from None
    return onnx


def parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise ExportError(f"unsupported export dtype {dtype}; choose one of fp32, fp16, bf16")
        return dtype
    key = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "half": "fp16"}.get(dtype, dtype)
    if key not in DTYPES:
        raise ExportError(f"unsupported export dtype {dtype!r}; choose one of fp32, fp16, bf16")
    return DTYPES[key]


# --- what the model takes ------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    sample_shape: tuple[int, ...]
    num_classes: int | None  # class-conditional: labels 0..num_classes−1
    null_label: int | None  # the label meaning "no class" (classifier-free guidance), None: no CFG
    # Named conditioning inputs (name, per-sample shape, dtype) of a text pipeline, passed to the denoiser as a
    # dict; CFG's unconditional half then reads the same names prefixed "negative_" (inputs of their own).
    cond_inputs: tuple[tuple[str, tuple[int, ...], str], ...] = ()

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None or bool(self.cond_inputs)

    @property
    def guided(self) -> bool:
        return bool(self.cond_inputs) or (self.num_classes is not None and self.null_label is not None)

    def cond_names(self, cfg: bool) -> list[str]:
        """The conditioning inputs of a graph, in order; ``cfg``: the graph does classifier-free guidance."""
        if not self.cond_inputs:
            return ["class_labels"] if self.num_classes is not None else []
        names = [c[0] for c in self.cond_inputs]
        return names + ([NEGATIVE + n for n in names] if cfg else [])

    def cond_from(self, named: dict):
        """The denoiser's conditioning from the graph's named inputs: a dict, the class labels, or None."""
        if not self.cond_inputs:
            return named.get("class_labels")
        return {k: v for k, v in named.items() if k in set(self.cond_names(True))}


NEGATIVE = "negative_"  # the unconditional twin of a named conditioning input (runtime/pipelines.py)


def find_null_label(denoiser) -> int | None:
    """The null class label of a class-conditional denoiser, None when it has no CFG input."""
    if not denoiser.has_null_cond():
        return None
    try:
        v = denoiser.null_cond(torch.zeros(1, dtype=torch.long))
    except (ValueError, TypeError, NotImplementedError, AttributeError):
        return None
    if isinstance(v, torch.Tensor) and v.dtype == torch.long and v.numel() == 1:
        return int(v.reshape(-1)[0])
    return None


# --- the graphs as torch modules --------------------------------------------------------------------
class _Evaluator(nn.Module):
    """D(u; σ, cond[, w]) as plain torch ops, mirroring ``Denoiser.forward`` and ``executor.call_denoiser``."""

    def __init__(self, denoiser, info: ModelInfo, dtype: torch.dtype):
        super().__init__()
        self.den = denoiser
        self.info = info
        self.dtype = dtype
        self.baked = denoiser.preconditioned  # σ maths baked per row: only c_in·x, F, c_skip·x + c_out·F
        self.unit_rows = True  # W from the caller, every W = 1: B rows (see guided)

    def row_constants(self, sigma: float):
        """c_skip, c_out, c_in as 0-d tensors in the compute dtype (cast from float64 as the adapter does),
        and t(σ) as a float64 number (the network casts it, as it does in the executor)."""
        if not self.baked:
            return None
        *c, t = self.den.preconditioning(torch.tensor([sigma], dtype=torch.float64), 1, self.dtype)
        return tuple(v.reshape(-1)[0] for v in c), float(t.reshape(-1)[0])

    def plain(self, u, sigma: float | torch.Tensor, cond, consts):
        col = u.reshape(u.shape[0], -1)[:, 0]  # a [B] tensor whose length follows the dynamic batch
        if consts is None:
            # σ is an input (step graph) or D is closed form: the denoiser's own σ maths in the graph, float64
            sig = sigma if isinstance(sigma, torch.Tensor) else torch.full_like(col, sigma)
            return self.den._denoise(u, sig, cond)
        (c_skip, c_out, c_in), t = consts
        tt = torch.full_like(col, t, dtype=torch.float64)
        f = self.den.run_model(u * c_in, tt, cond)
        return c_skip * u + c_out * f.to(u.dtype)

    @property
    def cfg_combine(self) -> bool:
        """True when guidance is classifier-free guidance's two halves (2B rows per evaluation, where W = 1
        needs B); False for a model that takes W as a network input (a guidance-distilled student)."""
        return self.den.guidance_mode != GUIDANCE_INPUT

    def guided(self, u, sigma, cond, w, consts):
        """One batched call over [unconditional; conditional], D_u + w·(D_c − D_u); a model that takes
        the guidance scale as an input (a guidance-distilled student) gets w as a [B] input instead.

        With W from the caller (a tensor) and ``unit_rows``, a call whose every W is 1 runs only the B
        conditional rows, as the executor does: the rows are picked in the graph (no ``If``)."""
        n = u.shape[0]
        if not self.cfg_combine:
            col = u.reshape(n, -1)[:, 0]
            wv = w.reshape(-1).to(torch.float32) if isinstance(w, torch.Tensor) \
                else torch.full_like(col, w, dtype=torch.float32)
            return self.plain(u, sigma, (cond, wv), consts)
        # The denoiser's own unconditional input: the null label, or the negative_* inputs of a pipeline.
        sig2 = torch.cat([sigma, sigma]) if isinstance(sigma, torch.Tensor) else sigma
        u2, cond2 = torch.cat([u, u]), cat_cond(self.den.null_cond(cond), cond)
        if not (self.unit_rows and isinstance(w, torch.Tensor)):
            with self.den.shared_rows(n):
                both = self.plain(u2, sig2, cond2, consts)
            return cfg_combine(both[:n], both[n:], w)
        # Rows first..2B-1 of [uncond; cond], first = B when every W is 1 (the conditional half only), else 0.
        # An `If` on W did this before at a fixed 2–8 ms per call at batch 1 in ONNX Runtime (a subgraph's
        # per-run set-up) and stored the weights twice; a row index costs one Range and a few Gathers.
        # Every row of the network computes what it would alone, so at W = 1 D_u and D_c below are the same
        # rows and D_u + 1·(D_c − D_u) is D_c exactly: the executor's B-row result.
        first = n * (w == 1).all().to(torch.int64)
        idx = torch.arange(first, 2 * n)  # traces to an ONNX Range on the dynamic batch
        with self.den.shared_rows(n):  # row p of the rows taken is u's row p mod n, whatever first is
            out = self.plain(u2.index_select(0, idx), sig2.index_select(0, idx) if isinstance(sig2, torch.Tensor)
                             else sig2, take_rows(cond2, idx), consts)
        d_c = out.index_select(0, torch.arange(n - first, 2 * n - first))  # the last B rows
        return cfg_combine(out[:n], d_c, w)


def take_rows(cond, idx):
    """Rows ``idx`` of a conditioning (a tensor, or dicts of them, nested; None stays None)."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.index_select(0, idx)
    if isinstance(cond, dict):
        return {k: take_rows(v, idx) for k, v in cond.items()}
    raise TypeError(f"cannot select rows of conditioning of type {type(cond).__name__}")


def plan_takes_guidance(plan: Plan) -> bool:
    """True when some row reads W from the caller (``guidance`` None); rows that fix W never do."""
    return any(r.guidance is None for r in plan.rows)


def plan_fixes_cfg(plan: Plan) -> bool:
    """True when some row fixes a W ≠ 1 of its own (CFG in the graph whatever the inputs)."""
    return any(r.guidance is not None and r.guidance != 1.0 for r in plan.rows)


class SamplerGraph(nn.Module):
    """The Plan unrolled: forward(z[, noise][, conditioning…][, guidance]) → sample (float32 interface).

    Conditioning: class_labels, or a pipeline's named inputs (and their negative_* twins when the graph does
    CFG). ``decoder`` (latents → pixels, a pipeline's VAE) is appended: the output is then the image.
    Rows that read W from the input run the plain conditional model (B rows) when every W is 1, as the
    executor does (``_Evaluator.guided``).
    """

    def __init__(self, denoiser, plan: Plan, info: ModelInfo, dtype: torch.dtype = torch.float32,
                 guidance_input: bool | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.plan, self.info, self.dtype = plan, info, dtype
        self.ev = _Evaluator(denoiser, info, dtype)
        self.decoder = decoder
        if decoder is not None:
            with torch.no_grad():  # what the decoder makes of one latent: the engine's output shape
                self.decoded_shape = tuple(decoder(torch.zeros(1, *info.sample_shape, dtype=dtype)).shape[1:])
        self.n_stochastic = len(plan.stochastic_rows)
        # A guidance input exists only where a row reads it: an input the trace never reads is dropped
        # from the ONNX graph, and the contract must list exactly the graph's inputs.
        self.guidance_input = info.guided and plan_takes_guidance(plan) if guidance_input is None else guidance_input
        self.consts = [self.ev.row_constants(r.sigma) for r in plan.rows]
        cfg = info.guided and (bool(self.guidance_input) or plan_fixes_cfg(plan))
        self.input_names = ["z"] + (["noise"] if self.n_stochastic else []) + info.cond_names(cfg) \
            + (["guidance"] if self.guidance_input else [])

    def forward(self, *inputs):
        named = dict(zip(self.input_names, inputs))
        dt = self.dtype
        z = named["z"].to(dt)
        noise = named["noise"].to(dt) if self.n_stochastic else None
        cond = self.info.cond_from(named)
        gw = named.get("guidance")
        if gw is not None:
            gw = gw.to(dt).reshape(-1, *([1] * (z.ndim - 1)))
        # The executor's own loop (runtime/executor.py), so the graph does the same ops in the same order.
        x = run_rows(self.plan, self.plan.sigma_init * z,
                     lambda e, row, u: self._evaluate(u, row, cond, gw, self.consts[e]), noise)
        if self.decoder is not None:
            x = self.decoder(x)
        return x.to(torch.float32)

    def _evaluate(self, u, row, cond, gw, consts):
        w = row.guidance if row.guidance is not None else gw  # a row's own W, else the graph's input
        if not guidance_applies(cond, w):
            return self.ev.plain(u, row.sigma, cond, consts)
        return self.ev.guided(u, row.sigma, cond, w, consts)


class StepGraph(nn.Module):
    """One evaluation: forward(x, sigma[, class_labels][, guidance]) → x0 (EDM convention, guidance inside)."""

    def __init__(self, denoiser, info: ModelInfo, dtype: torch.dtype = torch.float32,
                 guidance_input: bool | None = None):
        super().__init__()
        self.info, self.dtype = info, dtype
        self.ev = _Evaluator(denoiser, info, dtype)
        self.guidance_input = info.guided if guidance_input is None else guidance_input
        self.decoder = None
        self.input_names = ["x", "sigma"] + info.cond_names(bool(self.guidance_input)) \
            + (["guidance"] if self.guidance_input else [])

    def forward(self, *inputs):
        named = dict(zip(self.input_names, inputs))
        x = named["x"].to(self.dtype)
        sigma = named["sigma"]  # kept float32: the adapter does its σ maths in float64 and casts the scalings
        cond = self.info.cond_from(named)
        gw = named.get("guidance")
        if not guidance_applies(cond, gw):
            d = self.ev.plain(x, sigma, cond, None)
        else:
            d = self.ev.guided(x, sigma, cond, gw.to(self.dtype).reshape(-1, *([1] * (x.ndim - 1))), None)
        return d.to(torch.float32)


# --- the contract ------------------------------------------------------------------------------------
def _shape(batch, *rest):
    return [batch, *rest]


def contract_for(graph: nn.Module, kind: str, batch: int | None, plan: Plan | None, sigma_init: float) -> dict:
    info: ModelInfo = graph.info
    b = "batch" if batch is None else int(batch)
    ss = list(info.sample_shape)
    inputs = []
    for name in graph.input_names:
        if name in ("z", "x"):
            inputs.append({"name": name, "dtype": "float32", "shape": _shape(b, *ss)})
        elif name == "noise":
            inputs.append({"name": name, "dtype": "float32", "shape": [graph.n_stochastic, b, *ss]})
        elif name == "sigma" or name == "guidance":
            inputs.append({"name": name, "dtype": "float32", "shape": [b]})
        elif name == "class_labels":
            inputs.append({"name": name, "dtype": "int64", "shape": [b]})
        else:  # a named conditioning input (or its negative_ twin): [batch, *its shape]
            spec = {c[0]: c for c in info.cond_inputs}[name[len(NEGATIVE):] if name.startswith(NEGATIVE) else name]
            inputs.append({"name": name, "dtype": spec[2], "shape": [b, *spec[1]]})
    out_name = "sample" if kind == "sampler" else "x0"
    out_shape = _shape(b, *ss)
    if getattr(graph, "decoder", None) is not None:
        out_name, out_shape = "image", _shape(b, *graph.decoded_shape)
    return {
        "inputs": inputs,
        "outputs": [{"name": out_name, "dtype": "float32", "shape": out_shape}],
        "sample_shape": ss,
        "nfe": plan.nfe if (plan is not None and kind == "sampler") else 1,
        "n_stochastic": len(plan.stochastic_rows) if (plan is not None and kind == "sampler") else 0,
        "sigma_init": float(sigma_init),
        "num_classes": info.num_classes,
        "null_label": info.null_label if info.guided else None,
        "guidance_input": bool(graph.guidance_input),
        "compute_dtype": DTYPE_NAMES[graph.dtype],
    }


def example_inputs(contract: dict, batch: int, seed: int = 0, guidance: float = 1.5) -> dict:
    """Inputs for one run, drawn from fewstep's Philox generator as the contract's "Noise" section says:
    z = stream 0, noise slice j = stream 1 + j; class labels i mod num_classes; σ (step graphs) log-spaced."""
    import numpy as np

    from ..runtime import noise as _noise

    shape = tuple(contract["sample_shape"])
    z, eps = _noise.draw(seed, batch, shape, contract["n_stochastic"])
    out = {}
    for spec in contract["inputs"]:
        name = spec["name"]
        if name == "z":
            out[name] = z
        elif name == "x":
            sig = _step_sigmas(batch, contract)
            out[name] = (z * sig.reshape(-1, *([1] * len(shape)))).astype(np.float32)
        elif name == "noise":
            out[name] = eps
        elif name == "sigma":
            out[name] = _step_sigmas(batch, contract)
        elif name == "class_labels":
            out[name] = (np.arange(batch) % contract["num_classes"]).astype(np.int64)
        elif name == "guidance":
            out[name] = np.full((batch,), guidance, np.float32)
        else:  # named conditioning: standard normal test values, one Philox stream per input after the noise's
            k = [s["name"] for s in contract["inputs"]].index(name)
            vals = _noise.randn(seed, batch, tuple(spec["shape"][1:]), 1 + contract["n_stochastic"] + k)
            out[name] = vals.astype(np.dtype(spec["dtype"]))
    return out


def _step_sigmas(batch: int, contract: dict):
    import numpy as np

    hi = contract.get("sigma_init") or 80.0
    return np.exp(np.linspace(math.log(0.002), math.log(hi), batch)).astype(np.float32)


# --- checks before anything is written ------------------------------------------------------------------
def check_out_path(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ExportError(f"--out {path}: is a directory, expected a file path")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ExportError(f"--out {path}: directory {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise ExportError(f"--out {path}: directory {d} is not writable")
    return path


def check_plan(plan: Plan, info: ModelInfo, teacher_hash: str | None, force: bool, guidance_input: bool) -> None:
    want = plan.provenance.get("teacher_hash")
    if want and teacher_hash and want != teacher_hash and not force:
        raise ExportError(f"plan {plan.name!r} was fitted for teacher {want[:19]}…, but the model is "
                          f"{teacher_hash[:19]}… (content hash); pass --force to export it anyway")
    for key in ("sample_shape", "shape"):
        if key in plan.provenance:
            got = tuple(plan.provenance[key])
            if got != tuple(info.sample_shape):
                raise ExportError(f"plan {plan.name!r} is for samples of shape {got}, the model's are "
                                  f"{tuple(info.sample_shape)}")
    guided_rows = [e for e, r in enumerate(plan.rows) if r.guidance is not None and r.guidance != 1.0]
    if guided_rows and not info.guided:
        what = "not class-conditional" if not info.conditional else "has no null label (no classifier-free guidance)"
        raise ExportError(f"plan {plan.name!r} sets guidance on row(s) {guided_rows}, but the model {what}")
    if guidance_input and not info.guided:
        raise ExportError("a guidance input was asked for, but the model has no classifier-free guidance")


def check_model_runs(graph: nn.Module, contract: dict) -> None:
    """One eager run at batch 2 with the contract's inputs: a model that does not take this shape
    (channels, resolution) fails here with a named error, before tracing or writing."""
    feeds = example_inputs(contract, 2)
    try:
        with torch.no_grad():
            out = graph(*[torch.from_numpy(feeds[s["name"]]) for s in contract["inputs"]])
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        raise ExportError(f"the model does not run on inputs of shape {contract['sample_shape']} "
                          f"(sample shape / channels mismatch?): {str(exc).splitlines()[0]}") from None
    want = contract["outputs"][0]["shape"][1:]
    if tuple(out.shape) != (2, *want):
        raise ExportError(f"the model maps samples of shape {contract['sample_shape']} to {tuple(out.shape[1:])}, "
                          f"expected {tuple(want)}")


# --- export -------------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: str
    seconds: float
    bytes: int
    contract: dict


def _prepare(denoiser, dtype):
    den = copy.deepcopy(denoiser)
    den.eval().requires_grad_(False)
    if dtype != torch.float32:
        if not den.preconditioned:
            raise ExportError(f"--dtype {DTYPE_NAMES[dtype]}: only network denoisers (scalings adapters) run in "
                              f"low precision; {type(den).__name__} is exported in float32 only")
        den.model.to(dtype)
    return den


def _prepare_decoder(decoder, dtype):
    if decoder is None:
        return None
    dec = copy.deepcopy(decoder).eval().requires_grad_(False)
    return dec.to(dtype)


# ONNX files are one protobuf, which cannot exceed 2 GiB: bigger models keep their weights in one external data
# file beside the .onnx (ONNX Runtime reads it from the model's directory). The margin leaves room for the
# graph itself and the metadata (the plan JSON) next to the weights.
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA_ABOVE = PROTOBUF_LIMIT - 64 * 2**20


def _param_bytes(*modules) -> int:
    seen, total = set(), 0
    for m in modules:
        if m is None:
            continue
        for t in [*m.parameters(), *m.buffers()]:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def export_onnx(denoiser, plan: Plan | None, path, *, sample_shape, num_classes: int | None = None,
                dtype="fp32", batch: int | None = None, step_graph: bool = False, teacher_hash: str | None = None,
                force: bool = False, guidance_input: bool | None = None, conditional: bool | None = None,
                extra_metadata: dict | None = None, unit_guidance_branch: bool = True,
                cond_inputs: list[dict] | None = None, decoder: nn.Module | None = None,
                external_data: bool | None = None, attention: str = "onnx") -> ExportResult:
    """Export ``plan`` over ``denoiser`` (or, with ``step_graph``, the denoiser alone) to ``path``.

    batch None = dynamic (dim_param "batch"), else that fixed batch. ``guidance_input`` /
    ``conditional`` None = what the model supports; True on a model that cannot → ExportError.
    A guidance input that feeds classifier-free guidance runs B rows for calls whose every W is 1 (rows picked
    in the graph, ``_Evaluator.guided``); ``unit_guidance_branch=False`` runs 2B rows at any W (the
    comparison benchmarks/guidance_branch.py measures).
    ``cond_inputs``: a pipeline's named conditioning inputs ({name, shape per sample, dtype}, ``Model.cond_inputs``);
    the engine takes them (and, with CFG, their ``negative_`` twins). ``decoder``: latents → pixels appended
    (the engine's output is then ``image``). ``external_data``: weights in ``<out>.data`` beside the .onnx
    (None: when the weights pass 2 GiB − 64 MiB, the protobuf limit less a margin). ``attention``: "onnx" (standard
    ops) or "ort" (diffusers attention layers as ONNX Runtime's fused MultiHeadAttention, ``attention.py``).
    Every check runs before the file is written; the file (and its data file) is written atomically.
    """
    onnx = require_onnx()
    dt = parse_dtype(dtype)
    if attention not in ATTENTION_KINDS:
        raise ExportError(f"--attention must be one of {', '.join(ATTENTION_KINDS)}, got {attention!r}")
    if attention == "ort" and dt == torch.bfloat16:
        raise ExportError("--attention ort: ONNX Runtime's MultiHeadAttention has no bfloat16 kernel (fp32 or fp16)")
    path = check_out_path(path)
    info = _check_request(denoiser, plan, sample_shape, num_classes, batch, step_graph, teacher_hash, force,
                          guidance_input, conditional, cond_inputs)
    if decoder is not None and step_graph:
        raise ExportError("--decode appends the VAE decoder to a sampler; a step graph returns x0 latents")
    den = _prepare(denoiser, dt)
    dec = _prepare_decoder(decoder, dt)
    if step_graph:
        graph, kind = StepGraph(den, info, dt, guidance_input), "step"
        sigma_init = plan.sigma_init if plan is not None else float(getattr(denoiser, "sigma_max", 80.0))
    else:
        graph, kind = SamplerGraph(den, plan, info, dt, guidance_input, dec), "sampler"
        sigma_init = plan.sigma_init
    contract = contract_for(graph, kind, batch, plan, sigma_init)
    check_model_runs(graph, contract)
    weights = _param_bytes(den, dec)
    external = weights > EXTERNAL_DATA_ABOVE if external_data is None else bool(external_data)

    t0 = time.perf_counter()
    with fused_attention(den, dec) if attention == "ort" else contextlib.nullcontext(0) as fused:
        if attention == "ort" and not fused:
            raise ExportError(f"--attention ort: {type(denoiser).__name__} has no attention layer to fuse "
                              "(diffusers attention with its default processor)")
        model = _trace_graph(onnx, graph, contract, batch, dt, denoiser, unit_guidance_branch, large=external)
    _check_interface(onnx, model, contract)
    meta = {"fewstep.format": FORMAT, "fewstep.kind": kind, "fewstep.teacher_hash": teacher_hash or "",
            "fewstep.contract": json.dumps(contract)}
    if attention == "ort":  # TensorRT's parser has no contrib ops: build_tensorrt refuses such an engine
        meta["fewstep.attention"] = "ort"
    if plan is not None:
        meta["fewstep.plan"] = plan.to_json()
    model = _finish(onnx, model, {**meta, **(extra_metadata or {})}, dt, check=not external)
    if external:
        size = _save_external(onnx, model, path, dt)
    else:
        data = model.SerializeToString()
        atomic_write_bytes(path, data)
        size = len(data)
    return ExportResult(path, time.perf_counter() - t0, size, contract)


def _save_external(onnx, model, path: str, dt) -> int:
    """``path`` plus its weights in ``<name>.data`` beside it, both complete before either is in place: saved in a
    temporary directory next to the target, checked there (the full ONNX check reads a model > 2 GiB from its
    path), then renamed — the data file first, so the .onnx never names a data file that is not there."""
    import shutil
    import tempfile

    d, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tmp = tempfile.mkdtemp(prefix=f".{base}.", dir=d)
    try:
        tpath = os.path.join(tmp, base)
        onnx.save_model(model, tpath, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=base + ".data", size_threshold=1024)
        _check_onnx(onnx, tpath, dt)
        mask = os.umask(0)
        os.umask(mask)
        for f in (tpath, tpath + ".data"):  # ordinary file permissions (onnx writes the data file 0600)
            os.chmod(f, 0o666 & ~mask)
        size = os.path.getsize(tpath) + os.path.getsize(tpath + ".data")
        os.replace(tpath + ".data", os.path.join(d, base + ".data"))
        os.replace(tpath, path)
        return size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_request(denoiser, plan, sample_shape, num_classes, batch, step_graph, teacher_hash, force,
                   guidance_input, conditional, cond_inputs=None) -> ModelInfo:
    """Every check of an export request that needs no tracing; returns what the model takes."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch < 1):
        raise ExportError(f"--batch must be 'dynamic' or an integer ≥ 1, got {batch!r}")
    named = tuple((str(c["name"]), tuple(int(v) for v in c["shape"]), str(c["dtype"])) for c in cond_inputs or ())
    if named and num_classes is not None:
        raise ExportError("a model takes class labels or named conditioning inputs, not both")
    if named and not denoiser.has_null_cond():
        raise ExportError("named conditioning inputs need a denoiser whose null conditioning reads their "
                          "negative_ twins")
    info = ModelInfo(tuple(int(s) for s in sample_shape), num_classes,
                     find_null_label(denoiser) if num_classes is not None else None, named)
    if conditional and not info.conditional:
        raise ExportError("class labels were asked for, but the model is not class-conditional")
    if conditional is False and info.conditional:
        raise ExportError("the model is class-conditional: its engine takes class_labels")
    if plan is None and not step_graph:
        raise ExportError("a sampler export needs a plan: --plan FILE or --solver NAME --nfe N")
    if plan is not None:
        check_plan(plan, info, teacher_hash, force, bool(guidance_input))
        if guidance_input and not step_graph and not plan_takes_guidance(plan):
            raise ExportError(f"plan {plan.name!r} fixes W on every row: its engine reads no guidance input")
    elif guidance_input and not info.guided:
        raise ExportError("a guidance input was asked for, but the model has no classifier-free guidance")
    return info


def _trace_graph(onnx, graph, contract: dict, batch, dt, denoiser, unit_guidance_branch: bool, large: bool = False):
    """The graph as an ONNX model: traced at an example batch ≥ 2 (batch-1 special cases stay out of the
    trace), the batch axis dynamic unless fixed; ``unit_guidance_branch``: B rows when every input W is 1."""
    feeds = example_inputs(contract, batch if batch is not None else 2)
    args = tuple(torch.from_numpy(feeds[s["name"]]) for s in contract["inputs"])
    out_name = contract["outputs"][0]["name"]
    dyn = None
    if batch is None:
        dyn = {s["name"]: {s["shape"].index("batch"): "batch"} for s in contract["inputs"]}
        dyn[out_name] = {0: "batch"}
    graph.ev.unit_rows = unit_guidance_branch
    return _trace(onnx, graph, args, out_name, dyn, dt, denoiser, large)


def _finish(onnx, model, meta: dict, dt, check: bool = True):
    """Metadata in and the full ONNX check (naming the first op the opset does not allow); ``check=False``
    leaves the check to the caller (a model over 2 GiB is checked from its saved path)."""
    import fewstep

    del model.metadata_props[:]
    for k, v in {**meta, "fewstep.version": fewstep.__version__}.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    model.producer_name = "fewstep"
    model.producer_version = fewstep.__version__
    if check:
        _check_onnx(onnx, model, dt)
    return model


def _check_onnx(onnx, model, dt) -> None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"--dtype {DTYPE_NAMES[dt]}: the exported graph is not valid ONNX opset {_opset(dt)}: "
                          f"{str(exc).strip().splitlines()[0]}") from None


def _opset(dt) -> int:
    return OPSET_BF16 if dt == torch.bfloat16 else OPSET


def _trace(onnx, graph: nn.Module, args, out_name: str, dyn, dt, denoiser, large: bool = False):
    """The traced ONNX model. ``large``: traced to a file in a temporary directory (torch writes weights past the
    protobuf limit as external data there) and loaded back with its weights, as one in-memory model."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="fewstep-trace-") if large else None
    target = os.path.join(tmp, "graph.onnx") if large else io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # TracerWarnings flag Python branches on shapes; the dynamic-batch tests at 1, 7 and 64 are the check.
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(graph, args, target, dynamo=False, opset_version=_opset(dt),
                                  input_names=list(graph.input_names), output_names=[out_name], dynamic_axes=dyn,
                                  do_constant_folding=True)
            except Exception as exc:  # the exporter raises many types; name the model and the first line
                raise ExportError(f"ONNX export of {type(denoiser).__name__} failed: "
                                  f"{str(exc).splitlines()[0]}") from None
        if large:
            return onnx.load(target)
        return onnx.load_from_string(target.getvalue())
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _check_interface(onnx, model, contract: dict) -> None:
    """The contract lists exactly the graph's inputs and outputs, in order (the C++ runtime refuses a mismatch)."""
    inits = {t.name for t in model.graph.initializer}
    got = [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]
    want = [s["name"] for s in contract["inputs"]], [s["name"] for s in contract["outputs"]]
    if got != want:
        raise ExportError(f"the exported graph's inputs/outputs {got} differ from its contract's {want} "
                          f"(an input the trace never reads is dropped)")
    # The output's declared shape is the contract's: the tracer names dims it derived itself (a decoder's H came
    # out as "batch"), and TensorRT profiles or any reader that trusts dim names would take them at their word.
    dims = model.graph.output[0].type.tensor_type.shape.dim
    del dims[:]
    for d in contract["outputs"][0]["shape"]:
        dim = dims.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = d


def read_metadata(path) -> dict:
    """metadata_props of an exported engine, with ``fewstep.contract`` parsed and ``fewstep.plan`` as a Plan."""
    onnx = require_onnx()
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except FileNotFoundError:
        raise ExportError(f"engine file not found: {path}") from None
    except Exception as exc:
        raise ExportError(f"{path}: not a readable ONNX file ({str(exc).splitlines()[0]})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("fewstep.format") != FORMAT:
        raise ExportError(f"{path}: not a fewstep engine (metadata fewstep.format is {meta.get('fewstep.format')!r})")
    out = dict(meta)
    out["fewstep.contract"] = json.loads(meta["fewstep.contract"])
    out["fewstep.plan"] = Plan.from_json(meta["fewstep.plan"]) if "fewstep.plan" in meta else None
    return out


def export_teacher(model: str, plan: Plan | None, path, decode: bool = False, **kw) -> ExportResult:
    """``export_onnx`` for a `--model` name (digits | gmm | PATH) as the CLI resolves it; ``decode``: a pipeline's
    VAE decoder appended."""
    teacher = load_teacher(model)
    return export_model(teacher, plan, path, decode=decode, **kw)


def export_model(teacher, plan: Plan | None, path, decode: bool = False, **kw) -> ExportResult:
    """``export_onnx`` for a loaded ``runtime.models.Model``: its shape, labels or named conditioning, hash."""
    decoder = None
    if decode:
        decoder = teacher.decoder()
        if decoder is None:
            raise ExportError(f"--decode: {teacher.name} has no VAE (its samples are already pixels)")
    return export_onnx(teacher.denoiser, plan, path, sample_shape=teacher.shape, num_classes=teacher.num_classes,
                       teacher_hash=teacher.content_hash, cond_inputs=teacher.cond_inputs, decoder=decoder, **kw)


def load_teacher(model: str, steps: int | None = None):
    from ..runtime.models import ModelError, load

    try:
        return load(model, steps=steps)
    except (ModelError, FileNotFoundError) as exc:
        raise ExportError(str(exc)) from None


def export_step_onnx(denoiser, path, **kw) -> ExportResult:
    """The single-evaluation graph D(x, σ, class[, guidance]) → x0."""
    kw.setdefault("step_graph", True)
    return export_onnx(denoiser, kw.pop("plan", None), path, **kw)
