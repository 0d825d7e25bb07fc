"""Verify an exported engine: ONNX Runtime (CPU provider) against the Python reference executor.

Inputs come from fewstep's Philox generator as the contract's "Noise" section says, so the
engine and the executor see the same z / noise. The error is the max absolute difference over
the largest reference magnitude: max|ort − ref| / max|ref| (an element-wise relative error is
meaningless near zero).

Tolerances (against the float32 executor, which is the answer a user wants):
- float32: 1e-4. Both sides do the same float32 ops; measured ≤ 1.2e-6 on the digits teacher.
- float16: 5e-2. The state x runs in float16 as the contract says, and at σ_max = 80 |x| reaches
  ~320, where float16's spacing is 0.25; measured 2e-3 (DPM++ 2M / DDPM, 4 NFE) and 4.4e-2 (Heun,
  3 NFE) on the digits teacher. A bigger error means a wrong graph, not rounding.
- bfloat16: BF16_TOLERANCE. bfloat16 engines are exported at opset 22, and ONNX Runtime's CPU
  provider has no bfloat16 kernels, so they are run by the `onnx` package's reference evaluator
  (a plain numpy interpreter of the ONNX spec: slow, but it runs every op in bfloat16) instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import FewstepError
from .onnx import ExportError, read_metadata

TOLERANCE = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2e-1}


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
    from ..training.teachers import bundle_steps
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
    cond = t("class_labels")
    if meta["fewstep.kind"] == "step":
        return call_denoiser(teacher.denoiser, t("x"), t("sigma"), cond, guidance if c["guidance_input"] else None) \
            .numpy()
    return sample(meta["fewstep.plan"], teacher.denoiser, t("z"), cond=cond,
                  guidance=guidance if c["guidance_input"] else None, noise=t("noise")).numpy()


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

            ev = ReferenceEvaluator(onnx.load(path))
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
    tol = TOLERANCE[dt] if tolerance is None else tolerance
    ok = finite and err <= tol
    return VerifyResult(path, meta["fewstep.kind"], dt, batch, err, tol, ok)
