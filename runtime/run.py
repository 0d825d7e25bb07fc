"""`fewstep run`: sample an exported engine with the C++ runtime (``fewstep._C.Engine``).

The engine's z and stochastic noise come from the shared Philox generator, so
``fewstep run engine.onnx --seed S --n N`` equals ``fewstep sample --plan P --seed S --n N``
for the plan baked into the engine (bit-identical to ONNX Runtime called from Python on the same
inputs, within the export tolerance of the PyTorch executor).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import FewstepError, NonFiniteError


class RunError(FewstepError):
    """A bad engine file or bad sampling arguments (message names the problem)."""


def load_engine(path: str, threads: int = 0, provider: str = "cpu", device_id: int = 0, cuda_graph: bool = False,
                cache_dir: str | None = None, ort_library: str | None = None):
    """Load an exported engine into the C++ runtime. ONNX Runtime comes from ``ort_library``, else
    ``$FEWSTEP_ORT_LIBRARY``, else the installed ``onnxruntime`` / ``onnxruntime-gpu`` package. ``provider``:
    cpu | cuda | tensorrt | openvino (the last needs the onnxruntime-openvino build's library)."""
    from .. import _C

    if not os.path.exists(path):
        raise RunError(f"engine not found: {path}")
    if ort_library is None and not _C.find_ort_library():
        raise RunError("ONNX Runtime not found: pip install onnxruntime (or onnxruntime-gpu), "
                       "or set FEWSTEP_ORT_LIBRARY to a libonnxruntime.so")
    try:
        return _C.Engine(path, threads=threads, provider=provider, device_id=device_id, cuda_graph=cuda_graph,
                         cache_dir=cache_dir, ort_library=ort_library)
    except (ValueError, RuntimeError) as exc:  # a bad engine file or ONNX Runtime library: the user's input
        raise RunError(str(exc)) from None


# The C++ runtime's bound on one run (runtime/src/engine.cpp): checked here too, before numpy allocates.
MAX_VALUES = 2**31


def default_labels(info: dict, batch: int, cls) -> np.ndarray | None:
    """Class labels as ``fewstep sample`` picks them: ``cls`` for every sample ("none" = the null
    label, unconditional); without ``cls`` classes 0, 1, 2, … in turn."""
    k = info["num_classes"]
    if k is None:
        if cls is not None:
            raise RunError("--class given but this engine is not class-conditional")
        return None
    if cls is None:
        return np.arange(batch, dtype=np.int64) % k
    if cls == "none":
        if info["null_label"] is None:
            raise RunError("--class none: this engine has no null label (no unconditional sampling)")
        return np.full(batch, info["null_label"], np.int64)
    if not 0 <= cls < k:
        raise RunError(f"--class must be in 0..{k - 1} or 'none', got {cls}")
    return np.full(batch, cls, np.int64)


def conditioning_inputs(engine) -> list[dict]:
    """The inputs the caller must give besides class labels and guidance (e.g. ``encoder_hidden_states``):
    ``engine.inputs`` entries of source "required"; none for an extension built before named inputs."""
    return [d for d in getattr(engine, "inputs", ()) if d["source"] == "required"
            and d["name"] not in ("class_labels", "guidance")]


# fewstep-run's --embeddings rules (runtime/cli/fewstep_run.cpp): the engine's input dtypes, a header of at most
# 16 MiB. Named tensors that share bytes are refused, so what is read is at most the file.
RUN_ST_DTYPES = {"F32": np.float32, "I64": np.int64}
MAX_ST_HEADER = 1 << 24


def read_embeddings(path: str) -> dict:
    """Named tensors from a .safetensors file (e.g. precomputed text embeddings): F32 or I64, as fewstep-run
    reads them. Every header entry is checked (dtype, byte range inside the file, no shared bytes, at most the
    runtime's per-run limit of values in all) before any data is read."""
    import math

    from .files import check_regular, read_span, safetensors_header

    what = f"embeddings file {path}"
    size = check_regular(path, "embeddings file")
    try:
        with open(path, "rb") as f:
            header = safetensors_header(f, size, what, MAX_ST_HEADER, RunError)
            total = 0
            for name, (dtype, shape, _, _) in header.items():
                if dtype not in RUN_ST_DTYPES:
                    raise RunError(f"{what}: tensor {name[:80]!r} is {dtype}; fewstep run reads F32 and I64 tensors")
                total += math.prod(shape)
                if total > MAX_VALUES:
                    raise RunError(f"{what}: more than {MAX_VALUES:,} values")
            out = {}
            for name, (dtype, shape, lo, hi) in header.items():
                buf = read_span(f, lo, hi, what, RunError)  # safetensors is little-endian
                out[name] = np.frombuffer(buf, dtype=np.dtype(RUN_ST_DTYPES[dtype]).newbyteorder("<")).reshape(shape)
            return out
    except OSError as exc:
        raise RunError(f"{what}: {exc.strerror}") from None


def output_of(engine) -> dict:
    """The engine's output {name, shape ('batch' first), per_sample}: 'sample' [batch, *sample_shape], or 'image'
    [batch, 3, H, W] for an engine exported with --decode (an extension built before outputs were read: 'sample')."""
    out = getattr(engine, "output", None)
    if out is not None:
        return out
    shape = tuple(engine.info["sample_shape"])
    return {"name": "sample", "shape": ("batch", *shape), "dtype": "float32", "per_sample": int(np.prod(shape))}


def sample(engine, seed: int = 0, batch: int | None = None, cls=None, guidance: float | None = None,
           z: np.ndarray | None = None, inputs: dict | None = None) -> np.ndarray:
    """float32 of the engine's output shape from ``engine`` (a ``_C.Engine``): [batch, *sample_shape], or
    [batch, 3, H, W] for a --decode engine (``output_of``); ``z`` replaces the seed's
    initial noise (the stochastic rows still draw from ``seed``), as ``fewstep sample --noise``.
    ``inputs``: the engine's named inputs {name: array} (conditioning tensors such as
    ``encoder_hidden_states``); without ``batch`` or ``z`` the batch is the leading size of the first one
    whose leading dimension is the engine's batch."""
    info = engine.info
    inputs = dict(inputs or {})
    if z is not None:
        want = tuple(info["sample_shape"])
        if z.dtype != np.float32 or z.ndim != 1 + len(want) or tuple(z.shape[1:]) != want:
            raise RunError(f"noise file: expected a float32 array of shape N×{'×'.join(map(str, want))}, "
                           f"got {z.dtype} {tuple(z.shape)}")
        if batch is not None and batch != z.shape[0]:
            raise RunError(f"--n {batch} but the noise file has {z.shape[0]} samples")
        if not np.all(np.isfinite(z)):
            raise RunError("noise file: contains NaN or inf")
        batch = z.shape[0]
        z = np.ascontiguousarray(z)
    named = bool(inputs) or bool(conditioning_inputs(engine))
    if batch is None and named:
        for d in getattr(engine, "inputs", ()):
            a = inputs.get(d["name"])
            if a is not None and d["shape"][:1] == ("batch",) and np.ndim(a) >= 1:
                batch = int(np.shape(a)[0])
                break
    batch = 1 if batch is None else batch
    if batch < 1:
        raise RunError(f"--n must be ≥ 1, got {batch}")
    per_sample = int(output_of(engine)["per_sample"])
    if batch * per_sample > MAX_VALUES:
        raise RunError(f"--n {batch:,}: {batch:,} samples × {per_sample:,} values is more than the "
                       f"{MAX_VALUES:,} values one run may hold")
    if "class_labels" in inputs:
        if cls is not None:
            raise RunError("--class and an input class_labels both given")
        labels = None
    else:
        labels = default_labels(info, batch, cls)
    g = None
    if guidance is not None:
        if "guidance" in inputs:
            raise RunError("--guidance and an input guidance both given")
        if not np.isfinite(guidance):
            raise RunError(f"--guidance must be finite, got {guidance}")
        if not info["guidance_input"] and guidance != 1.0:
            raise RunError(f"--guidance {guidance}: this engine has no guidance input")
        g = np.full(batch, guidance, np.float32) if info["guidance_input"] else None
    elif named and info["guidance_input"] and "guidance" not in inputs:
        g = np.ones(batch, np.float32)  # the named path takes every input explicitly: W = 1 as the default
    try:
        if named:  # every input by name (fewstep_sample_inputs): the C side checks each against the contract
            return engine.sample(seed, batch, labels=labels, guidance=g, z=z, inputs=inputs)
        return engine.sample(seed, batch, labels=labels, guidance=g, z=z)
    except NonFiniteError:
        raise  # its own exit code (3), not a bad argument
    except (ValueError, RuntimeError) as exc:  # RuntimeError: ONNX Runtime could not run this engine
        raise RunError(str(exc)) from None
