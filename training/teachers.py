"""Resolve a `--model` argument to a denoiser and what the CLI needs to know about it.

`gmm` is the exact mixture (GMM.default), `digits` the shipped class-conditional UNet,
`digits-guided` the shipped distilled students (guidance as an input, 1/2/4/8 steps); a PATH
is a digits-architecture checkpoint written by `fewstep teacher train digits` or `fewstep distill`
(a directory or its .safetensors file), a distilled bundle (a directory with students.json)
or a diffusers model directory.

A bundle holds one W-conditioned student per step count, each with its own Plan: ``load(…,
steps=N)`` picks the N-step student (``Teacher.plans``); without ``steps`` it is the stage-1
student, a denoiser any solver can sample.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from torch import nn

from ..runtime.plan import Plan

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
SHIPPED_BUNDLES = {"digits-guided": os.path.join(WEIGHTS_DIR, "digits_guided")}


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
    plans: dict[str, Plan] | None = None  # a distilled student's own samplers: "deterministic", "stochastic"
    reference_denoiser: nn.Module | None = None  # what eval's reference solve runs (None: this denoiser)

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


def load(model: str, steps: int | None = None) -> Teacher:
    """``steps``: for a distilled bundle, the student with that many steps (ignored by other models)."""
    if model in SHIPPED_BUNDLES:
        return _bundle(SHIPPED_BUNDLES[model], steps, model)
    if model == "gmm":
        from .gmm import GMM

        g = GMM.default()
        return Teacher("gmm", g, g.shape, g.num_classes, g.content_hash(), "gmm")
    if model == "digits":
        return _digits(None)
    if not os.path.exists(model):
        if os.sep in model or model.endswith(".safetensors"):
            raise ModelError(f"model file not found: {model}")
        raise ModelError(f"unknown model {model!r}: use 'digits', 'digits-guided', 'gmm' or a path to a "
                         f"checkpoint")
    if os.path.isdir(model):
        if os.path.exists(os.path.join(model, "students.json")):
            return _bundle(model, steps, model)
        for f in ("digits_teacher.safetensors", "student.safetensors"):
            if os.path.exists(os.path.join(model, f)):
                return _digits(os.path.join(model, f))
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


def bundle_steps(model: str) -> list[int]:
    """The step counts of a distilled bundle's students ([] for any other model)."""
    path = SHIPPED_BUNDLES.get(model, model)
    try:
        with open(os.path.join(path, "students.json")) as f:
            return sorted(int(k) for k in json.load(f).get("students", {}))
    except (OSError, ValueError, AttributeError):
        return []


def _bundle(path: str, steps: int | None, name: str) -> Teacher:
    index_path = os.path.join(path, "students.json")
    try:
        with open(index_path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{name}: no students.json in {path} (not built? see README: make students)") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"{index_path}: not valid JSON ({exc})") from None
    if index.get("format") != "fewstep.students/1":
        raise ModelError(f"{index_path}: not a fewstep student index (format {index.get('format')!r})")
    stage1 = os.path.join(path, index["stage1"])
    ref = _reference(stage1)
    if steps is None:
        t = _digits(stage1)
        t.name, t.reference_denoiser = name, ref
        return t
    students = index["students"]
    if str(steps) not in students:
        have = ", ".join(sorted(students, key=int))
        raise ModelError(f"{name} has distilled students for {have} steps, not {steps}; or sample its "
                         f"guidance-conditioned stage-1 student with --solver NAME --nfe N")
    ent = students[str(steps)]
    t = _digits(os.path.join(path, ent["weights"]))
    t.name = f"{name}@{steps}"
    t.plans = {"deterministic": Plan.load(os.path.join(path, ent["plan"])),
               "stochastic": Plan.load(os.path.join(path, ent["plan_stochastic"]))}
    t.reference_denoiser = ref
    return t


def _reference(stage1: str) -> nn.Module:
    """The model a student's reference solve runs: the original teacher when it is the shipped one (its
    hash is in the stage-1 student's JSON), else the stage-1 student (a denoiser of the same guided ODE)."""
    from .digits import load_teacher, teacher_hash

    with open(stage1[: -len(".safetensors")] + ".json") as f:
        meta = json.load(f)
    if meta.get("teacher_hash") == teacher_hash(None):
        return load_teacher(None)
    return load_teacher(stage1)


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
