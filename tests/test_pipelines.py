"""Text-to-image pipelines (runtime/pipelines.py) through load, conditioning, sampling, fitting and export, and
peer checks against diffusers' own pipelines.

Tiny random-weight pipeline folders built from configs (tests/pipeline_fixtures.py), loaded back by path as
a user's folder is; never downloaded. Peers: with the same initial latents and embeddings, fewstep's DDIM,
Euler, DPM-Solver++(2M) and UniPC plans against StableDiffusion(XL)Pipeline with the matching scheduler —
in float64 to 1e-8, and in stock float32 to the exported engine's derived tolerance — and SD3's
FlowMatchEuler against fewstep's Euler (float32).

Peer bound, float64: both sides run one float64 network on the same float32 time embedding (diffusers and
the adapter both embed t in float32) and the same σ's; they differ in the order of float64 operations only.
peers.rounding_bound with ops = 2000 (a tiny UNet pass, attention and CFG included, is < 2000 roundings deep)
gives < 1e-11 at 4 calls; 1e-8 sits above that and below one float32 rounding anywhere in the path (2⁻²⁴ =
6e-8 relative), so it also proves the run never drops to float32. A wrong row coefficient or σ moves the
latents by ≥ 1e-4.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from pipeline_fixtures import build_sd, build_sd3, build_sdxl  # noqa: E402

from fewstep.runtime import sample  # noqa: E402
from fewstep.runtime.models import load  # noqa: E402
from fewstep.runtime.pipelines import NEG, NamedCond, PipelineError, read_embeddings, save_embeddings  # noqa: E402
from fewstep.runtime.solvers import get  # noqa: E402

F64 = torch.float64
W = 3.0  # CFG scale of the peer runs
SOLVERS = {  # fewstep plan ↔ diffusers scheduler (the configs the existing solver peer checks use)
    "ddim": lambda cfg: diffusers.DDIMScheduler.from_config(cfg),
    "euler": lambda cfg: diffusers.EulerDiscreteScheduler.from_config(cfg),
    "dpmpp-2m": lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(
        cfg, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", lower_order_final=True),
    "unipc": lambda cfg: diffusers.UniPCMultistepScheduler.from_config(
        cfg, solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, final_sigmas_type="zero"),
}
PLAN_OF = {"ddim": "ddim", "euler": "ddim", "dpmpp-2m": "dpmpp-2m", "unipc": "unipc"}  # Euler = DDIM (README)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": build_sd(str(root / "sd")), "sd-v": build_sd(str(root / "sd-v"), "v_prediction"),
            "sdxl": build_sdxl(str(root / "sdxl")), "sd3": build_sd3(str(root / "sd3"))}


def _embeddings(model, n: int, seed: int, dtype=torch.float32) -> NamedCond:
    """Random conditioning and negatives under the model's input names (SDXL's time ids: its own sizes)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in model.cond_inputs:
        for name in (spec["name"], NEG + spec["name"]):
            out[name] = torch.randn(n, *spec["shape"], generator=g, dtype=dtype)
    if "time_ids" in out:
        out["time_ids"] = out[NEG + "time_ids"] = torch.tensor([[16, 16, 0, 0, 16, 16]], dtype=dtype).expand(n, 6)
    return NamedCond(out)


_CACHE: dict = {}


def _cached(kind: str, folder: str, dtype):
    """diffusers' pipeline / fewstep's model of a folder in ``dtype``, loaded once per module run."""
    key = (kind, folder, dtype)
    if key not in _CACHE:
        if kind == "diffusers":
            _CACHE[key] = _diffusers_pipe(folder).to(dtype)
        else:
            m = load(folder)
            m.denoiser.model.to(dtype)
            _CACHE[key] = m
    return _CACHE[key]


def _diffusers_pipe(folder: str):
    """diffusers' own pipeline from the folder (the SD3 folders here have no T5: said explicitly, as diffusers asks)."""
    kw = {"text_encoder_3": None, "tokenizer_3": None} if folder.endswith("sd3") else {}
    if folder.rstrip("/").split("/")[-1].startswith("sd") and not folder.endswith(("sdxl", "sd3")):
        kw["safety_checker"] = None
    return diffusers.DiffusionPipeline.from_pretrained(folder, **kw)


# --- loading and conditioning -----------------------------------------------------------------------------
def test_families_and_inputs(folders):
    want = {"sd": {"encoder_hidden_states": [77, 16]},
            "sdxl": {"encoder_hidden_states": [77, 32], "text_embeds": [16], "time_ids": [6]},
            "sd3": {"encoder_hidden_states": [77 + 256, 32], "pooled_projections": [32]}}
    for key, inputs in want.items():
        m = load(folders[key])
        assert m.kind == "diffusers" and m.pipeline.family == key and m.shape == (4, 8, 8)
        assert {c["name"]: c["shape"] for c in m.cond_inputs} == inputs
        assert m.denoiser.guidance_mode == "cfg"
    assert type(load(folders["sd-v"]).denoiser).__name__ == "PipelineVPVDenoiser"
    assert type(load(folders["sd3"]).denoiser).__name__ == "PipelineFlowDenoiser"


