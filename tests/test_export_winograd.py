"""`fewstep export --conv winograd` (issue 16): wide 3×3 convolutions on small images traced as Winograd F(2×2, 3×3)
in standard ONNX ops. The transform is the convolution (float64, to rounding); an engine with it has fewer Conv
nodes, the same contract, and stays within verify's derived float32 tolerance of the executor (its Add/Sub/MatMul
nodes are counted as roundings like any other); the model's own convolutions are untouched after the export; what
has nothing to rewrite says so in one line.
"""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from fewstep.export import winograd

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from pipeline_fixtures import build_sd  # noqa: E402

from fewstep.export import onnx as xo  # noqa: E402

NFE = 2


@pytest.mark.parametrize("c,o,h,w", [(5, 7, 4, 6), (16, 8, 8, 8), (3, 1, 2, 10)])
def test_winograd_is_the_convolution(c, o, h, w):
    """In float64 the transforms (entries 0, ±1, ±½: exact) and the shorter dot products leave only rounding:
    ≤ 1e-13 of the output's size is ~100 ulps (2.2e-16), far below any wrong tap, transform or tile order (O(1))."""
    torch.manual_seed(c + o)
    conv = nn.Conv2d(c, o, 3, padding=1).double()
    x = torch.randn(3, c, h, w, dtype=torch.float64)
    with torch.no_grad():
        want = conv(x)
        got = winograd.winograd_conv(x, winograd.transformed_weight(conv.weight), conv.bias)
        nobias = winograd.winograd_conv(x, winograd.transformed_weight(conv.weight), None)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-13 * float(want.abs().max())
    assert float((nobias + conv.bias.reshape(1, -1, 1, 1) - want).abs().max()) <= 1e-13 * float(want.abs().max())


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD folder's DPM++(2M) sampler with --decode, plain and with every 3×3 conv rewritten (the tiny
    model's convolutions are narrow, so the channel threshold is lowered for the export)."""
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import build

    d = tmp_path_factory.mktemp("winograd")
    folder = build_sd(str(d / "sd"))
    m = load(folder)
    plan = build("dpmpp-2m", NFE, m.denoiser.sigma_min, m.denoiser.sigma_max)
    out = {"folder": folder, "model": m, "plan": plan}
    for kind in ("onnx", "winograd"):
        out[kind] = str(d / f"{kind}.onnx")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(winograd, "MIN_CHANNELS", 1)
            out[kind + "_contract"] = xo.export_teacher(folder, plan, out[kind], decode=True, conv=kind).contract
    return out


def _count(path, op):
    return sum(n.op_type == op for n in onnx.load(path).graph.node)


def test_winograd_engine_replaces_convs_and_keeps_the_contract(sd):
    plain, wino = _count(sd["onnx"], "Conv"), _count(sd["winograd"], "Conv")
    assert 0 <= wino < plain and _count(sd["winograd"], "DepthToSpace") >= plain - wino
    assert xo.read_metadata(sd["winograd"])["fewstep.conv"] == "winograd"
    assert "fewstep.conv" not in xo.read_metadata(sd["onnx"])
    assert sd["winograd_contract"] == sd["onnx_contract"]
    # the export patched a deep copy for the trace only: the model's convolutions keep their own forward
    assert not any("forward" in vars(m) for m in sd["model"].denoiser.modules() if isinstance(m, nn.Conv2d))


def test_winograd_engine_matches_executor_within_derived_tolerance(sd):
    from fewstep.export.verify import engine_tolerance, verify

    # deeper paths (transforms around each MatMul) give a looser derived bound than the plain engine's
    assert engine_tolerance(sd["winograd"]) >= engine_tolerance(sd["onnx"]) > 0
    for seed in (0, 1):
        v = verify(sd["winograd"], model=sd["folder"], batch=3, seed=seed, guidance=4.0)
        assert v.passed, v.line()
    feeds = xo.example_inputs(sd["onnx_contract"], 2, seed=3, guidance=4.0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    a, b = (ort.InferenceSession(sd[k], so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for k in ("onnx", "winograd"))
    assert a.shape == b.shape and np.all(np.isfinite(b))


def test_nothing_to_rewrite_is_one_line(sd, tmp_path):
    # at the default threshold (≥ 640 input channels) the tiny model has nothing to rewrite
    with pytest.raises(xo.ExportError, match="--conv winograd: .* no 3×3 convolution"):
        xo.export_teacher(sd["folder"], sd["plan"], str(tmp_path / "w.onnx"), conv="winograd")
    with pytest.raises(xo.ExportError, match="must be one of onnx, winograd"):
        xo.export_teacher(sd["folder"], sd["plan"], str(tmp_path / "x.onnx"), conv="fft")
    p = subprocess.run([sys.executable, "-m", "fewstep", "export", "--model", "digits", "--solver", "ddim", "--nfe",
                        "2", "--conv", "winograd", "--out", str(tmp_path / "c.onnx")], capture_output=True, text=True,
                       timeout=600, cwd="/")  # `python -m` puts the cwd first on sys.path: not the repo's fewstep/
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "no 3×3 convolution" in p.stderr, \
        p.stderr
    assert not list(tmp_path.glob("*.onnx"))
