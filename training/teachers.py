"""Resolve a `--model` argument to a denoiser and what the CLI needs to know about it.

`gmm` is the exact mixture (GMM.default), `digits` the shipped class-conditional UNet;
a PATH is a digits-architecture checkpoint written by `fewstep teacher train digits`
(a directory or its .safetensors file) or a diffusers model directory.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from torch import nn


class ModelError(ValueError):
    pass


@dataclass
class Teacher:
    name: str
    denoiser: nn.Module
    shape: tuple[int, ...]  # one sample's shape
    num_classes: int | None  # class-conditional models: labels 0..num_classes−1
    content_hash: str
    kind: str  # "digits" | "gmm" | "diffusers"

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


def load(model: str) -> Teacher:
    if model == "gmm":
        from .gmm import GMM

        g = GMM.default()
        return Teacher("gmm", g, g.shape, g.num_classes, g.content_hash(), "gmm")
    if model == "digits":
        return _digits(None)
    if not os.path.exists(model):
        if os.sep in model or model.endswith(".safetensors"):
            raise ModelError(f"model file not found: {model}")
        raise ModelError(f"unknown model {model!r}: use 'digits', 'gmm' or a path to a checkpoint")
    if os.path.isdir(model):
        ckpt = os.path.join(model, "digits_teacher.safetensors")
        if os.path.exists(ckpt):
            return _digits(ckpt)
        if os.path.exists(os.path.join(model, "model_index.json")) or os.path.exists(os.path.join(model, "unet")) \
                or os.path.exists(os.path.join(model, "config.json")):
            return _diffusers(model)
        raise ModelError(f"{model}: no digits_teacher.safetensors and no diffusers model in this directory")
    if model.endswith(".safetensors"):
        return _digits(model)
    raise ModelError(f"{model}: not a model fewstep can load (expected a .safetensors checkpoint or a directory)")


def _digits(path: str | None) -> Teacher:
    from .digits import load_teacher, teacher_hash

    den = load_teacher(path)
    return Teacher("digits" if path is None else path, den, (1, 8, 8), 10, teacher_hash(path), "digits")


def _diffusers(path: str) -> Teacher:
    from ..runtime.diffusers_adapter import load_diffusers

    den = load_diffusers(path)
    unet = den.model.unet
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    h = hashlib.sha256()
    for k, v in sorted(unet.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    ncls = getattr(cfg, "num_class_embeds", None)
    return Teacher(path, den, (cfg.in_channels, size, size), ncls, "sha256:" + h.hexdigest(), "diffusers")