@pytest.mark.parametrize("key", ["sd", "sdxl", "sd3"])
def test_prompts_encode_as_diffusers_does(folders, key):
    from fewstep.runtime.pipelines import CondSource

    m = load(folders[key])
    # distinct prompts: both sides encode batches of 2 (BLAS results may depend on the batch in the last bit)
    src = CondSource(m.pipeline, ("a cat", "a red dog"), ("blurry", "dark"))
    cond = src(2)
    pipe = _diffusers_pipe(folders[key])
    if key == "sd":
        pe, ne = pipe.encode_prompt(["a cat", "a red dog"], "cpu", 1, True, ["blurry", "dark"])
        theirs = {"encoder_hidden_states": pe, NEG + "encoder_hidden_states": ne}
    elif key == "sdxl":
        pe, ne, pp, npp = pipe.encode_prompt(["a cat", "a red dog"], device="cpu", negative_prompt=["blurry", "dark"])
        theirs = {"encoder_hidden_states": pe, NEG + "encoder_hidden_states": ne, "text_embeds": pp,
                  NEG + "text_embeds": npp}
    else:
        pe, ne, pp, npp = pipe.encode_prompt(["a cat", "a red dog"], None, None, device="cpu",
                                             negative_prompt=["blurry", "dark"])
        theirs = {"encoder_hidden_states": pe, NEG + "encoder_hidden_states": ne, "pooled_projections": pp,
                  NEG + "pooled_projections": npp}
    for k, v in theirs.items():  # the same encoders on the same tokens: the same float32 ops, bit for bit
        assert torch.equal(cond[k], v.float()), k
    if key == "sdxl":  # no negative prompt: SDXL's force_zeros_for_empty_prompt
        z = CondSource(m.pipeline, ("a cat",))(1)
        assert not z[NEG + "encoder_hidden_states"].any() and not z[NEG + "text_embeds"].any()
        assert torch.equal(z[NEG + "time_ids"], z["time_ids"])


def test_embeddings_file_is_checked(folders, tmp_path):
    m = load(folders["sdxl"])
    specs = m.pipeline.cond_inputs
    good = _embeddings(m, 3, 0)
    p = str(tmp_path / "e.safetensors")
    save_embeddings(p, good)
    got = read_embeddings(p, specs, 1 << 25)
    assert all(torch.equal(got[k], good[k]) for k in good)

    def bad(cond, match, raw=None):
        q = str(tmp_path / "bad.safetensors")
        if raw is not None:
            with open(q, "wb") as f:
                f.write(raw)
        else:
            save_embeddings(q, cond)
        with pytest.raises(PipelineError, match=match):
            read_embeddings(q, specs, 1 << 25)

    bad({**good, "prompt": good["time_ids"]}, "unknown tensor 'prompt'")
    bad({k: v for k, v in good.items() if k != "text_embeds"}, "missing text_embeds")
    bad({**good, "text_embeds": torch.zeros(3, 15)}, r"text_embeds has shape \[3, 15\]")
    bad({**good, "text_embeds": torch.full((3, 16), float("nan"))}, "NaN or inf")
    bad({**good, "text_embeds": torch.zeros(2, 16)}, "different numbers of rows")
    with open(p, "rb") as f:
        data = f.read()
    bad(None, "header of", raw=(1 << 40).to_bytes(8, "little") + data[8:])
    bad(None, "offsets do not match", raw=data[:-4])
    # header edits with the data kept: a non-float dtype of the right size; two tensors over the same bytes
    hlen = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + hlen])

    def edited(**entries):
        h = json.dumps({**header, **{k: {**header[k], **v} for k, v in entries.items()}}).encode()
        return len(h).to_bytes(8, "little") + h + data[8 + hlen:]

    bad(None, "text_embeds is I32; float tensors only", raw=edited(text_embeds={"dtype": "I32"}))
    bad(None, "'negative_text_embeds' and 'text_embeds' share bytes",
        raw=edited(negative_text_embeds={"data_offsets": header["text_embeds"]["data_offsets"]}))
    with pytest.raises(PipelineError, match="more than 100 values"):
        read_embeddings(p, specs, 100)


# --- peers: diffusers' pipelines with the matching schedulers ----------------------------------------------
class _Float64Torch:
    """`torch` as diffusers' Euler and DPM-Solver modules see it, with float32 meaning float64 (their steps cast
    the sample to float32, which bounds any comparison at ~1e-7; the stock float32 run is checked separately)."""

    float32 = torch.float64

    def __getattr__(self, name):
        return getattr(torch, name)


def _float64_tables(sch, ac: torch.Tensor):
    """The scheduler on our float64 ᾱ table, and its σ's at its own timesteps in float64 (diffusers stores
    both in float32); the timesteps, and so the grid, are diffusers' own."""
    sch.alphas_cumprod = ac
    if hasattr(sch, "final_alpha_cumprod"):
        sch.final_alpha_cumprod = torch.tensor(1.0, dtype=F64) if sch.config.set_alpha_to_one else ac[0]
    orig = sch.set_timesteps

    def set_timesteps(*a, **kw):
        orig(*a, **kw)
        if getattr(sch, "sigmas", None) is not None:
            s = ((1 - ac) / ac).sqrt()[sch.timesteps.long()]
            sch.sigmas = torch.cat([s, torch.zeros(1, dtype=F64)])

    sch.set_timesteps = set_timesteps
    return sch


