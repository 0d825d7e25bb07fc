"""Resolve a `--model` argument to a ``Model``: its denoiser and what the CLI needs to know about it.

`gmm` is the exact mixture (GMM.default), `digits` the shipped class-conditional UNet,
`digits-guided` the shipped distilled students (guidance as an input, 1/2/4/8 steps), `digits-dmd2`
the shipped DMD2 generators (1 and 4 steps, W = 1), `digits-cud` the shipped catch-up distilled flow model
(Euler at 1, 2, 4, 8, 16 steps); a PATH
is a digits-architecture checkpoint written by `fewstep teacher train digits` or `fewstep distill`
(a directory or its .safetensors file), a distilled bundle (a directory with students.json)
or a diffusers model directory.

A bundle holds one W-conditioned student per step count, each with its own Plan: ``load(…,
steps=N)`` picks the N-step student (``Model.plans``); without ``steps`` it is the stage-1
student, a denoiser any solver can sample.

The runtime, the exporter and training all load models through ``load``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from torch import nn

from .digits_net import WEIGHTS_DIR
from .plan import Plan

SHIPPED_BUNDLES = {"digits-guided": os.path.join(WEIGHTS_DIR, "digits_guided"),
                   "digits-dmd2": os.path.join(WEIGHTS_DIR, "digits_dmd2"),
                   "digits-cud": os.path.join(WEIGHTS_DIR, "digits_cud")}


class ModelError(ValueError):
    pass


@dataclass
class Model:
    name: str
    denoiser: nn.Module
    shape: tuple[int, ...]  # one sample's shape
    num_classes: int | None  # class-conditional models: labels 0..num_classes−1
    content_hash: str
    kind: str  # "digits" | "gmm" | "diffusers" (a unet folder or a text-to-image pipeline: see ``pipeline``)
    plans: dict[str, Plan] | None = None  # a distilled student's own samplers: "deterministic", "stochastic"
    reference_denoiser: nn.Module | None = None  # what the reference solve runs (None: this denoiser)
    # A text-to-image pipeline (runtime/pipelines.py): named conditioning inputs, text encoders, VAE.
    pipeline: object | None = None
    # The conditioning a run uses when none is given: n → named tensors [n, …] (set from --prompt/--embeddings).
    cond_source: object | None = None

    @property
    def cond_inputs(self) -> list[dict] | None:
        """Named conditioning inputs ({name, shape (per sample), dtype}); None: class labels or nothing."""
        if self.pipeline is None:
            return None
        return [c.spec() for c in self.pipeline.cond_inputs]

    def decoder(self):
        """Latents → pixels (the pipeline's VAE), or None for a model that samples pixels itself."""
        return self.pipeline.decoder() if self.pipeline is not None else None

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


def load(model: str, steps: int | None = None) -> Model:
    """``steps``: for a distilled bundle, the student with that many steps (ignored by other models).

    Whatever is wrong with a user's model files (truncated or foreign safetensors, a config that does
    not match its weights, malformed JSON, a missing file) is one ModelError naming the model."""
    from safetensors import SafetensorError

    from ..errors import FewstepError
    from .files import one_line

    try:
        return _load(model, steps)
    except (ModelError, FewstepError):
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        what = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else one_line(exc)
        if isinstance(exc, KeyError):
            what = f"field {exc} missing"
        raise ModelError(f"model {model}: cannot load it ({what})") from None


def _load(model: str, steps: int | None) -> Model:
    if model in SHIPPED_BUNDLES:
        return _bundle(SHIPPED_BUNDLES[model], steps, model)
    if model == "gmm":
        from .gmm import GMM

        g = GMM.default()
        return Model("gmm", g, g.shape, g.num_classes, g.content_hash(), "gmm")
    if model == "digits":
        return _digits(None)
    if not os.path.exists(model):
        if os.sep in model or model.endswith(".safetensors"):
            raise ModelError(f"model file not found: {model}")
        raise ModelError(f"unknown model {model!r}: use 'digits', 'digits-guided', 'digits-dmd2', 'digits-cud', "
                         f"'gmm' or a path to a checkpoint")
    if os.path.isdir(model):
        if os.path.exists(os.path.join(model, "students.json")):
            return _bundle(model, steps, model)
        for f in ("digits_teacher.safetensors", "student.safetensors"):
            if os.path.exists(os.path.join(model, f)):
                return _digits(os.path.join(model, f))
        if _is_text_pipeline(model):
            return _pipeline(model)
        if os.path.exists(os.path.join(model, "model_index.json")) or os.path.exists(os.path.join(model, "unet")) \
                or os.path.exists(os.path.join(model, "config.json")):
            return _diffusers(model)
        raise ModelError(f"{model}: no digits_teacher.safetensors and no diffusers model in this directory")
    if model.endswith(".safetensors"):
        return _digits(model)
    raise ModelError(f"{model}: not a model fewstep can load (expected a .safetensors checkpoint or a directory)")


def _digits(path: str | None) -> Model:
    from .digits_net import load_teacher, teacher_hash

    den = load_teacher(path)
    return Model("digits" if path is None else path, den, (1, 8, 8), 10, teacher_hash(path), "digits")


def bundle_steps(model: str) -> list[int]:
    """The step counts of a distilled bundle's students ([] for any other model)."""
    path = SHIPPED_BUNDLES.get(model, model)
    try:
        with open(os.path.join(path, "students.json")) as f:
            return sorted(int(k) for k in json.load(f).get("students", {}))
    except (OSError, ValueError, AttributeError):
        return []


def _bundle(path: str, steps: int | None, name: str) -> Model:
    from .files import load_json

    index_path = os.path.join(path, "students.json")
    if not os.path.exists(index_path):
        raise ModelError(f"{name}: no students.json in {path} (not built? see README: make students)")
    index = load_json(index_path, "student index", 1 << 20)
    if not isinstance(index, dict) or index.get("format") != "fewstep.students/1":
        fmt = index.get("format") if isinstance(index, dict) else None
        raise ModelError(f"{index_path}: not a fewstep student index (format {fmt!r})")
    if not isinstance(index.get("students", {}), dict):
        raise ModelError(f"{index_path}: 'students' must be an object of step count → files")
    stage1 = _bundle_file(path, index.get("stage1"), index_path, "stage1")
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
    if not isinstance(ent, dict):
        raise ModelError(f"{index_path}: students[{steps!r}] must be an object")
    t = _digits(_bundle_file(path, ent.get("weights"), index_path, f"students[{steps}].weights"))
    t.name = f"{name}@{steps}"
    t.plans = {"deterministic": Plan.load(_bundle_file(path, ent.get("plan"), index_path, "plan")),
               "stochastic": Plan.load(_bundle_file(path, ent.get("plan_stochastic"), index_path, "plan_stochastic"))}
    t.reference_denoiser = ref
    return t


def _bundle_file(root: str, rel, index_path: str, field: str) -> str:
    """A file a bundle index names: a relative path inside the bundle, nothing else."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
        raise ModelError(f"{index_path}: {field} must be a file name inside the bundle, got {rel!r}")
    full = os.path.join(root, rel)
    if not os.path.isfile(full):
        raise ModelError(f"{index_path}: {field} names {rel}, which is not a file in {root}")
    return full


def _reference(stage1: str) -> nn.Module:
    """The model a student's reference solve runs: the original teacher when it is the shipped one (its
    hash is in the stage-1 student's JSON), else the stage-1 student (a denoiser of the same guided ODE)."""
    from .digits_net import load_teacher, read_meta, teacher_hash

    meta = read_meta(stage1)
    if meta.get("teacher_hash") == teacher_hash(None):
        return load_teacher(None)
    return load_teacher(stage1)


def _diffusers(path: str) -> Model:
    from .diffusers_adapter import load_diffusers

    den = load_diffusers(path)
    unet = den.model.unet
    cfg = unet.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    h = hashlib.sha256()
    for k, v in sorted(unet.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().numpy().tobytes())
    ncls = getattr(cfg, "num_class_embeds", None)
    return Model(path, den, (cfg.in_channels, size, size), ncls, "sha256:" + h.hexdigest(), "diffusers")


def _is_text_pipeline(path: str) -> bool:
    """A pipeline folder whose backbone takes text conditioning (a plain UNet2DModel pipeline stays `_diffusers`).
    A model_index.json whose backbone entry is not a [library, class] pair is refused here: read past, the folder
    would load as a bare unet/ without its prompts."""
    from .files import load_json, one_line

    idx = os.path.join(path, "model_index.json")
    if not os.path.isfile(idx):
        return False
    index = load_json(idx, "model_index.json", 1 << 20)
    if not isinstance(index, dict):
        raise ModelError(f"{idx}: not a JSON object")
    pair = {k: v for k, v in index.items() if k in ("unet", "transformer") and v is not None}
    for k, v in pair.items():
        if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) or x is None for x in v)):
            raise ModelError(f"{idx}: {k} must be a [library, class] pair, got {one_line(repr(v), 80)}")
    unet, transformer = pair.get("unet"), pair.get("transformer")
    cfg_path = os.path.join(path, "unet", "config.json")
    if unet is not None and unet[1] is not None and os.path.isfile(cfg_path):
        cls = load_json(cfg_path, "unet config", 1 << 20)
        cls = cls.get("_class_name") if isinstance(cls, dict) else None
        if cls is not None and cls != unet[1]:  # a UNet2DConditionModel read as the index's UNet2DModel: no prompts
            raise ModelError(f"{idx} names unet class {unet[1]}, but unet/config.json describes "
                             f"{one_line(repr(cls), 80)}")
    # any transformer pipeline comes here too, so an unsupported family (Flux, …) is named as such
    return (unet is not None and unet[1] == "UNet2DConditionModel") \
        or (transformer is not None and transformer[1] is not None)


def _pipeline(path: str) -> Model:
    from .pipelines import PipelineError, content_hash, load_pipeline, pipeline_denoiser

    try:
        pipe = load_pipeline(path)
    except PipelineError as exc:
        raise ModelError(str(exc)) from None
    return Model(path, pipeline_denoiser(pipe), pipe.sample_shape, None, content_hash(pipe.backbone), "diffusers",
                 pipeline=pipe)
