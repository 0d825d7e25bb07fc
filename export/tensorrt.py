"""TensorRT engines from an exported ONNX sampler, on TensorRT's documented Python API (10.x / 11.x).

Networks are strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): precision comes
from the ONNX graph's dtypes (``fewstep export --dtype fp16``), not from builder flags. One
optimisation profile covers the batch range min/opt/max for every input whose contract shape has
the "batch" dimension. Not measured here: this machine has neither TensorRT nor a GPU.

Also ``ort_tensorrt_options``: the same engine through ONNX Runtime's TensorRT execution provider.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ..errors import FewstepError
from ..runtime.plan import atomic_write_bytes


class TensorRTUnavailable(FewstepError):
    """TensorRT or a CUDA GPU is missing."""


class TensorRTBuildError(FewstepError):
    pass


def require_tensorrt():
    """The ``tensorrt`` module, or TensorRTUnavailable naming what is missing (checked before any work)."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed (import tensorrt failed): install TensorRT 10+ "
                                  "from NVIDIA (pip install tensorrt needs NVIDIA's package index) on a machine "
                                  "with a CUDA GPU") from None
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        raise TensorRTUnavailable("no CUDA GPU is available (torch.cuda.is_available() is False): "
                                  "TensorRT builds engines on the GPU they run on")
    return trt


def batch_shapes(contract: dict, batch: int) -> dict[str, tuple[int, ...]]:
    """Each input's shape at ``batch`` (the contract's "batch" entry replaced)."""
    return {s["name"]: tuple(batch if d == "batch" else int(d) for d in s["shape"]) for s in contract["inputs"]}


def _check_range(contract: dict, min_batch: int, opt_batch: int, max_batch: int) -> tuple[int, int, int]:
    fixed = contract["inputs"][0]["shape"][0]
    if fixed != "batch":  # a fixed-batch export has exactly one shape
        return int(fixed), int(fixed), int(fixed)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise FewstepError(f"TensorRT batch range needs 1 ≤ min ≤ opt ≤ max, got {min_batch}/{opt_batch}/{max_batch}")
    return min_batch, opt_batch, max_batch


@dataclass
class BuildResult:
    path: str
    seconds: float
    bytes: int


def build_tensorrt(onnx_path, engine_path=None, *, min_batch: int = 1, opt_batch: int = 8, max_batch: int = 64,
                   timing_cache: str | None = None, workspace_gib: float = 4.0, verbose: bool = False) -> BuildResult:
    """Build a serialized TensorRT engine (``.plan``) from an exported fewstep ONNX file.

    ``timing_cache``: a file loaded if present and saved after the build (later builds of the
    same layers on the same GPU reuse the kernel timings).
    """
    from .onnx import check_out_path, read_metadata

    meta = read_metadata(onnx_path)  # a fewstep engine: the contract names the dynamic inputs
    contract = meta["fewstep.contract"]
    if meta.get("fewstep.attention") == "ort":
        raise TensorRTBuildError(f"{onnx_path}: exported with --attention ort (ONNX Runtime's MultiHeadAttention "
                                 "contrib op), which TensorRT cannot parse; export with --attention onnx")
    lo, opt, hi = _check_range(contract, min_batch, opt_batch, max_batch)
    engine_path = check_out_path(engine_path or os.path.splitext(os.fspath(onnx_path))[0] + ".plan")
    trt = require_tensorrt()

    t0 = time.perf_counter()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"TensorRT could not parse {onnx_path}: {errs}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    shapes = [batch_shapes(contract, b) for b in (lo, opt, hi)]
    for spec in contract["inputs"]:
        n = spec["name"]
        profile.set_shape(n, shapes[0][n], shapes[1][n], shapes[2][n])
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache:
        blob = b""
        if os.path.exists(timing_cache):
            with open(timing_cache, "rb") as f:
                blob = f.read()
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTBuildError(f"TensorRT failed to build an engine from {onnx_path} (see the log above)")
    data = bytes(serialized)
    atomic_write_bytes(engine_path, data)
    if cache is not None:
        atomic_write_bytes(timing_cache, bytes(cache.serialize()))
    seconds = time.perf_counter() - t0
    print(f"TensorRT engine {engine_path}: built in {seconds:.1f} s, {len(data) / 1e6:.1f} MB "
          f"(batch {lo}/{opt}/{hi})")
    return BuildResult(engine_path, seconds, len(data))


def _shape_string(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{n}:{'x'.join(str(d) for d in s)}" for n, s in shapes.items())


def ort_tensorrt_options(contract: dict, *, min_batch: int = 1, opt_batch: int = 8, max_batch: int = 64,
                         fp16: bool = False, cache_dir: str = "trt_cache") -> dict[str, str]:
    """Provider options for ONNX Runtime's ``TensorrtExecutionProvider`` equivalent to ``build_tensorrt``:

        ort.InferenceSession(path, providers=[("TensorrtExecutionProvider", opts), "CUDAExecutionProvider"])

    ``fp16`` lets TensorRT lower float32 layers (the provider's networks are not strongly typed);
    leave it off for a float16 export, whose precision is already in the graph.
    """
    lo, opt, hi = _check_range(contract, min_batch, opt_batch, max_batch)
    return {
        "trt_fp16_enable": "True" if fp16 else "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache_dir,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache_dir,
        "trt_profile_min_shapes": _shape_string(batch_shapes(contract, lo)),
        "trt_profile_opt_shapes": _shape_string(batch_shapes(contract, opt)),
        "trt_profile_max_shapes": _shape_string(batch_shapes(contract, hi)),
    }