def _grid(sch, ac: torch.Tensor) -> np.ndarray:
    """The σ's the scheduler steps through (our float64 table at its timesteps) and where it ends: 0, or for
    DDIM without set_alpha_to_one σ(t = 0)."""
    s = ((1 - ac) / ac).sqrt()
    sig = s[sch.timesteps.long()].numpy()
    if isinstance(sch, diffusers.DDIMScheduler):
        return np.append(sig, 0.0 if sch.config.set_alpha_to_one else float(s[0]))
    return np.append(sig, 0.0)


def _peer(folder: str, key: str, solver: str, n: int, dtype, z, cond):
    """(fewstep's final state in the scheduler's coordinates, diffusers' latents, the grid)."""
    from fewstep.runtime.diffusers_adapter import alphas_cumprod_from_config

    pipe = _cached("diffusers", folder, dtype)
    ac = alphas_cumprod_from_config(pipe.scheduler.config)
    sch = SOLVERS[solver](pipe.scheduler.config)
    if dtype == F64:
        _float64_tables(sch, ac)
    pipe.scheduler = sch
    sch.set_timesteps(n)
    grid = _grid(sch, ac)
    ve = isinstance(sch, diffusers.EulerDiscreteScheduler)  # Euler's state is x_σ; the others' x_σ/√(1+σ²)
    s0 = grid[0] * z.to(dtype) / (1.0 if ve else np.sqrt(1 + grid[0] ** 2))
    kw = {"prompt_embeds": cond["encoder_hidden_states"].to(dtype),
          "negative_prompt_embeds": cond[NEG + "encoder_hidden_states"].to(dtype)}
    if key == "sdxl":
        kw.update(pooled_prompt_embeds=cond["text_embeds"].to(dtype),
                  negative_pooled_prompt_embeds=cond[NEG + "text_embeds"].to(dtype))
    import diffusers.schedulers.scheduling_dpmsolver_multistep as dpm_module
    import diffusers.schedulers.scheduling_euler_discrete as euler_module

    patch = pytest.MonkeyPatch()
    if dtype == F64:
        for module in (euler_module, dpm_module):
            patch.setattr(module, "torch", _Float64Torch())
    try:
        with torch.no_grad():
            theirs = pipe(num_inference_steps=n, guidance_scale=W, latents=s0 / sch.init_noise_sigma,
                          output_type="latent", **kw).images
    finally:
        patch.undo()
    m = _cached("fewstep", folder, dtype)
    plan = get(PLAN_OF[solver]).build(grid)
    with torch.no_grad():
        ours = sample(plan, m.denoiser, z.to(dtype), cond=NamedCond({k: v.to(dtype) for k, v in cond.items()}),
                      guidance=W)
    if not ve:
        ours = ours / np.sqrt(1 + grid[-1] ** 2)
    return ours, theirs, plan


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("key", ["sd", "sd-v", "sdxl"])
def test_peer_float64(folders, key):
    m = _cached("fewstep", folders[key], F64)
    z = torch.randn(2, *m.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    cond = _embeddings(m, 2, 2, F64)
    outs = {}
    for solver in SOLVERS:
        ours, theirs, _ = _peer(folders[key], key.removesuffix("-v"), solver, 4, F64, z, cond)
        assert _rel(ours, theirs) <= 1e-8, (solver, _rel(ours, theirs))
        outs[solver] = theirs
    # the check can fail: the four samplers give different latents (≥ 1e-4 apart), so a plan matched to the
    # wrong scheduler would not pass
    assert _rel(outs["ddim"], outs["dpmpp-2m"]) > 1e-4 and _rel(outs["dpmpp-2m"], outs["unipc"]) > 1e-4


@pytest.fixture(scope="module")
def sd_engine(folders, tmp_path_factory):
    """The tiny SD's DPM++(2M) sampler at 2 NFE as one engine (named inputs, guidance input, CFG in the graph)."""
    from fewstep.export.onnx import export_teacher

    pytest.importorskip("onnx")
    m = load(folders["sd"])
    plan = get("dpmpp-2m").build(np.append(np.geomspace(m.denoiser.sigma_max, 0.1, 2), 0.0))
    path = str(tmp_path_factory.mktemp("eng") / "sd.onnx")
    return path, export_teacher(folders["sd"], plan, path), plan


def _export_tolerance(folder: str, nfe: int, tmp) -> float:
    """verify's derived float32 tolerance 2·g_w·R·u for an NFE-pass sampler over this network: R = NFE × (the
    rounding depth of one exported denoiser pass + 3 for CFG's combine + 10 for a row's update), the passes
    being chained through the state (export/verify.py). Counted on the step graph: one short trace."""
    import onnx

    from fewstep.export.onnx import export_teacher
    from fewstep.export.verify import rounding_depth, tolerance

    path = str(tmp / f"step-{os.path.basename(folder)}.onnx")
    export_teacher(folder, None, path, step_graph=True, guidance_input=False)
    return tolerance("float32", nfe * (rounding_depth(onnx.load(path)) + 3 + 10), (W,))


@pytest.mark.parametrize("key", ["sd", "sdxl"])
def test_peer_float32_within_export_tolerance(folders, key, tmp_path):
    """Stock diffusers (float32 tables, σ's and states) against fewstep's float32 executor, within the
    tolerance verify derives for the exported 4-NFE engine. diffusers' float32 ᾱ table is part of its
    rounding: a product of ≤ 1,000 float32 factors, under R."""
    tol = _export_tolerance(folders[key], 4, tmp_path)
    m = _cached("fewstep", folders[key], torch.float32)
    z = torch.randn(2, *m.shape, generator=torch.Generator().manual_seed(3))
    cond = _embeddings(m, 2, 4)
    for solver in SOLVERS:
        ours, theirs, _ = _peer(folders[key], key, solver, 4, torch.float32, z, cond)
        assert _rel(ours, theirs) <= tol, (solver, _rel(ours, theirs), tol)


def test_peer_sd3_flowmatch_euler(folders, tmp_path):
    """SD3's FlowMatchEulerDiscreteScheduler ↔ fewstep's Euler (DDIM is Euler in flow coordinates), float32.

    diffusers' grid starts at t = 1 (σ = ∞), which no σ grid holds: both start from its second point's state
    (diffusers given ``sigmas`` that begin there). Bound: as the float32 test above."""
    pipe = _diffusers_pipe(folders["sd3"])
    m = load(folders["sd3"])
    z = torch.randn(2, *m.shape, generator=torch.Generator().manual_seed(5))
    cond = _embeddings(m, 2, 6)
    unshifted = [0.9, 0.65, 0.4, 0.15]
    pipe.scheduler.set_timesteps(sigmas=unshifted)
    t = pipe.scheduler.sigmas.double().numpy()  # shifted by 3, ending at 0
    with torch.no_grad():
        theirs = pipe(num_inference_steps=4, sigmas=unshifted, guidance_scale=W, latents=float(t[0]) * z,
                      output_type="latent", prompt_embeds=cond["encoder_hidden_states"],
                      negative_prompt_embeds=cond[NEG + "encoder_hidden_states"],
                      pooled_prompt_embeds=cond["pooled_projections"],
                      negative_pooled_prompt_embeds=cond[NEG + "pooled_projections"]).images
    grid = np.append(t[:-1] / (1 - t[:-1]), 0.0)
    with torch.no_grad():
        ours = sample(get("ddim").build(grid), m.denoiser, z, cond=cond, guidance=W)
    tol = _export_tolerance(folders["sd3"], 4, tmp_path)
    assert _rel(ours, theirs) <= tol, (_rel(ours, theirs), tol)
    assert _rel(ours, theirs * 1.01) > tol  # a 1% different sample fails


@contextmanager
def _unshared(den):
    """Within: this denoiser's network shares nothing (its instance's ``cfg_prefix`` shadowed by an empty one), so a
    guided call is the plain 2B-row call."""
    den.model.cfg_prefix = lambda: []
    try:
        yield
    finally:
        del den.model.cfg_prefix


@pytest.mark.parametrize("key", ["sd", "sdxl", "sd3"])
def test_cfg_halves_share_the_prefix(folders, key):
    """CFG's two halves share x and σ, so an SD UNet runs conv_in … the first self-attention once for both
    (``Denoiser.shared_rows``): the guided call's prefix sees B rows, not 2B, and gives what the 2B-row call gives
    (float64: the two differ only in how a batch is blocked, ≪ 1e-10 relative). SDXL's time embedding carries
    the pooled prompt and SD3's blocks take it from the start: nothing is shared there."""
    m = _cached("fewstep", folders[key], F64)
    den = m.denoiser
    prefix = den.model.cfg_prefix()
    if key != "sd":
        assert prefix == []
        return
    back = den.model.backbone
    blk = back.down_blocks[0].attentions[0].transformer_blocks[0]
    assert prefix[0] is back.conv_in and prefix[-1] is blk.attn1 and back.down_blocks[0].resnets[0] in prefix
    n = 3
    x = torch.randn(n, *m.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    sig = torch.full((n,), 4.0, dtype=F64)
    cond = _embeddings(m, n, 9, F64)
    rows = {}

    def seen(name):
        def hook(_m, a):
            rows.setdefault(name, a[0].shape[0])  # returns None: the input is left as it is
        return hook

    watched = {"conv_in": back.conv_in, "q1": blk.attn1.to_q, "q2": blk.attn2.to_q}
    hooks = [mod.register_forward_pre_hook(seen(name)) for name, mod in watched.items()]
    try:
        with torch.no_grad():
            shared = den(x, sig, cond, W)
    finally:
        for h in hooks:
            h.remove()
    # conv_in's own pre-hook runs before the sharing one: it sees 2n; inside attn1, to_q sees n; attn2 takes 2n
    assert rows == {"conv_in": 2 * n, "q1": n, "q2": 2 * n}
    assert not any(mod._forward_pre_hooks or mod._forward_hooks for mod in prefix)  # removed after the call
    with _unshared(den), torch.no_grad():
        plain = den(x, sig, cond, W)
    assert _rel(shared, plain) <= 1e-10, _rel(shared, plain)
    assert _rel(shared, den(x, sig, cond, W * 1.001)) > 1e-6  # the comparison can fail


def test_bare_unet_with_linear_projection_shares_the_prefix():
    """The same sharing through ``from_diffusers`` (a bare UNet2DConditionModel, the stored empty-prompt embedding as
    the unconditional input) on SD 2.x's layout, whose transformers project in with a Linear on [B, HW, C]."""
    from pipeline_fixtures import _unet, sd_scheduler

    from fewstep.runtime.diffusers_adapter import from_diffusers

    unet = _unet(3, 16, use_linear_projection=True).to(F64)
    g = torch.Generator().manual_seed(12)
    den = from_diffusers(unet, sd_scheduler("v_prediction"), uncond=torch.randn(1, 77, 16, generator=g, dtype=F64))
    prefix = den.model.cfg_prefix()
    proj_in = unet.down_blocks[0].attentions[0].proj_in
    assert type(proj_in) is torch.nn.Linear and proj_in in prefix and len(prefix) == 6
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=F64)
    sig = torch.full((2,), 2.0, dtype=F64)
    cond = torch.randn(2, 77, 16, generator=g, dtype=F64)
    with torch.no_grad():
        shared = den(x, sig, cond, W)
        with _unshared(den):
            plain = den(x, sig, cond, W)
    assert _rel(shared, plain) <= 1e-10, _rel(shared, plain)


def test_fast_path_shares_the_prefix(folders):
    """The fast path (one fused update per evaluation, here its torch reference) calls the network on its 2B-row
    buffer whose halves are one x: the prefix runs on B rows there too, and the sample is the fast path's without
    the sharing (float64, ≪ 1e-10 relative, as above)."""
    from fewstep.runtime import fast

    m = _cached("fewstep", folders["sd"], F64)
    den = m.denoiser
    q1 = den.model.backbone.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    plan = get("dpmpp-2m").build(np.append(np.geomspace(den.sigma_max, 0.1, 3), 0.0))
    z = torch.randn(2, *m.shape, generator=torch.Generator().manual_seed(10), dtype=F64)
    cond = _embeddings(m, 2, 11, F64)
    rows = []
    h = q1.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]) and None)
    try:
        with torch.no_grad():
            out = fast.sample(plan, den, z, cond=cond, guidance=W, use_kernel=False)
    finally:
        h.remove()
    assert rows == [2] * plan.nfe
    with _unshared(den), torch.no_grad():
        plain = fast.sample(plan, den, z, cond=cond, guidance=W, use_kernel=False)
    assert _rel(out, plain) <= 1e-10, _rel(out, plain)


