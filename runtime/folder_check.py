"""A diffusers / transformers component folder's config, checked against its weights before anything is built.

``from_pretrained`` builds the model its ``config.json`` describes at full size (random initialisation included)
and only then reads the weights. So a config with absurd widths asks for terabytes (an OOM kill, not an error),
one with absurd depths builds for hours, and one that does not match its weights is either refused with a
multi-line state-dict error or, where tensors are missing, silently gets random ones. Here the model is built on
the meta device first (no memory), under a budget set by what the safetensors headers hold, and its tensors are
compared with the headers' names and shapes: one line that names the folder and the first difference.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import FewstepError
from .files import check_regular, load_json, parse_json

MAX_HEADER_BYTES = 100 << 20  # real headers are ~100 kB (SD 1.5's UNet) to a few MB (the largest transformers)
# Bytes per element of safetensors' dtypes: a header's shapes must account for its data offsets exactly.
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
               "F6_E2M3": 1, "F6_E3M2": 1}
# The meta build may create more values and tensors than the weights hold (buffers that are not saved, tied
# weights, a parameter made then replaced), but not unboundedly more: past this it is refused.
BUDGET_FACTOR, BUDGET_SLACK_VALUES, BUDGET_SLACK_TENSORS = 2, 1 << 24, 4096


class FolderError(FewstepError):
    """A model folder whose config and weights cannot both be true."""


def safetensors_shapes(path: str, what: str) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a safetensors file's header (the data is not read): a bounded strict-JSON
    header whose entries' shapes and dtypes account for their data offsets, all inside the file."""
    size = check_regular(path, what)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            hlen = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < hlen <= min(MAX_HEADER_BYTES, size - 8):
                raise FolderError(f"{what} {path}: not a safetensors file (header of {hlen:,} bytes in a file of "
                                  f"{size:,})")
            raw = f.read(hlen)
    except OSError as exc:
        raise FolderError(f"{what} {path}: {exc.strerror}") from None
    header = parse_json(raw, f"{what} header", foreign=True)
    if not isinstance(header, dict):
        raise FolderError(f"{what} {path}: its header is not a JSON object")
    body = size - 8 - hlen
    out = {}
    for name, ent in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(ent, dict) and ent.get("dtype") in ST_ITEMSIZE and isinstance(ent.get("shape"), list) \
            and all(isinstance(s, int) and s >= 0 for s in ent["shape"]) and isinstance(ent.get("data_offsets"), list) \
            and len(ent["data_offsets"]) == 2 and all(isinstance(o, int) for o in ent["data_offsets"])
        if ok:
            lo, hi = ent["data_offsets"]
            # F4 / F6 pack below a byte; for those the offsets only bound the count
            packed = ent["dtype"] in ("F4", "F6_E2M3", "F6_E3M2")
            n = math.prod(ent["shape"])
            ok = 0 <= lo <= hi <= body and (hi - lo == n * ST_ITEMSIZE[ent["dtype"]] or packed and n <= 2 * (hi - lo))
        if not ok:
            raise FolderError(f"{what} {path}: tensor {str(name)[:80]!r} has a malformed header entry (dtype, shape "
                              "and data offsets must agree and lie inside the file)")
        out[name] = tuple(ent["shape"])
    return out


def weight_shapes(folder: str, stems: tuple[str, ...]) -> dict[str, tuple[int, ...]] | None:
    """Name → shape of every tensor in a component folder's safetensors weights (one file ``STEM.safetensors``
    or shards listed by ``STEM.safetensors.index.json``); None when the folder has no safetensors weights
    (pickled ``.bin`` files: nothing can be read from them without unpickling)."""
    for stem in stems:
        single = os.path.join(folder, stem + ".safetensors")
        if os.path.exists(single):
            return safetensors_shapes(single, "weights file")
        index = single + ".index.json"
        if os.path.exists(index):
            idx = load_json(index, "weights index", foreign=True)
            wm = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise FolderError(f"weights index {index}: no weight_map of tensor name → shard file")
            shards = sorted(set(wm.values()))
            if any(os.path.basename(s) != s or s in ("", ".", "..") for s in shards):
                raise FolderError(f"weights index {index}: shard names must be files in {folder}")
            out: dict[str, tuple[int, ...]] = {}
            for s in shards:
                out.update(safetensors_shapes(os.path.join(folder, s), "weights shard"))
            return out
    return None


class _Budget(TorchFunctionMode):
    """Counts the tensors a model's constructor makes (every one goes through a factory function) and stops it
    once they pass the budget: absurd widths stop at their first tensor, absurd depths after a few layers."""

    FACTORIES = frozenset((torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
                           torch.randint, torch.arange, torch.linspace, torch.logspace, torch.eye, torch.tensor,
                           torch.empty_strided, torch.as_tensor))

    class Exceeded(Exception):
        pass

    def __init__(self, values: int, tensors: int):
        super().__init__()
        self.max_values, self.max_tensors, self.values, self.tensors = values, tensors, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.FACTORIES and isinstance(out, torch.Tensor):  # on meta: counting costs no memory
            self._count(out.numel())
        return out

    def _count(self, n: int) -> None:
        self.values += n
        self.tensors += 1
        if self.values > self.max_values or self.tensors > self.max_tensors:
            raise self.Exceeded


def check_component(folder: str, what: str, build: Callable[[], nn.Module], stems: tuple[str, ...],
                    strict: bool) -> None:
    """Build the component on the meta device within its weights' budget; with ``strict``, also require every
    tensor of the built model in the weights with the same shape (for backbones, whose checkpoints name their
    tensors as the model does; text encoders and VAEs can have tied or renamed ones, which their loaders map)."""
    shapes = weight_shapes(folder, stems)
    if shapes is None:
        return
    held = sum(math.prod(s) for s in shapes.values())
    budget = _Budget(BUDGET_FACTOR * held + BUDGET_SLACK_VALUES, BUDGET_FACTOR * len(shapes) + BUDGET_SLACK_TENSORS)
    try:
        with torch.device("meta"), budget:
            model = build()
    except _Budget.Exceeded:
        raise FolderError(f"{what}: its config.json describes a model far larger than its weights (over "
                          f"{budget.values:,} values in {budget.tensors:,} tensors; the weights hold {held:,} in "
                          f"{len(shapes):,}); refusing to build it") from None
    if not strict:
        return
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in shapes]
    if missing:
        raise FolderError(f"{what}: its weights lack {len(missing)} of the {len(want)} tensors its config.json "
                          f"describes (first: {missing[0]}): the weights are incomplete or another model's")
    for k, s in want.items():
        if shapes[k] != s:
            raise FolderError(f"{what}: {k} is {list(s)} in its config.json but {list(shapes[k])} in its weights; "
                              "config and weights are from different models")


def diffusers_builder(cls, folder: str) -> Callable[[], nn.Module]:
    return lambda: cls.from_config(cls.load_config(folder, local_files_only=True))


def transformers_builder(cls, folder: str) -> Callable[[], nn.Module]:
    def build():
        config = cls.config_class.from_pretrained(folder, local_files_only=True)
        return cls._from_config(config)
    return build


DIFFUSERS_STEMS = ("diffusion_pytorch_model",)
TRANSFORMERS_STEMS = ("model",)
