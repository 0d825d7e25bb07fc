"""`fewstep export --attention ort` (issue 16): diffusers' attention layers traced as ONNX Runtime's fused
MultiHeadAttention. Every attention layer of the pipeline (UNet at every evaluation, the VAE's mid-block) becomes
one contrib node and no Softmax is left; the engine stays within verify's derived float32 tolerance of the
executor (the fused node counted as the four roundings it replaces); the C++ runtime runs it bit-identically to
ONNX Runtime from Python; what cannot take it (TensorRT, bfloat16, a model without diffusers attention) says so in
one line.
"""

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from pipeline_fixtures import build_sd  # noqa: E402

from fewstep.export import onnx as xo  # noqa: E402

NFE = 2


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """The tiny SD folder and its DPM++(2M) sampler exported with --decode twice: standard ops and fused."""
    from fewstep.runtime.models import load
    from fewstep.runtime.solvers import build

    d = tmp_path_factory.mktemp("attention")
    folder = build_sd(str(d / "sd"))
    m = load(folder)
    plan = build("dpmpp-2m", NFE, m.denoiser.sigma_min, m.denoiser.sigma_max)
    out = {"folder": folder, "model": m, "plan": plan}
    for kind in ("onnx", "ort"):
        out[kind] = str(d / f"{kind}.onnx")
        out[kind + "_contract"] = xo.export_teacher(folder, plan, out[kind], decode=True, attention=kind).contract
    return out


def _ops(path):
    m = onnx.load(path)
    return [(n.domain, n.op_type) for n in m.graph.node], {o.domain: o.version for o in m.opset_import}


def _attention_layers(m):
    from diffusers.models.attention_processor import Attention

    # the VAE's decoder half only: its encoder never runs in a --decode engine
    return (sum(isinstance(x, Attention) for x in m.denoiser.modules()),
            sum(isinstance(x, Attention) for x in m.decoder().vae.decoder.modules()))


def test_every_attention_layer_is_one_fused_node(sd):
    unet, vae = _attention_layers(sd["model"])
    assert unet > 0 and vae > 0
    ops, opsets = _ops(sd["ort"])
    assert ops.count(("com.microsoft", "MultiHeadAttention")) == NFE * unet + vae
    assert ("", "Softmax") not in ops and opsets["com.microsoft"] == 1
    plain, _ = _ops(sd["onnx"])
    assert ("com.microsoft", "MultiHeadAttention") not in plain and plain.count(("", "Softmax")) == NFE * unet + vae
    assert xo.read_metadata(sd["ort"])["fewstep.attention"] == "ort"
    assert "fewstep.attention" not in xo.read_metadata(sd["onnx"])
    assert sd["ort_contract"] == sd["onnx_contract"]  # same interface: a drop-in engine


def test_fused_engine_matches_executor_within_derived_tolerance(sd):
    from fewstep.export.verify import engine_tolerance, verify

    # the bound counts each fused node as its four roundings (scale, Q·Kᵀ, Softmax, ·V); the plain path also counts
    # the 1/√d arithmetic on the shape, so the fused engine's bound is a little tighter, never looser
    assert 0 < engine_tolerance(sd["ort"]) <= engine_tolerance(sd["onnx"])
    for seed in (0, 1):
        v = verify(sd["ort"], model=sd["folder"], batch=3, seed=seed, guidance=4.0)
        assert v.passed, v.line()


def test_cpp_runtime_runs_fused_engine_like_onnxruntime(sd):
    from fewstep import _C

    feeds = xo.example_inputs(sd["ort_contract"], 2, seed=5, guidance=3.0)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    want = ort.InferenceSession(sd["ort"], so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    got = _C.Engine(sd["ort"], threads=1).sample(5, 2, inputs={k: v for k, v in feeds.items() if k != "z"})
    assert np.array_equal(got, want)  # same library, same graph, same thread count: bitwise


def test_what_cannot_take_fused_attention_is_one_line(sd, tmp_path):
    from fewstep.export.tensorrt import TensorRTBuildError, build_tensorrt

    with pytest.raises(TensorRTBuildError, match="--attention ort.*TensorRT cannot parse"):
        build_tensorrt(sd["ort"], tmp_path / "e.plan")
    with pytest.raises(xo.ExportError, match="no bfloat16 kernel"):
        xo.export_teacher(sd["folder"], sd["plan"], str(tmp_path / "b.onnx"), dtype="bf16", attention="ort")
    with pytest.raises(xo.ExportError, match="must be one of onnx, ort"):
        xo.export_teacher(sd["folder"], sd["plan"], str(tmp_path / "x.onnx"), attention="flash")
    for argv, match in ((["--model", "digits", "--solver", "ddim", "--nfe", "2"], "no attention layer to fuse"),
                        (["--model", sd["folder"], "--solver", "ddim", "--nfe", "2", "--tensorrt"],
                         "--tensorrt needs --attention onnx")):
        p = subprocess.run([sys.executable, "-m", "fewstep", "export", *argv, "--attention", "ort",
                            "--out", str(tmp_path / "c.onnx")], capture_output=True, text=True, timeout=600,
                           cwd="/")  # `python -m` puts the cwd first on sys.path: not the repo root's fewstep/
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and match in p.stderr, p.stderr
    assert not list(tmp_path.glob("*.onnx"))  # refused before anything was written