# --- export ------------------------------------------------------------------------------------------------
def test_engine_contract_and_verify(folders, sd_engine):
    from fewstep.export.verify import verify

    path, res, _ = sd_engine
    c = res.contract
    assert [(s["name"], s["shape"], s["dtype"]) for s in c["inputs"]] == [
        ("z", ["batch", 4, 8, 8], "float32"),
        ("encoder_hidden_states", ["batch", 77, 16], "float32"),
        ("negative_encoder_hidden_states", ["batch", 77, 16], "float32"),
        ("guidance", ["batch"], "float32")]
    assert c["outputs"] == [{"name": "sample", "dtype": "float32", "shape": ["batch", 4, 8, 8]}]
    # batches other than the traced one: the shared CFG prefix takes and copies rows by the dynamic batch, on
    # both of the graph's row sets (W = 1: B rows; else 2B); verify checks W = 1.5 and W = 1
    for batch in (1, 2, 3):
        v = verify(path, model=folders["sd"], batch=batch)
        assert v.passed, v.line()
    import onnx

    g = onnx.load(path).graph
    made_by = {o: n.op_type for n in g.node for o in n.output}
    conv_in = [n for n in g.node if n.op_type == "Conv" and "conv_in" in n.input[1]]
    assert len(conv_in) == 2 and all(made_by[n.input[0]] == "Slice" for n in conv_in)  # B rows of [x; x]


