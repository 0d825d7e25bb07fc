"""Verify an exported engine: ONNX Runtime (CPU provider) against the Python reference executor.

Inputs come from fewstep's Philox generator as the contract's "Noise" section says, so the
engine and the executor see the same z / noise. The error is the max absolute difference over
the largest reference magnitude: max|ort − ref| / max|ref| (an element-wise relative error is
meaningless near zero).

Tolerance (against the float32 executor, which is the answer a user wants): derived per engine by
``tolerance`` from the rounding depth of the exported computation, not measured:

- R: the most roundings on one path from an input to the output, counted on the graph itself
  (``rounding_depth``: every arithmetic node rounds its output once; the If branches of an engine
  with a guidance input: the deeper one). The passes are chained through the state, so R covers
  all NFE UNet passes and the updates between them (digits: ≈ 153 a pass, each GroupNorm's,
  SiLU's and the σ embedding's Mul/Add counted).
- u: the compute dtype's unit roundoff: float32 2⁻²⁴, float16 2⁻¹¹, bfloat16 2⁻⁸.
- CFG: a guided D = (1 − w)·D_u + w·D_c weighs the two halves' errors by |1 − w| and |w|
  (worst case |1 − w| + |w|, independent errors √((1 − w)² + w²)); w = 1: one half, gain 1.
- Each rounding is a relative error of the sample's scale carried to the output with gain ≤ 1 (the
  model of the project's other rounding bounds: states at high σ are damped by the later rows, and a
  row's coefficients sum to O(1)). Plans whose rows sum big terms that cancel break it: Heun at
  NFE 3 ends with q ≈ ±2·10⁴ (σ jumps 80 → 0.002), which scales fresh roundings by up to 4·10⁴.
  Their low-precision engines can fail the check with no wrong node (bfloat16 Heun-3 reads 0.49):
  there verify says the engine is far from the executor, whatever the cause.

float32: worst case, 2·g_w·R·u (every rounding at full size and one sign; ×2: ONNX Runtime and
torch each round, in another order). It is small enough (1.1e-4 for the 3-NFE guided digits engine)
to need no statistical assumption, and a wrong row coefficient or σ moves the sample by ≥ 1e-2.

float16 / bfloat16: the worst case R·u is useless there (float16, 3 guided passes: 0.9, bfloat16
7.2: above what a wrong graph does), so the random-walk model of independent, zero-mean roundings
(Higham & Mary 2019, "A new approach to probabilistic rounding error analysis"):
λ·g_w·√R·u with λ = 6, which holds with probability ≥ 1 − 2·exp(−λ²/2) ≈ 1 − 3e-8 per output
element, so a correct engine of ≤ 3·10⁴ elements fails with probability < 1e-3. The float32
executor's own error is ≪ that and not counted. Digits, DPM++ 2M at 2 NFE with its guidance input
(R = 307, w = 1.5): float16 8.1e-2 (reads 5e-4 to 7e-4 with seeds 0 and 1; DPM++ 2M at 4 NFE
1e-3 to 2.4e-3), bfloat16 DDIM-2 0.65 (reads 3.5e-2). ONNX Runtime's CPU provider runs float16
nodes without float16 kernels in float32, so it often reads far below the bound; the bound is for
any runtime that rounds every op.

bfloat16 engines are exported at opset 22, and ONNX Runtime's CPU provider has no bfloat16 kernels,
so they are run by the `onnx` package's reference evaluator (a plain numpy interpreter of the ONNX
spec: slow, but it runs every op in bfloat16) instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FewstepError
from .onnx import ExportError, read_metadata

UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
LAMBDA = 6.0  # the random-walk bound's confidence: fails a correct element with probability ≤ 2·exp(−λ²/2)
# Nodes whose float output is rounded (shape, index and copy ops are exact; Cast narrows; Resize may interpolate).
ROUNDING_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Exp", "Log", "Sigmoid", "Tanh", "Erf", "Softmax",
    "Cos", "Sin", "Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum", "InstanceNormalization",
    "GroupNormalization", "LayerNormalization", "BatchNormalization", "ReduceMean", "ReduceSum", "Resize", "Cast",
    "HardSigmoid", "Softplus", "Gelu", "Mish", "Where",
})
# Fused nodes count as the roundings of what they compute: MultiHeadAttention (``--attention ort``) scales Q, then
# MatMul Q·Kᵀ, Softmax, MatMul by V. (The plain export's path is longer by its scale's own arithmetic on the shape,
# 1/√d as Cast, Sqrt, Div, Cast, Sqrt, which the count sees as data roundings.)
FUSED_ROUNDINGS = {"MultiHeadAttention": 4}
# A Gemm with a C input (a 2-D Linear's bias, e.g. a time embedding's) adds it to the product: two roundings, as
# the MatMul + Add of a Linear on a [B, S, K] activation are counted.
GEMM_WITH_BIAS = 2


class VerifyError(FewstepError):
    """The engine cannot be checked as asked (model unknown, dtype ONNX Runtime's CPU provider cannot run)."""


class UnsupportedOnCPU(VerifyError):
    """ONNX Runtime's CPU provider has no kernel for this engine's compute dtype."""


@dataclass
class VerifyResult:
    path: str
    kind: str
    compute_dtype: str
    batch: int
    max_rel_err: float
    tolerance: float
    passed: bool

    def line(self) -> str:
        ok = "ok" if self.passed else "FAILED"
        return (f"verify {os.path.basename(self.path)}: {self.kind} {self.compute_dtype}, batch {self.batch}, "
                f"max rel err {self.max_rel_err:.3g} (tolerance {self.tolerance:g}) {ok}")


def rounding_depth(model) -> int:
    """The most rounding nodes (``ROUNDING_OPS``) on one path from an input to an output of ``model``
    (an ``onnx.ModelProto``); an If node counts as its deeper branch. ONNX nodes are topologically sorted."""

    def walk(graph, depth: dict) -> list[int]:
        d = dict(depth)
        for node in graph.node:
            base = max((d.get(i, 0) for i in node.input if i), default=0)
            branches = [a.g for a in node.attribute if a.type == 5]  # AttributeProto.GRAPH
            if branches:
                outs = [walk(g, d) for g in branches]
                for k, o in enumerate(node.output):
                    d[o] = max((b[k] for b in outs if k < len(b)), default=base)
            else:
                inc = FUSED_ROUNDINGS.get(node.op_type, 1 if node.op_type in ROUNDING_OPS else 0)
                if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
                    inc = GEMM_WITH_BIAS
                for o in node.output:
                    d[o] = base + inc
        return [d.get(o.name, 0) for o in graph.output]

    return max(walk(model.graph, {}), default=0)


def cfg_gain(w, worst: bool) -> float:
    """How CFG D = (1 − w)·D_u + w·D_c scales the halves' errors: |1 − w| + |w| (worst), √((1 − w)² + w²)."""
    if w is None or w == 1.0:
        return 1.0
    return abs(1 - w) + abs(w) if worst else math.hypot(1 - w, w)


def tolerance(compute_dtype: str, depth: int, ws=(None,)) -> float:
    """The derived bound on max|engine − executor| / max|executor| (see the module docstring)."""
    u = UNIT_ROUNDOFF[compute_dtype]
    worst = compute_dtype == "float32"
    g = max(cfg_gain(w, worst) for w in ws)
    if worst:
        return 2 * g * depth * u
    return LAMBDA * g * math.sqrt(depth) * u


def engine_tolerance(path, guidance: float = 1.5) -> float:
    """``tolerance`` of the engine at ``path`` as ``verify`` computes it (depth counted on its graph)."""
    import onnx

    meta = read_metadata(path)
    c, plan = meta["fewstep.contract"], meta["fewstep.plan"]
    graph = onnx.load(os.fspath(path), load_external_data=False)  # the graph only: weights are not needed
    return tolerance(c["compute_dtype"], rounding_depth(graph), _guidances(plan, c, guidance))


def _guidances(plan, contract, guidance):
    """Every w a guided evaluation of the check can use: the rows' own, and the W inputs verify feeds."""
    ws = [guidance, 1.0] if contract["guidance_input"] else [None]
    if plan is not None:
        ws += [r.guidance for r in plan.rows if r.guidance is not None]
    return ws


def require_ort():
    try:
        import onnxruntime
    except ImportError:
        raise VerifyError("the onnxruntime package is not installed: pip install onnxruntime (verify needs it)") \
            from None
    return onnxruntime


def resolve_model(meta: dict, model: str | None):
    """The teacher the engine was exported from: `model` if given, else found by the recorded content hash
    among the shipped teachers (digits, gmm)."""
    from ..runtime.models import bundle_steps
    from .onnx import load_teacher

    want = meta.get("fewstep.teacher_hash", "")
    if model is not None:
        t = load_teacher(model)
        for n in bundle_steps(model):  # a distilled bundle: the student the engine came from
            if t.content_hash == want:
                break
            t = load_teacher(model, n)
        if want and t.content_hash != want:
            raise VerifyError(f"--model {model} has content hash {t.content_hash[:19]}…, the engine was exported "
                              f"from {want[:19]}…")
        return t
    for name in ("digits", "gmm", "digits-guided"):
        for steps in [None, *bundle_steps(name)]:
            try:
                t = load_teacher(name, steps)
            except (ExportError, OSError):
                continue
            if t.content_hash == want:
                return t
    raise VerifyError(f"the engine's teacher ({want[:19]}…) is not a shipped teacher: pass --model PATH")


def session(path, providers=("CPUExecutionProvider",), threads: int | None = None):
    ort = require_ort()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(os.fspath(path), opts, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own exception types per failure
        msg = str(exc)
        if "NOT_IMPLEMENTED" in msg or "Could not find an implementation" in msg:
            raise UnsupportedOnCPU(f"ONNX Runtime's CPU provider cannot run {os.path.basename(os.fspath(path))}: "
                                   f"{_first_line(msg)}") from None
        raise VerifyError(f"ONNX Runtime could not load {path}: {_first_line(msg)}") from None


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0][:300] if msg.strip() else "(no message)"


@torch.no_grad()
def reference(teacher, meta: dict, feeds: dict, guidance: float | None) -> np.ndarray:
    """The Python executor (float32) on the engine's inputs."""
    from ..runtime.executor import call_denoiser, sample

    c = meta["fewstep.contract"]
    t = lambda k: torch.from_numpy(feeds[k]) if k in feeds else None  # noqa: E731
    cond = conditioning(c, feeds)
    if meta["fewstep.kind"] == "step":
        return call_denoiser(teacher.denoiser, t("x"), t("sigma"), cond, guidance if c["guidance_input"] else None) \
            .numpy()
    x = sample(meta["fewstep.plan"], teacher.denoiser, t("z"), cond=cond,
               guidance=guidance if c["guidance_input"] else None, noise=t("noise"))
    if c["outputs"][0]["name"] == "image":  # the engine ends with the pipeline's VAE decoder
        x = teacher.decoder()(x)
    return x.numpy()


STATE_INPUTS = frozenset({"z", "x", "noise", "sigma", "guidance"})


def conditioning(contract: dict, feeds: dict):
    """The executor's conditioning from an engine's feeds: class labels (a tensor), every other input that is not
    the state, noise, σ or W by name (a dict, as a pipeline's denoiser takes it), or None."""
    names = [s["name"] for s in contract["inputs"] if s["name"] not in STATE_INPUTS]
    if names == ["class_labels"]:
        return torch.from_numpy(feeds["class_labels"])
    return {k: torch.from_numpy(feeds[k]) for k in names} or None


def verify(path, model: str | None = None, batch: int = 7, seed: int = 0, guidance: float = 1.5,
           tolerance: float | None = None, threads: int | None = None) -> VerifyResult:
    """Run ``path`` in ONNX Runtime (CPU) and the Python executor on the same Philox inputs; compare.

    ``threads``: ONNX Runtime intra-op threads (None: its default, one per core).
    """
    from .onnx import example_inputs

    path = os.fspath(path)
    meta = read_metadata(path)
    c = meta["fewstep.contract"]
    dt = c["compute_dtype"]
    fixed = c["inputs"][0]["shape"][0]
    if fixed != "batch":
        batch = int(fixed)
    teacher = resolve_model(meta, model)
    # An engine with a guidance input branches on W (B rows when every W is 1): check W = 1 and ``guidance``.
    ws = [guidance, 1.0] if c["guidance_input"] and guidance != 1.0 else [guidance]
    try:
        if dt == "bfloat16":
            import onnx
            from onnx.reference import ReferenceEvaluator

            ev = ReferenceEvaluator(onnx.load(path))  # external data, if any, loads from beside the file
            run = lambda f: ev.run(None, f)[0]  # noqa: E731
        else:
            sess = session(path, threads=threads)
            run = lambda f: sess.run(None, f)[0]  # noqa: E731
        outs = [run(example_inputs(c, batch, seed=seed, guidance=w)) for w in ws]
    except Exception as exc:
        msg = str(exc)
        if "NOT_IMPLEMENTED" in msg:
            raise UnsupportedOnCPU(f"ONNX Runtime's CPU provider cannot run this {dt} engine: {_first_line(msg)}") \
                from None
        raise VerifyError(f"ONNX Runtime failed on {path}: {_first_line(msg)}") from None
    err, finite = 0.0, True
    for w, out in zip(ws, outs):
        ref = reference(teacher, meta, example_inputs(c, batch, seed=seed, guidance=w), w)
        err = max(err, float(np.abs(out.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30)))
        finite = finite and bool(np.all(np.isfinite(out)))
    tol = engine_tolerance(path, guidance) if tolerance is None else tolerance
    ok = finite and err <= tol
    return VerifyResult(path, meta["fewstep.kind"], dt, batch, err, tol, ok)
