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
import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import FewstepError
from .files import check_regular, load_json, one_line, safetensors_header

MAX_HEADER_BYTES = 100 << 20  # real headers are ~100 kB (SD 1.5's UNet) to a few MB (the largest transformers)
# The meta build may create more values and tensors than the weights hold (buffers that are not saved, tied
# weights, a parameter made then replaced), but not unboundedly more: past this it is refused.
BUDGET_FACTOR, BUDGET_SLACK_VALUES, BUDGET_SLACK_TENSORS = 2, 1 << 24, 4096
# Widths, depths, vocabularies and position counts of published models stay below 10^7 (the largest: vocabularies
# of 256k, 128k positions, rope_theta 10^6).
MAX_CONFIG_INT = 10_000_000


class FolderError(FewstepError):
    """A model folder whose config and weights cannot both be true."""


def safetensors_shapes(path: str, what: str) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape from a safetensors file's checked header (the data is not read)."""
    size = check_regular(path, what)
    try:
        with open(path, "rb") as f:
            header = safetensors_header(f, size, f"{what} {path}", MAX_HEADER_BYTES, FolderError)
    except OSError as exc:
        raise FolderError(f"{what} {path}: {exc.strerror}") from None
    return {name: shape for name, (_, shape, _, _) in header.items()}


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


def check_config_ints(path: str) -> None:
    """No integer in a model config beyond MAX_CONFIG_INT: libraries expand counts into Python lists before
    making a single tensor (diffusers: one entry per layer), so layers_per_block = 10^9 is 8 GB of list."""
    if not os.path.isfile(path):
        return  # the library's loader names the missing file
    stack = [("", load_json(path, "model config", foreign=True))]
    while stack:
        key, v = stack.pop()
        if isinstance(v, dict):
            stack.extend((f"{key}.{k}" if key else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((key, x) for x in v)
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_CONFIG_INT \
                and not key.endswith("theta"):  # rotary bases (rope_theta) are not counts
            raise FolderError(f"{path}: {key} = {v} is beyond any model's size (at most {MAX_CONFIG_INT:,})")


def check_component(folder: str, cls: type[nn.Module], lib: str) -> None:
    """Build the ``lib`` ("diffusers" / "transformers") model class ``cls`` from ``folder``'s config on the meta
    device within its weights' budget; tensors named alike must have the same shape; for diffusers models, whose
    checkpoints name their tensors as the model does, the names must match both ways too (transformers' text
    encoders can have tied or renamed tensors, which it maps)."""
    strict = lib == "diffusers"
    if strict:
        stems, build = ("diffusion_pytorch_model",), lambda: cls.from_config(cls.load_config(folder,
                                                                                             local_files_only=True))
    else:
        stems, build = ("model",), lambda: cls._from_config(cls.config_class.from_pretrained(folder,
                                                                                             local_files_only=True))
    check_config_ints(os.path.join(folder, "config.json"))
    shapes = weight_shapes(folder, stems)
    if shapes is None:  # pickled weights: their bytes bound the values (no tensor is under a byte)
        pickles = [os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".bin")]
        if not pickles:
            return  # no weights at all: from_pretrained says so before it builds anything
        held = sum(check_regular(p, "weights file") for p in pickles)
        n_held, strict, holds = held, False, f"{held:,} bytes"
    else:
        held, n_held = sum(math.prod(s) for s in shapes.values()), len(shapes)
        holds = f"{held:,} values in {n_held:,} tensors"
    budget = _Budget(BUDGET_FACTOR * held + BUDGET_SLACK_VALUES, BUDGET_FACTOR * n_held + BUDGET_SLACK_TENSORS)
    try:
        with torch.device("meta"), budget, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Initializing zero-element tensors is a no-op"
            model = build()
    except _Budget.Exceeded:
        raise FolderError(f"{folder}: its config.json describes a model far larger than its weights (over "
                          f"{budget.values:,} values in {budget.tensors:,} tensors; the weights hold {holds}); "
                          "refusing to build it") from None
    except FewstepError:
        raise
    except Exception as exc:  # noqa: BLE001 — a config field of the wrong type fails anywhere in the library
        raise FolderError(f"{folder}: its config.json does not build ({type(exc).__name__}: {one_line(exc, 200)})") \
            from None
    if shapes is None:
        return
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if strict:  # diffusers' own loader renames the attention tensors of checkpoints from before 0.14
        shapes = {k.replace(".query.", ".to_q.").replace(".key.", ".to_k.").replace(".value.", ".to_v.")
                  .replace(".proj_attn.", ".to_out.0."): v for k, v in shapes.items()}
        missing = [k for k in want if k not in shapes]
        if missing:
            raise FolderError(f"{folder}: its weights lack {len(missing)} of the {len(want)} tensors its config.json "
                              f"describes (first: {missing[0]}): the weights are incomplete or another model's")
        extra = [k for k in shapes if k not in want]
        if extra:  # diffusers would drop them with a warning: a model without, say, its attention
            raise FolderError(f"{folder}: its weights hold {len(extra)} tensors its config.json has no place for "
                              f"(first: {extra[0]}); config and weights are from different models")
    for k, s in want.items():  # not strict: tensors under other names (tied, renamed) are the loader's to map
        if k in shapes and shapes[k] != s:
            raise FolderError(f"{folder}: {k} is {list(s)} in its config.json but {list(shapes[k])} in its weights; "
                              "config and weights are from different models")