def test_engine_with_decoder_and_external_data(folders, tmp_path):
    """--decode: noise + embeddings → pixels; external data: the .onnx and one data file beside it."""
    import onnxruntime as ort

    from fewstep.export.onnx import example_inputs, export_teacher
    from fewstep.export.verify import verify

    m = load(folders["sdxl"])
    plan = get("ddim").build(np.append(np.geomspace(m.denoiser.sigma_max, 0.1, 2), 0.0)).replace()
    plan = plan.replace(rows=[r.__class__(**{**r.__dict__, "guidance": 2.0}) for r in plan.rows])
    path = str(tmp_path / "xl.onnx")
    res = export_teacher(folders["sdxl"], plan, path, decode=True, external_data=True)
    c = res.contract
    assert [s["name"] for s in c["inputs"]] == ["z", "encoder_hidden_states", "text_embeds", "time_ids",
                                               NEG + "encoder_hidden_states", NEG + "text_embeds",
                                               NEG + "time_ids"]
    assert c["outputs"][0]["name"] == "image" and c["outputs"][0]["shape"] == ["batch", 3, 16, 16]
    assert sorted(os.listdir(tmp_path)) == ["xl.onnx", "xl.onnx.data"]
    import onnx

    g = onnx.load(path, load_external_data=False).graph
    out_dims = [d.dim_param or d.dim_value for d in g.output[0].type.tensor_type.shape.dim]
    assert out_dims == ["batch", 3, 16, 16]  # the declared output shape is the contract's (not tracer names)
    inits = g.initializer
    big = [t for t in inits if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(len(t.raw_data) < 1024 for t in inits if t.data_location != onnx.TensorProto.EXTERNAL)
    assert os.path.getsize(path + ".data") >= sum(int(e.value) for t in big for e in t.external_data
                                                  if e.key == "length")
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, example_inputs(c, 2))[0]
    assert out.shape == (2, 3, 16, 16) and np.isfinite(out).all()
    v = verify(path, model=folders["sdxl"], batch=2)
    assert v.passed, v.line()


