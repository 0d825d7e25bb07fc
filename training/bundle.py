"""A distilled bundle: ``students.json`` (``fewstep.students/1``) naming a stage-1 model and one student per step
count (weights + JSON, a Plan, a stochastic Plan), as `--model BUNDLE` loads it (``runtime/models.py``).

Every distillation method (progressive, DMD2, catch-up) writes the same index; ``ship`` copies any of them.
"""

from __future__ import annotations

import json
import os
import shutil

from ..errors import FewstepError
from ..runtime.files import atomic_write_text

INDEX = "students.json"
INDEX_FORMAT = "fewstep.students/1"
FILE_KEYS = ("weights", "plan", "plan_stochastic")  # a student entry's files


class BundleError(FewstepError):
    pass


def write_index(out_dir: str, index: dict) -> None:
    atomic_write_text(os.path.join(out_dir, INDEX), json.dumps(index, indent=1) + "\n")


def read_index(src: str) -> dict:
    from ..runtime.files import load_json

    path = os.path.join(src, INDEX)
    if not os.path.isfile(path):
        raise BundleError(f"{src}: not a student bundle (no {INDEX})")
    index = load_json(path, "student index", 1 << 20)
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT \
            or not isinstance(index.get("students"), dict):
        raise BundleError(f"{path}: not a {INDEX_FORMAT} index")
    return index


def ship(src: str, dest: str) -> list[str]:
    """Copy a bundle's sampling artifacts (the stage-1 model, every student's weights with their JSON and their
    Plans, the index) from ``src`` to ``dest``, leaving training state behind; returns the files written.

    Files keep their path inside the bundle; a stage-1 model that lives outside it (a run directory beside the
    bundle) is copied in as its last folder and name (``../guided/student.safetensors`` → ``guided/…``)."""
    index = read_index(src)
    rels = [index["stage1"]] + [ent[k] for ent in index["students"].values() for k in FILE_KEYS if k in ent]
    moved = {}
    for rel in dict.fromkeys(rels):
        norm = os.path.normpath(rel)
        moved[rel] = norm if not norm.startswith("..") else os.path.join(*norm.split(os.sep)[-2:])
    written = []
    for rel, new in moved.items():
        pairs = [(rel, new)]
        if rel.endswith(".safetensors"):
            pairs.append((rel[: -len(".safetensors")] + ".json", new[: -len(".safetensors")] + ".json"))
        for a, b in pairs:
            out = os.path.join(dest, b)
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            shutil.copyfile(os.path.join(src, a), out + ".tmp")
            os.replace(out + ".tmp", out)
            written.append(out)
    os.makedirs(dest, exist_ok=True)
    index = {**index, "stage1": moved[index["stage1"]],
             "students": {k: {f: moved[v] if f in FILE_KEYS else v for f, v in ent.items()}
                          for k, ent in index["students"].items()}}
    write_index(dest, index)
    return [*written, os.path.join(dest, INDEX)]
