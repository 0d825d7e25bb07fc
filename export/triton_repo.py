"""A Triton Inference Server model repository for an exported engine.

    DIR/<name>/config.pbtxt        platform "onnxruntime_onnx"
    DIR/<name>/1/model.onnx
    DIR/<name>_trt/config.pbtxt    platform "tensorrt_plan"   (when a TensorRT engine is given)
    DIR/<name>_trt/1/model.plan

``max_batch_size: 0`` with explicit dims, the batch as -1: Triton's implicit batching prepends
the batch to every input, but the contract's ``noise`` is [S, B, …] (batch second), so the
contract's shapes are written as they are. A fixed-batch export writes its fixed size.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile

from ..errors import FewstepError
from ..runtime.plan import atomic_write_text

TRITON_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64", "float16": "TYPE_FP16"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _dims(shape) -> str:
    return "[ " + ", ".join("-1" if d == "batch" else str(int(d)) for d in shape) + " ]"


def _tensor_block(specs) -> str:
    items = []
    for s in specs:
        items.append("  {\n"
                     f"    name: \"{s['name']}\"\n"
                     f"    data_type: {TRITON_TYPES[s['dtype']]}\n"
                     f"    dims: {_dims(s['shape'])}\n"
                     "  }")
    return ",\n".join(items)


def config_pbtxt(name: str, contract: dict, platform: str, meta: dict | None = None) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig) for the contract's tensors."""
    lines = [
        f"name: \"{name}\"",
        f"platform: \"{platform}\"",
        "max_batch_size: 0",
        "input [",
        _tensor_block(contract["inputs"]),
        "]",
        "output [",
        _tensor_block(contract["outputs"]),
        "]",
        "instance_group [ { kind: KIND_AUTO } ]",
    ]
    for key, value in (meta or {}).items():
        lines.append(f"parameters {{ key: \"{key}\" value: {{ string_value: {json.dumps(value)} }} }}")
    return "\n".join(lines) + "\n"


def write_triton_repo(onnx_path, repo_dir, name: str | None = None, engine_path=None) -> list[str]:
    """Write the repository (see the module docstring); returns the model directories written.

    Every check runs first; each file is written atomically; an existing model directory of the
    same name is replaced file by file (other models in ``repo_dir`` are left alone).
    """
    from .onnx import read_metadata

    meta = read_metadata(onnx_path)
    contract = meta["fewstep.contract"]
    name = name or os.path.splitext(os.path.basename(os.fspath(onnx_path)))[0]
    if not _NAME.match(name):
        raise FewstepError(f"Triton model name {name!r}: use letters, digits, '_', '.', '-'")
    if engine_path is not None and not os.path.isfile(engine_path):
        raise FewstepError(f"TensorRT engine not found: {engine_path}")
    repo_dir = os.fspath(repo_dir)
    if os.path.exists(repo_dir) and not os.path.isdir(repo_dir):
        raise FewstepError(f"--triton-repo {repo_dir}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(repo_dir))
    if not os.path.isdir(parent) or not os.access(parent if not os.path.isdir(repo_dir) else repo_dir, os.W_OK):
        raise FewstepError(f"--triton-repo {repo_dir}: cannot write there")
    params = {"fewstep.kind": meta["fewstep.kind"], "fewstep.teacher_hash": meta.get("fewstep.teacher_hash", ""),
              "fewstep.contract": json.dumps(contract)}
    models = [(name, "onnxruntime_onnx", os.fspath(onnx_path), "model.onnx")]
    if engine_path is not None:
        models.append((name + "_trt", "tensorrt_plan", os.fspath(engine_path), "model.plan"))
    written = []
    for model_name, platform, src, fname in models:
        mdir = os.path.join(repo_dir, model_name)
        os.makedirs(os.path.join(mdir, "1"), exist_ok=True)
        # copy to a unique temporary file, then rename: Triton never sees half a model, and an
        # interrupted or failed copy leaves nothing behind
        fd, tmp = tempfile.mkstemp(prefix=f".{fname}.", suffix=".tmp", dir=os.path.join(mdir, "1"))
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, os.path.join(mdir, "1", fname))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        atomic_write_text(os.path.join(mdir, "config.pbtxt"), config_pbtxt(model_name, contract, platform, params))
        written.append(mdir)
    return written


# --- reading back (tests; a minimal parser for the subset written above) ----------------------------------
_TOKEN = re.compile(r'\s*(?:(\{|\}|\[|\]|:|,)|("(?:[^"\\]|\\.)*")|([^\s{}\[\]:,"]+))')


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format → nested dicts; repeated fields become lists. Enough for config.pbtxt."""
    toks = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ValueError(f"pbtxt: cannot parse at {text[pos:pos + 20]!r}")
        pos = m.end()
        tok = m.group(1) or m.group(2) or m.group(3)
        if tok:
            toks.append(tok)

    def value(i):
        t = toks[i]
        if t == "{":
            return message(i + 1, "}")
        if t == "[":
            out = []
            i += 1
            while toks[i] != "]":
                v, i = value(i)
                out.append(v)
                if toks[i] == ",":
                    i += 1
            return out, i + 1
        if t.startswith('"'):
            return json.loads(t), i + 1
        try:
            return int(t), i + 1
        except ValueError:
            return t, i + 1

    def message(i, end):
        d: dict = {}
        while i < len(toks) and toks[i] != end:
            key = toks[i]
            i += 1
            if toks[i] == ":":
                i += 1
            v, i = value(i)
            if key in d:
                d[key] = (d[key] if isinstance(d[key], list) and key in _REPEATED else [d[key]]) + \
                    (v if isinstance(v, list) else [v])
            else:
                d[key] = v
            if i < len(toks) and toks[i] == ",":
                i += 1
        return d, i + 1

    return message(0, None)[0]


_REPEATED = {"input", "output", "parameters", "instance_group", "dims"}