# --- the CLI ------------------------------------------------------------------------------------------------
def _cli(capsys, *args):
    """`fewstep ARGS` in this process (the subprocess start, ~15 s of imports here, is test_cli's to check)."""
    from fewstep.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_sample_fit_export(folders, tmp_path, capsys):
    sd = folders["sd"]
    out = tmp_path / "s"
    rc, _, err = _cli(capsys, "sample", "--model", sd, "--solver", "dpmpp-2m", "--nfe", 3, "--guidance", 4,
                      "--prompt", "a cat", "--prompt", "a dog", "--negative-prompt", "blurry", "--out", out)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "grid.png", "samples.npy"]
    lat = np.load(out / "samples.npy")
    assert lat.shape == (2, 4, 8, 8)
    # the same conditioning as a file: the same latents
    from fewstep.runtime.pipelines import CondSource

    m = load(sd)
    emb = tmp_path / "e.safetensors"
    save_embeddings(str(emb), CondSource(m.pipeline, ("a cat", "a dog"), ("blurry",))(2))
    rc, _, err = _cli(capsys, "sample", "--model", sd, "--solver", "dpmpp-2m", "--nfe", 3, "--guidance", 4,
                      "--embeddings", emb, "--latents", "--out", tmp_path / "e")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "e")) == ["samples.npy"]
    np.testing.assert_array_equal(np.load(tmp_path / "e" / "samples.npy"), lat)
    # one-line errors, exit 2
    for args, msg in [(("--model", sd), "text-conditioned: pass --prompt"),
                      (("--model", sd, "--class", 1, "--prompt", "x"), "not class labels"),
                      (("--model", sd, "--embeddings", tmp_path / "none.safetensors"), "not found"),
                      (("--model", sd, "--embeddings", emb, "--prompt", "x"), "not both"),
                      (("--model", "digits", "--prompt", "x"), "not a text-to-image pipeline")]:
        rc, _, err = _cli(capsys, "sample", *args, "--solver", "ddim", "--nfe", 2, "--out", tmp_path / "x")
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err
    # fit on a batch of prompts, then export the fitted plan with the decoder and verify it
    plan_path = tmp_path / "fit.json"
    rc, _, err = _cli(capsys, "fit", "--model", sd, "--solver", "ddim", "--nfe", 2, "--method", "dode", "--n", 2,
                      "--fine", 2, "--guidance", 2, "--prompt", "a cat", "--prompt", "a dog", "--out", plan_path,
                      "--quiet")
    assert rc == 0, err
    prov = json.loads(plan_path.read_text())["provenance"]
    assert prov["fitted"] and prov["fit_rmse"] <= prov["fit_rmse_base"] and prov["guidance"] == 2
    assert prov["conditioning"] == {"prompts": ["a cat", "a dog"], "negative_prompts": []}
    rc, out, err = _cli(capsys, "export", "--model", sd, "--plan", plan_path, "--decode", "--out", tmp_path / "f.onnx")
    assert rc == 0, err + out  # (verify of a decoding engine: test_engine_with_decoder_and_external_data)
    assert "negative_encoder_hidden_states" in out and "fit" in out


@pytest.mark.parametrize("method", ["iia", "timesteps"])
def test_fitting_methods_take_prompts(folders, method):
    from fewstep.runtime.pipelines import CondSource
    from fewstep.training.fit import FitConfig, fit

    m = load(folders["sd-v"])
    m.cond_source = CondSource(m.pipeline, ("a cat", "a dog"))
    cfg = FitConfig("dpmpp-2m", 2, method, batch=2, fine=2, guidance=1.5, timestep_evals=4)
    plan = fit(m, cfg)
    assert plan.provenance["fitted"] and plan.provenance["fit_rmse"] <= plan.provenance["fit_rmse_base"]
    assert all(r.guidance == 1.5 for r in plan.rows)


def test_learned_plan_takes_prompts(folders):
    """Gradient descent through run_rows slices the fitting batch's named conditioning like labels."""
    from fewstep.runtime.pipelines import CondSource
    from fewstep.training.learned import LearnConfig, fit_learned

    m = load(folders["sd"])
    m.cond_source = CondSource(m.pipeline, ("a cat", "a dog", "a cow"))
    cfg = LearnConfig(rounds=1, coef_steps=2, grid_steps=1, minibatch=2).check()
    plan = fit_learned(m, "ddim", 2, cfg, init_method="dode", batch=3, heldout=2, guidance=1.5)
    assert plan.nfe == 2 and all(r.guidance == 1.5 for r in plan.rows)
    assert plan.provenance["heldout_rmse"] <= plan.provenance["heldout_rmse_init"]
    # the default: the fast init's grids and the Levenberg–Marquardt Jacobian run plans side by side, the named
    # conditioning repeated per plan
    plan = fit_learned(m, "ddim", 2, LearnConfig(lm_rounds=1, budget=None), batch=3, heldout=2, guidance=1.5)
    pv = plan.provenance
    assert pv["init_method"] == "fast" and pv["optimizer"] == "lm" and pv["heldout_rmse"] <= pv["heldout_rmse_init"]


@pytest.mark.parametrize("key", ["sd", "sdxl", "sd3"])
def test_features_read_the_middle_block_unconditionally(folders, key):
    """``Denoiser.features`` (the learned Plan's ``--features`` term) on a pipeline: the UNets' ``mid_block``, SD3's
    middle transformer block; the same tensors a full forward pass with the negative (unconditional) inputs
    gives at that module, the rest of the network not run."""
    m = load(folders[key])
    den = m.denoiser
    mod = den.feature_module()
    back = den.model.backbone
    assert mod is (back.transformer_blocks[len(back.transformer_blocks) // 2] if key == "sd3" else back.mid_block)
    n = 2
    x = torch.randn(n, *m.shape, generator=torch.Generator().manual_seed(1))
    sig = torch.full((n,), 0.7, dtype=torch.float64)
    cond = _embeddings(m, n, 2)
    got = den.features(x, sig, cond)
    seen = []
    handle = mod.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        _, _, c_in, t = den.preconditioning(sig, x.ndim, x.dtype)
        den.run_model(x * c_in, t, den.null_cond(cond))
    finally:
        handle.remove()
    outs = seen[0] if isinstance(seen[0], tuple) else (seen[0],)
    want = torch.cat([o.reshape(n, -1) for o in outs if isinstance(o, torch.Tensor)], 1)
    assert torch.equal(got, want) and not mod._forward_hooks
    assert not torch.equal(got, den.features(x, sig, NamedCond({k: v for k, v in cond.items()
                                                                 if not k.startswith(NEG)})))


def test_learned_plan_with_features_on_a_pipeline(folders):
    """The feature term through a pipeline's named conditioning (LM's side-by-side candidates repeat it)."""
    from fewstep.runtime.pipelines import CondSource
    from fewstep.training.learned import LearnConfig, fit_learned

    m = load(folders["sd"])
    m.cond_source = CondSource(m.pipeline, ("a cat", "a dog", "a cow"))
    plan = fit_learned(m, "ddim", 2, LearnConfig(lm_rounds=1, budget=None, features=0.5), batch=3, heldout=2,
                       guidance=1.5)
    pv = plan.provenance
    assert pv["optimizer"] == "lm" and pv["heldout_score"] <= 1.5 and len(pv["heldout_scales"]) == 2


def test_broken_folders_are_one_line(folders, tmp_path):
    import shutil

    from fewstep.errors import FewstepError
    from fewstep.runtime.models import ModelError

    def broken(edit):
        d = tmp_path / f"b{len(os.listdir(tmp_path))}"
        shutil.copytree(folders["sd"], d)
        edit(d)
        return str(d)

    def config(d, sub, file="config.json", **kw):
        c = json.loads((d / sub / file).read_text())
        c.update(kw)
        (d / sub / file).write_text(json.dumps(c))

    def weights(d, sub, head):
        f = d / sub / "diffusion_pytorch_model.safetensors"
        f.write_bytes(head + f.read_bytes()[len(head):])

    def st_file(header, body):
        h = json.dumps(header).encode()
        return len(h).to_bytes(8, "little") + h + body

    def index(d, **kw):
        idx = json.loads((d / "model_index.json").read_text())
        idx.update(kw)
        (d / "model_index.json").write_text(json.dumps(idx))

    cases = [
        (lambda d: (index(d, unet=[None, None], transformer=["diffusers", "FluxTransformer2DModel"]),
                    shutil.copytree(d / "unet", d / "transformer"),
                    (d / "transformer" / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')),
         "FluxTransformer2DModel is not supported"),
        (lambda d: os.remove(d / "scheduler" / "scheduler_config.json"), "no scheduler/scheduler_config.json"),
        (lambda d: (d / "unet" / "config.json").write_text("{not json"), "unet config"),
        (lambda d: os.remove(d / "unet" / "diffusion_pytorch_model.safetensors"), "cannot load it"),
        # configs that are not their weights': refused before from_pretrained builds them at full size
        (lambda d: config(d, "unet", block_out_channels=[40000, 80000]), "far larger than its weights"),
        (lambda d: config(d, "unet", layers_per_block=10**6), "far larger than its weights"),
        (lambda d: config(d, "unet", block_out_channels=[16, 32]), r"conv_in\.weight is \[16, 4, 3, 3\] in its "
                                                                   r"config\.json but \[8, 4, 3, 3\]"),
        (lambda d: config(d, "unet", layers_per_block=2), "weights lack"),
        (lambda d: config(d, "unet", sample_size=-8), "positive integers"),
        (lambda d: config(d, "tokenizer", "tokenizer_config.json", model_max_length=100000),
         "tokenizer pads prompts to 100000 tokens"),  # was an internal error when prompts were encoded
        (lambda d: weights(d, "unet", (1 << 40).to_bytes(8, "little")), "not a safetensors file"),
        (lambda d: weights(d, "unet", b'\x10\0\0\0\0\0\0\0{"a": [1, 2, 3]}'), "malformed header entry"),
        (lambda d: weights(d, "unet", st_file({k: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for k in "ab"},
                                               bytes(4))), "tensors 'a' and 'b' share bytes"),
        # a backbone entry fewstep cannot read, or one its config contradicts: it was loaded as a bare unet/,
        # a conditional UNet without its prompts
        (lambda d: index(d, unet="UNet2DConditionModel"), r"unet must be a \[library, class\] pair"),
        (lambda d: index(d, unet=["diffusers", "UNet2DModel"]), "names unet class UNet2DModel, but "
                                                                "unet/config.json describes 'UNet2DConditionModel'"),
        (lambda d: (d / "model_index.json").write_text("[]"), "not a JSON object"),
    ]
    for edit, msg in cases:
        with pytest.raises((FewstepError, ModelError), match=msg) as e:  # the CLI's exit-2 errors
            load(broken(edit))
        assert "\n" not in str(e.value)

    # the text encoder and the VAE are built when first used: the same check then
    from fewstep.runtime.pipelines import CondSource

    m = load(broken(lambda d: config(d, "text_encoder", hidden_size=50000, intermediate_size=50000)))
    with pytest.raises(FewstepError, match=r"text_encoder: its config\.json describes a model far larger"):
        CondSource(m.pipeline, ("a cat",))(1)
    m = load(broken(lambda d: config(d, "vae", block_out_channels=[30000, 60000])))
    with pytest.raises(FewstepError, match=r"vae: its config\.json describes a model far larger"):
        m.pipeline.decoder()
    for kw, msg in [({"scaling_factor": 0}, "scaling_factor must be a positive number"),
                    ({"shift_factor": float("nan")}, "shift_factor must be a finite number")]:
        m = load(broken(lambda d, kw=kw: config(d, "vae", **kw)))
        with pytest.raises(FewstepError, match=r"vae/config\.json: " + msg):  # was NaN images / an internal error
            m.pipeline.decoder()

    # found by mutating one config field at a time and running `fewstep sample --prompt` (each was an internal error,
    # a multi-line report, a long stall or a silently different model)
    def run(edit, cond=("a cat",)):
        m = load(broken(edit))
        c = CondSource(m.pipeline, cond)(1)
        x = torch.randn(1, *m.shape)
        m.denoiser(x, torch.full((1,), float(m.denoiser.sigma_max)), c, 2.0)
        m.pipeline.decoder()

    for edit, msg in [
        (lambda d: config(d, "text_encoder", vocab_size=3), r"token_embedding\.weight is \[3, 16\] in its config"),
        (lambda d: config(d, "tokenizer", "tokenizer_config.json", pad_token=5),
         "tokenizer: cannot load the CLIPTokenizer"),
        (lambda d: config(d, "tokenizer", "tokenizer_config.json", pad_token=None), "cannot encode the prompts"),
        (lambda d: config(d, "vae", mid_block_add_attention=False), "tensors its config.json has no place for"),
        (lambda d: config(d, "unet", freq_shift={}), "UNet2DConditionModel of this pipeline fails on its inputs"),
        (lambda d: config(d, "unet", layers_per_block=10**9), r"layers_per_block = 1000000000 is beyond"),
    ]:
        t0 = time.perf_counter()
        with pytest.raises((FewstepError, ModelError), match=msg) as e:
            run(edit)
        assert "\n" not in str(e.value) and time.perf_counter() - t0 < 60  # 10^9 layers: 41 s of list building

    # a sample size no run can hold names the model's size, not --n
    from fewstep.runtime.sampling import make_inputs
    from fewstep.runtime.solvers import get

    m = load(broken(lambda d: config(d, "unet", sample_size=10**7)))
    with pytest.raises(ValueError, match=r"the model's samples are 4×10000000×10000000"):  # InputError
        make_inputs(m, get("ddim").build([m.denoiser.sigma_max, 0.0]), 1, 0)


def test_missing_transformers_is_one_line(folders, monkeypatch):
    """Loading, sampling from --embeddings and export need no transformers; prompts name the missing extra."""
    import sys

    from fewstep.runtime.pipelines import CondSource

    m = load(folders["sd"])
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(PipelineError, match=r"transformers package .*--embeddings"):
        CondSource(m.pipeline, ("a cat",))(1)
