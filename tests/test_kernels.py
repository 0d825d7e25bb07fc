"""The fused update kernel against its torch reference, and the fast executor against the reference executor.

CPU: the Triton kernel runs under TRITON_INTERPRET=1 (set per test with monkeypatch, so a GPU session still
compiles for its GPU tests); the interpreter's cost is per program, so the launcher uses one 65536-element block.
GPU tests (``-m gpu``) skip cleanly without CUDA. Tolerances are derived next to each check.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from peers import rounding_bound  # noqa: E402

from fewstep.kernels import fused_update as fu  # noqa: E402
from fewstep.kernels.fused_update import RowCoefs, fused_update, fused_update_ref, kernel_randn  # noqa: E402
from fewstep.runtime import fast, noise, sample, solvers  # noqa: E402
from fewstep.runtime.gmm import GMM  # noqa: E402
from fewstep.runtime.plan import Row  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative spacing of each storage dtype (one ulp at |v| ≤ 2^k is ≤ 2^(k - mantissa bits)).
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
F32_EPS = 2.0**-24
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _coefs(k: int, rng: random.Random, *, g=0.0, w=1.0, has_next=True) -> RowCoefs:
    """A row reading exactly K history entries, every term non-zero and O(1)."""
    r = lambda: rng.choice([-1, 1]) * rng.uniform(0.2, 1.5)  # noqa: E731
    return RowCoefs(
        a=r(), p=tuple(r() for _ in range(k)), s=r(), c=r(), q=tuple(r() for _ in range(k + 1)), g=g, w=w,
        skip=r(), scale=r(), has_next=has_next, a_next=r(),
        p_next=tuple(r() for _ in range(min(k + 1, fu.MAX_HISTORY))), c_in_next=r(),
    )


def _abs(c: RowCoefs) -> RowCoefs:
    """|coefficients| with −|s| (h = d − s·u): fused_update_ref on |inputs| then bounds Σ|terms| element-wise."""
    a = abs
    return RowCoefs(a=a(c.a), p=tuple(map(a, c.p)), s=-a(c.s), c=a(c.c), q=tuple(map(a, c.q)), g=a(c.g),
                    skip=a(c.skip), scale=a(c.scale), has_next=c.has_next, a_next=a(c.a_next),
                    p_next=tuple(map(a, c.p_next)), c_in_next=a(c.c_in_next))


def _inputs(n, k, dtype, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda: torch.randn(n, generator=g).to(dtype)  # noqa: E731
    return t(), [t() for _ in range(k)], t(), (t() if cfg else None)


def _assert_close(out, ref, mag, dtype, what, k=4):
    """|out − ref| ≤ ulp_dtype·|ref| + 2·(8 + 3K)·2^-24·mag.

    mag bounds Σ|terms| of every fp32 sum on the way to the value; each of the ≤ 8 + 3K roundings along the
    longest chain (K + 1 in u, K + 2 in x', K + 1 in u', the CFG/scale/skip/h steps) errs by ≤ 2^-24 of it, so
    each side is within (8 + 3K)·2^-24·mag of the exact value and the two within twice that (FMA contraction on
    a GPU rounds some mul+add pairs once instead of twice: another order, same count bound): about 2e-6
    relative at K ≤ 4. The storage term is one ulp of the output dtype: both sides round the same fp32 value to the
    dtype, and can land on neighbouring values when the fp32 values differ or when the rounding differs (the
    interpreter converts fp32 → bf16 by truncation, a GPU rounds to nearest). fp32 outputs are not re-rounded.
    """
    o, r = out.double(), ref.double()
    tol = 2 * (8 + 3 * k) * F32_EPS * mag.double() + (ULP[dtype] * r.abs() if dtype != torch.float32 else 0) + 1e-30
    bad = (o - r).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} element(s) off, worst {float(((o - r).abs() - tol).max()):.3g}"


def _check(x, hist, d, coefs, d_c, eps, dtype, **kw):
    h, xn, un = fused_update(x, hist, d, coefs, d_c=d_c, eps=eps, **kw)
    if eps is None and kw.get("seed") is not None and coefs.g != 0.0:
        eps = kernel_randn(kw["seed"], x.shape[0], x.shape[1:], kw.get("stream", 1), kw.get("first_sample", 0),
                           device=x.device)
    hr, xr, ur = fused_update_ref(x, hist, d, coefs, d_c=d_c, eps=eps)
    # magnitude bound: the reference on |inputs|, with CFG f + w(f_c − f) = (1−w) f + w f_c folded into |d|.
    dm = d.float().abs() if d_c is None else abs(1 - coefs.w) * d.float().abs() + abs(coefs.w) * d_c.float().abs()
    hm, xm, um = fused_update_ref(x.float().abs(), [t.float().abs() for t in hist], dm, _abs(coefs),
                                  eps=None if eps is None else eps.float().abs())
    k = max(len(hist), 4)
    _assert_close(h, hr, hm, dtype, "h", k)
    _assert_close(xn, xr, xm, dtype, "x'", k)
    if coefs.has_next:
        _assert_close(un, ur, um, dtype, "u'", k)
    else:
        assert un is None and ur is None
    return h, xn, un


# --------------------------------------------------------------------------------------------------------------
# the kernel against fused_update_ref (CPU, interpreter)

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 4099])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 7, 10])  # 10 = MAX_HISTORY: every pointer of the kernel read
def test_kernel_matches_ref_shapes(interpret, dtype, n, k):
    rng = random.Random(100 * k + n)
    cfg = (k + n) % 2 == 1
    coefs = _coefs(k, rng, w=2.5 if cfg else 1.0, has_next=k != 2)  # k = 2: a last row (no next input)
    x, hist, d, d_c = _inputs(n, k, dtype, cfg, seed=k)
    _check(x, hist, d, coefs, d_c, None, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [False, True])
@pytest.mark.parametrize("noise", ["none", "philox", "tensor"])
def test_kernel_matches_ref_cfg_noise(interpret, dtype, cfg, noise):
    rng = random.Random(7)
    coefs = _coefs(3, rng, g=0.0 if noise == "none" else 0.7, w=3.0 if cfg else 1.0)
    x, hist, d, d_c = _inputs(4099, 3, dtype, cfg, seed=1)
    eps = torch.randn(4099, generator=torch.Generator().manual_seed(9)).to(dtype) if noise == "tensor" else None
    kw = dict(seed=1234, stream=5, first_sample=3) if noise == "philox" else {}
    _check(x, hist, d, coefs, d_c, eps, dtype, **kw)


def test_kernel_any_shape_and_in_place(interpret):
    """A 4-D tensor (flattened inside) and outputs aliasing the inputs (x updated in place)."""
    rng = random.Random(3)
    coefs = _coefs(2, rng)
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(3, 1, 5, 7, generator=g), torch.randn(3, 1, 5, 7, generator=g)
    hist = [torch.randn(3, 1, 5, 7, generator=g) for _ in range(2)]
    h, xn, un = fused_update(x, hist, d, coefs)
    assert h.shape == xn.shape == un.shape == x.shape
    x2 = x.clone()
    h2, xn2, un2 = fused_update(x2, hist, d, coefs, x_out=x2)
    assert xn2 is x2 and torch.equal(x2, xn) and torch.equal(h2, h) and torch.equal(un2, un)


def test_tolerance_can_fail(interpret):
    """The fp32 check rejects a coefficient off by 1e-4 (relative): it is not too loose to see a wrong row."""
    rng = random.Random(5)
    coefs = _coefs(3, rng)
    x, hist, d, _ = _inputs(4099, 3, torch.float32, False)
    wrong = RowCoefs(**{**coefs.__dict__, "q": (coefs.q[0] * (1 + 1e-4),) + coefs.q[1:]})
    h, xn, un = fused_update(x, hist, d, wrong)
    _, xr, _ = fused_update_ref(x, hist, d, coefs)
    _, xm, _ = fused_update_ref(x.abs(), [t.abs() for t in hist], d.abs(), _abs(coefs))
    with pytest.raises(AssertionError):
        _assert_close(xn, xr, xm, torch.float32, "x'")


# --------------------------------------------------------------------------------------------------------------
# in-kernel noise

# (seed, batch, shape, stream, first_sample): seeds on both sides of 2^32 and 2^63 (both key words, the sign bit of
# the int64 the kernel reads), streams and first samples up to the 32-bit limit, per-sample sizes that are not a
# multiple of 4 (a sample's last counter block is cut) and 1 (every element its own sample).
NOISE_CASES = [
    (0, 3, (5, 7), 0, 0),
    (1, 1, (1 << 16,), 1, 0),
    (2**32 - 1, 64, (1, 8, 8), 2, 9),
    (2**32, 2, (4099,), 3, 17),
    (2**32 + 5, 1000, (), 7, 2**31),
    (2**63, 5, (3, 3), 2**32 - 1, 0),
    (2**64 - 1, 4, (2, 5), 1, 2**32 - 4),
]


@pytest.mark.parametrize("seed,batch,shape,stream,first", NOISE_CASES)
def test_kernel_noise_is_runtime_noise(interpret, seed, batch, shape, stream, first):
    """The in-kernel stream is runtime/noise.py's, bit for bit: under the interpreter the kernel's Philox is exact
    uint32 arithmetic and its Box–Muller the same numpy float64 ops in the same order, rounded once to float32."""
    got = kernel_randn(seed, batch, shape, stream, first, device="cpu")
    ref = torch.from_numpy(noise.randn(seed, batch, shape, stream, first))
    assert got.shape == ref.shape == (batch, *shape)
    assert torch.equal(got, ref), int((got != ref).sum())
    # a seed tensor (what a CUDA graph replays) reads the same seed; row b is sample first + b on its own
    assert torch.equal(kernel_randn(fu.seed_tensor(seed, "cpu"), batch, shape, stream, first, device="cpu"), ref)
    if batch > 1:
        assert torch.equal(kernel_randn(seed, 1, shape, stream, first + batch - 1, device="cpu")[0], ref[-1])


def test_kernel_noise_differs_across_seeds_streams_samples(interpret):
    """The comparison above can fail: each counter and key word changes the values (and the two key words are
    not swapped: seed 2^32 is not seed 1)."""
    base = kernel_randn(2**32 + 1, 4, (64,), 1, 10, device="cpu")
    for args in [(2**32 + 2, 4, (64,), 1, 10), (1, 4, (64,), 1, 10), (2**32, 4, (64,), 1, 10),
                 (2**32 + 1, 4, (64,), 2, 10), (2**32 + 1, 4, (64,), 1, 11)]:
        other = kernel_randn(*args, device="cpu")
        assert (other != base).float().mean() > 0.99, args


def test_kernel_noise_enters_x(interpret):
    """x' − (the noiseless update) = g·ε with ε = runtime.noise.randn for this row's stream and samples."""
    coefs = RowCoefs(c=0.5, q=(0.25,), g=0.8)
    x, _, d, _ = _inputs(4100, 0, torch.float32, False)
    x, d = x.reshape(4, 1025), d.reshape(4, 1025)
    _, xn, _ = fused_update(x, [], d, coefs, seed=7, stream=2, first_sample=5)
    _, x0, _ = fused_update(x, [], d, RowCoefs(c=0.5, q=(0.25,)))
    eps = torch.from_numpy(noise.randn(7, 4, (1025,), 2, 5))
    # x0's terms are bit-equal inside xn; what differs: the roundings of g·ε, of the add and of xn − x0, each ≤ 2^-24
    # of a value ≤ 8 (|x|, |d|, |ε| < 4.5 in these 4100 draws: |xn| ≤ 0.75·4.5 + 0.8·4.5 ≈ 7); 4 for 3, as margin.
    assert float(eps.abs().max()) < 4.5 and float(x.abs().max()) < 4.5 and float(d.abs().max()) < 4.5
    torch.testing.assert_close(xn - x0, 0.8 * eps, rtol=0, atol=4 * F32_EPS * 8)


def test_compiler_usable_after_interpreter(interpret, monkeypatch, tmp_path):
    """A GPU session runs these interpreter tests and then compiles the same kernel: an interpreted launch
    (with the nested _philox_normal call) must leave nothing behind that breaks a later compile."""
    from fewstep.kernels import aot

    x = torch.zeros(64)
    fused_update(x, [], x, RowCoefs(g=1.0), seed=1)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    m = aot.compile_rows([RowCoefs(c=0.5, q=(0.5,), g=0.3)], tmp_path, targets=("cuda:80",))
    assert m["targets"]["sm80"]["algo_of_row"] == [0]


def test_interpreter_after_a_compiled_mode_import(tmp_path):
    """The case that once needed patching triton.language for each launch: triton imported with the interpreter
    off (as diffusers does), then TRITON_INTERPRET=1. The noise calls only tl builtins, so it just runs. A fresh
    process: this one may have imported triton either way."""
    code = ("import os, numpy as np, triton.language\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "import torch\n"
            "from fewstep.kernels.fused_update import RowCoefs, fused_update, kernel_randn\n"
            "from fewstep.runtime import noise\n"
            "assert np.array_equal(kernel_randn(2**40 + 3, 3, (5,), 1, 2, device='cpu').numpy(),\n"
            "                      noise.randn(2**40 + 3, 3, (5,), 1, 2))\n"
            "x = torch.zeros(3, 5)\n"
            "_, xn, _ = fused_update(x, [], x, RowCoefs(g=1.0), seed=2**40 + 3, stream=1, first_sample=2)\n"
            "assert np.array_equal(xn.numpy(), noise.randn(2**40 + 3, 3, (5,), 1, 2))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_kernel_input_errors(interpret, monkeypatch):
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="hist"):
        fused_update(x, [], x, RowCoefs(q=(0.0, 1.0)))
    with pytest.raises(ValueError, match="eps or seed"):
        fused_update(x, [], x, RowCoefs(g=1.0))
    with pytest.raises(ValueError, match="shape"):
        fused_update(x, [], torch.zeros(9), RowCoefs())
    # counter and key ranges as runtime/noise.py checks them: one FewstepError line each
    x2 = torch.zeros(4, 3)
    for kw, match in [(dict(seed=-1), "seed"), (dict(seed=2**64), "seed"), (dict(seed=1.5), "seed"),
                      (dict(seed=1, stream=2**32), "stream"), (dict(seed=1, first_sample=-1), "first_sample"),
                      (dict(seed=1, first_sample=2**32 - 3), "first_sample \\+ batch")]:
        with pytest.raises(noise.NoiseError, match=match):
            fused_update(x2, [], x2, RowCoefs(g=1.0), **kw)
    with pytest.raises(noise.NoiseError, match="first_sample"):
        kernel_randn(1, 4, (3,), 0, 2**32 - 3, device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        fused_update(x, [], x, RowCoefs())


# --------------------------------------------------------------------------------------------------------------
# the fast executor against the reference executor

# Fast executor vs reference executor on CPU (fused_update_ref, or the kernel under TRITON_INTERPRET): EXACT
# equality (torch.equal), not a tolerance, because both evaluate the same float32 expressions in the same order
# with every op rounded once (IEEE round-to-nearest) and nothing fused:
# - each Plan coefficient is a Python float rounded once to float32 before its multiply (torch's CPU tensor·scalar
#   kernels compute in float32 for a float32 tensor; the interpreter turns a float constexpr into a numpy float32
#   scalar), and each product is rounded before its add (torch runs mul and add as separate kernels; the
#   interpreter runs one numpy ufunc per op: no FMA);
# - the sums run in the same order: u = a·x, then + p_k·h_{e-k} for k = 1..K; x' = c·x, then + q_0·h_e,
#   + q_1·h_{e-1}, …, + g·ε last; CFG is d_u + w·(d_c − d_u) in both (Denoiser._guided, the kernel's f + W·(fc − f));
#   a raw network's D = c_skip·u + c_out·F is the same two products and one (commutative) add, with c_skip, c_out,
#   c_in rounded from the same float64 values;
# - float32 storage does not re-round, so u' from the kernel's x', h equals the reference's next u;
# - the network sees bit-equal inputs in the same batch layout (B rows, or [unconditional; conditional] 2B), and
#   float32 CPU ops are deterministic for a fixed shape (the GMM computes in float64 and rounds once).
# What is NOT exact: a raw network with CFG (the kernel combines F, the reference D: another association — see
# test_fast_equals_reference_digits) and compiled GPU kernels (FMA: test_gpu_fast_and_cuda_graph_equal_eager).
PLANS = [("ddim", 3), ("heun", 5), ("dpmpp-3m", 4), ("ipndm", 6), ("unipc", 4), ("deis-3", 5), ("ddpm", 4)]


def _gmm_case(name, nfe, dtype=torch.float32, b=16):
    g = GMM.default()
    plan = solvers.build(name, nfe, g.sigma_min, g.sigma_max)
    gen = torch.Generator().manual_seed(nfe)
    z = torch.randn(b, 2, generator=gen)
    cond = torch.arange(b) % g.num_classes
    s = len(plan.stochastic_rows)
    noise = torch.randn(s, b, 2, generator=gen) if s else None
    return g, plan, z, cond, noise


@pytest.mark.parametrize("name,nfe", PLANS)
@pytest.mark.parametrize("guidance", [None, 2.0])
def test_fast_equals_reference_gmm(interpret, name, nfe, guidance):
    """fp32 on CPU: the same float32 ops in the same order (the CFG combine included), so bit-equal (see above)."""
    g, plan, z, cond, noise = _gmm_case(name, nfe)
    ref = sample(plan, g, z, cond=cond, guidance=guidance, noise=noise)
    for use_kernel in (False, True):
        out = fast.sample(plan, g, z, cond=cond, guidance=guidance, noise=noise, use_kernel=use_kernel)
        assert torch.equal(out, ref), (use_kernel, float((out - ref).abs().max()))
    if guidance is None:  # the check can fail: the last row's c and q off by 2^-20 (8 float32 ulps) are seen
        last, f = plan.rows[-1], 1 + 2.0**-20
        off = plan.replace(rows=plan.rows[:-1] + (Row(**{**last.__dict__, "c": last.c * f,
                                                         "q": tuple(q * f for q in last.q)}),))
        assert not torch.equal(fast.sample(off, g, z, cond=cond, noise=noise, use_kernel=True), ref)


@pytest.mark.parametrize("solver,method", [("dpmpp-3m", "dode-eps"), ("ddim", "iia-ddim")])
def test_fast_equals_reference_on_a_long_history_plan(interpret, solver, method):
    """A fitted plan reading up to 9 past entries (past-state corrections at 10 NFE, exact GMM): the kernel's
    other pointers h5..h10 and the K + 1-slot ring. Same fp32 operations in the same order as the reference
    executor, so bit-equal (the argument above PLANS)."""
    from fewstep.runtime import models
    from fewstep.training import fit

    g = models.load("gmm")
    plan = fit.fit(g, fit.FitConfig(solver, 10, method, batch=32))
    assert plan.history >= 8
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))
    ref = sample(plan, g.denoiser, z)
    for use_kernel in (False, True):
        out = fast.sample(plan, g.denoiser, z, use_kernel=use_kernel)
        assert torch.equal(out, ref), (use_kernel, float((out - ref).abs().max()))


@pytest.mark.parametrize("name,nfe", [("ddpm", 4), ("unipc", 4)])
def test_fast_seed_path_equals_reference_with_runtime_noise(interpret, name, nfe):
    """DESIGN §5: one seed, one sample. The fast executor given only a seed (ε drawn in the kernel, or by
    noise.randn without it) equals the reference executor fed noise.draw's ε for that seed and those samples:
    bit-equal, since the ε are bit-equal (test_kernel_noise_is_runtime_noise) and the rest is the argument above
    PLANS."""
    g, plan, z, cond, _ = _gmm_case(name, nfe)
    plan = plan if plan.stochastic_rows else plan.replace(rows=tuple(  # a stochastic variant: g on rows 1 and 2
        Row(**{**r.__dict__, "g": 0.1}) if e in (1, 2) else r for e, r in enumerate(plan.rows)))
    assert len(plan.stochastic_rows) >= 2
    seed, first = 2**32 + 11, 40
    _, eps = noise.draw(seed, z.shape[0], z.shape[1:], len(plan.stochastic_rows), first)
    ref = sample(plan, g, z, cond=cond, noise=torch.from_numpy(eps))
    for use_kernel in (True, False):
        out = fast.sample(plan, g, z, cond=cond, seed=seed, first_sample=first, use_kernel=use_kernel)
        assert torch.equal(out, ref), (use_kernel, float((out - ref).abs().max()))
    # and it can fail: another seed, or the batch taken as other samples, gives another result
    assert not torch.equal(fast.sample(plan, g, z, cond=cond, seed=seed + 1, first_sample=first, use_kernel=True), ref)
    assert not torch.equal(fast.sample(plan, g, z, cond=cond, seed=seed, first_sample=first + 1, use_kernel=True), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,nfe", [("ddim", 3), ("dpmpp-3m", 4), ("ipndm", 6), ("ddpm", 4)])
def test_fast_low_precision_within_budget(interpret, dtype, name, nfe):
    """fp16/bf16 storage: judged against the float64 reference executor (the exact Plan).

    Each row stores h, x and u once in the dtype (relative error ≤ one ulp each, ULP[dtype]; bf16 under the
    interpreter truncates, so a full ulp) and carries the error into the next rows; on these contracting plans
    it grows at most linearly: budget 2·E·ulp·(1 + max|x|). The fp32-arithmetic fast path must also be no
    worse than 1.5 × the reference executor run in the same dtype (which rounds after every op) + 2 ulp.
    """
    g, plan, z, cond, noise = _gmm_case(name, nfe, b=64)
    r64 = sample(plan, g, z.double(), cond=cond, guidance=2.0, noise=None if noise is None else noise.double())
    n_dt = None if noise is None else noise.to(dtype)
    r_dt = sample(plan, g, z.to(dtype), cond=cond, guidance=2.0, noise=n_dt)
    scale = 1 + float(r64.abs().max())
    budget = 2 * plan.nfe * ULP[dtype] * scale
    ref_err = float((r_dt.double() - r64).abs().max())
    for use_kernel in (False, True):
        out = fast.sample(plan, g, z.to(dtype), cond=cond, guidance=2.0, noise=n_dt, use_kernel=use_kernel)
        assert out.dtype == dtype
        err = float((out.double() - r64).abs().max())
        assert err <= budget, (use_kernel, err, budget)
        assert err <= 1.5 * ref_err + 2 * ULP[dtype] * scale, (use_kernel, err, ref_err)


def _digits():
    try:
        from fewstep.runtime.digits_net import load_teacher

        return load_teacher()
    except (ImportError, FileNotFoundError, OSError) as exc:  # the teacher's weights are built by another stage
        pytest.skip(f"digits teacher not available: {exc}")


def test_fast_equals_reference_digits(interpret):
    """The raw-network path (digits UNet, iPNDM at NFE 3: K = 2): the update writes c_in(σ_next)·u_next and
    folds D = c_skip·u + c_out·F.

    Unguided rows do the reference's operations in its order: bit-equal (the argument above PLANS). Guided rows
    reassociate c_skip·u + c_out·(F_u + w(F_c − F_u)) against D_u + w(D_c − D_u), so from the first guided
    combine on the two sides feed the UNet inputs that differ by rounding and no longer share its roundings:
    each side is within its own worst-case float32 error of the exact trajectory, per pass (R = 70 roundings on
    the UNet's longest path, as in test_export.py, + the update's 8 + 3K = 14) × 2^-24 × max|sample|, × (1 + 2w)
    for the CFG combine, × E = 3 passes reaching the output with gain ≤ 1; × 2 for the two sides:
    2·3·5·84·2^-24 = 1.5e-4 of max|sample|. A guidance scale off by 1 % (w = 2.02) moves the sample far more.
    """
    den = _digits()
    assert fast._Network(den).mode == "raw"
    plan = solvers.build("ipndm", 3, den.sigma_min, den.sigma_max)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 1, 8, 8, generator=gen)
    cond = torch.arange(2)
    w, k = 2.0, plan.history
    with torch.no_grad():
        ref = sample(plan, den, z, cond=cond)
        assert torch.equal(fast.sample(plan, den, z, cond=cond, use_kernel=True), ref)
        ref = sample(plan, den, z, cond=cond, guidance=w)
        bound = 2 * plan.nfe * (1 + 2 * w) * (70 + 8 + 3 * k) * F32_EPS * float(ref.abs().max())
        for use_kernel in (False, True):
            out = fast.sample(plan, den, z, cond=cond, guidance=w, use_kernel=use_kernel)
            assert float((out - ref).abs().max()) <= bound, (use_kernel, float((out - ref).abs().max()), bound)
        off = fast.sample(plan, den, z, cond=cond, guidance=1.01 * w, use_kernel=True)
        assert float((off - ref).abs().max()) > bound  # the bound sees a 1 % wrong guidance scale


def test_one_update_launch_per_evaluation(interpret, monkeypatch):
    """E network calls and E fused updates (each one kernel launch) per batch, with CFG."""
    g, plan, z, cond, _ = _gmm_case("unipc", 4)
    launches, calls = [], []
    kern = fu.kernels()[0]

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kern[grid]

    monkeypatch.setattr(fu, "kernels", lambda: (Counting(), None))
    inner = g._denoise
    monkeypatch.setattr(g, "_denoise", lambda x, sigma, cond: calls.append(x.shape[0]) or inner(x, sigma, cond))
    fast.sample(plan, g, z, cond=cond, guidance=2.0, use_kernel=True)
    # one batched [unconditional; conditional] call per row; the kernel combines the halves
    assert len(launches) == plan.nfe and calls == [2 * z.shape[0]] * plan.nfe


def test_network_modes_and_black_box():
    g = GMM.default()
    assert fast._Network(g).mode == "denoise"
    box = lambda x, sigma, cond=None, guidance=None: g(x, sigma, cond, guidance=guidance)  # noqa: E731
    assert fast._Network(box).mode == "call"
    _, plan, z, cond, _ = _gmm_case("dpmpp-2m", 3)
    ref = sample(plan, g, z, cond=cond, guidance=2.0)
    out = fast.sample(plan, box, z, cond=cond, guidance=2.0)
    assert torch.equal(out, ref)  # the box runs the reference's own CFG, then fused_update_ref: same ops, same order


def test_fast_input_errors():
    g, plan, z, cond, noise = _gmm_case("ddpm", 3)
    with pytest.raises(ValueError, match="noise"):
        fast.sample(plan, g, z, cond=cond)
    with pytest.raises(ValueError, match="noise"):
        fast.sample(plan, g, z, cond=cond, noise=noise[:1])
    fs = fast.FastSampler(plan, g, z, cond)
    with pytest.raises(ValueError, match="shape"):
        fs.run(z[:2], cond[:2], noise=noise)


# --------------------------------------------------------------------------------------------------------------
# AOT (Triton's compile/link for sm_80 and sm_90; nvcc checks that the generated C compiles)

def test_aot_sources_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    from fewstep.runtime.plan import Plan, Row

    same = [Row(sigma=s, c=0.5, q=(0.5,)) for s in (80.0, 40.0)]  # rows 0 and 1: one specialisation
    plan = Plan("t", 80.0, tuple(same + [Row(sigma=10.0, c=0.5, q=(0.5, 0.1))]))  # the last row reads h_(e-1)
    plan.save(tmp_path / "plan.json")
    # A fresh process, as a build would run it (and away from this process's interpreter patches).
    r = subprocess.run([sys.executable, "-m", "fewstep.kernels.aot", "--plan", str(tmp_path / "plan.json"),
                        "--dtype", "fp16", "--out", str(tmp_path / "aot")], capture_output=True, text=True,
                       cwd=tmp_path)  # not the repo root: `-m` would import its un-built fewstep/ folder
    if r.returncode != 0:
        pytest.skip(f"Triton AOT compile unavailable here: {r.stderr.strip().splitlines()[-1:]}")
    tmp_path = tmp_path / "aot"
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert set(m["targets"]) == {"sm80", "sm90"}
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for arch, t in m["targets"].items():
        assert t["algo_of_row"] == [0, 0, 1] and len(t["algos"]) == 2
        for a in t["algos"]:
            cubin = (tmp_path / a["cubin"]).read_bytes()
            assert cubin[:4] == b"\x7fELF"
            if cuobjdump.exists():
                elf = subprocess.run([str(cuobjdump), "-elf", str(tmp_path / a["cubin"])], capture_output=True,
                                     text=True, check=True).stdout
                assert f"sm_{arch[2:]}" in elf
        disp = (tmp_path / t["dispatcher"][0]).read_text()
        order = [f"fewstep_fused_update_{arch}_algo{i}," for i in range(len(t["algos"]))]
        assert all(disp.index(order[i]) < disp.index(order[i + 1]) for i in range(len(order) - 1))
        sources = [s for a in t["algos"] for s in a["sources"] if s.endswith(".c")] + [t["dispatcher"][0]]
        for i, src in enumerate(sources):
            r = subprocess.run([nvcc, "-x", "c", "-Xcompiler", "-fPIC", "-c", str(tmp_path / src),
                                "-o", str(tmp_path / f"{arch}_{i}.o")], capture_output=True, text=True)
            assert r.returncode == 0, r.stderr[-2000:]
    # Both targets in one library: no symbol defined twice (libcuda itself is resolved only on a CUDA machine).
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        r = subprocess.run([cc, "-shared", *map(str, sorted(tmp_path.glob("*.o"))), "-o", str(tmp_path / "libf.so"),
                            "-Wl,--unresolved-symbols=ignore-all"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    assert m["dtype"] == "fp16"


def test_aot_cli_help(capsys):
    from fewstep.kernels import aot

    with pytest.raises(SystemExit) as exc:
        aot.main(["--help"])
    assert exc.value.code == 0 and "--plan" in capsys.readouterr().out
    assert aot.main(["--plan", "/nonexistent/plan.json", "--out", "/tmp/x"]) == 2


def test_gpu_suite_help_and_no_cuda_message(capsys):
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
    spec = importlib.util.spec_from_file_location("gpu_suite", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as exc:
        mod.parse(["--help"])
    assert exc.value.code == 0 and "--out" in capsys.readouterr().out
    if not CUDA:
        assert mod.main([]) == 2
        assert "no CUDA device" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# GPU (run with a lent GPU: pytest -m gpu tests/test_kernels.py)

@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 4099, 1 << 20])
def test_gpu_kernel_matches_ref(compiled, dtype, n):
    for k in (0, 1, 2, 3, 4, 7, fu.MAX_HISTORY):
        rng = random.Random(k)
        cfg = k % 2 == 1
        coefs = _coefs(k, rng, g=0.5, w=2.0 if cfg else 1.0, has_next=k != 4)
        x, hist, d, d_c = _inputs(n, k, dtype, cfg, seed=k)
        x, d = x.cuda(), d.cuda()
        hist = [h.cuda() for h in hist]
        d_c = d_c.cuda() if d_c is not None else None
        _check(x, hist, d, coefs, d_c, None, dtype, seed=99, stream=1 + k, first_sample=k)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seed,batch,shape,stream,first", NOISE_CASES)
def test_gpu_kernel_noise(compiled, seed, batch, shape, stream, first):
    """Compiled, the Philox words are exact (uint32) and +, ·, sqrt and the float64 → float32 rounding are correctly
    rounded, but log, sin and cos are libdevice's (≤ 1, 2, 2 float64 ulps) where runtime/noise.py has numpy's.
    The two float64 values then differ by ≤ ~8·2^-53 relative (r·cos θ: ≤ 1 ulp from log, carried at half
    through the sqrt, 2 from cos, 3 roundings; numpy's side as much again), far below float32's 2^-24 half
    spacing: the float32 results are equal or, when the value lies within that distance of a float32 rounding
    boundary, one float32 ulp apart. That happens for a fraction ≲ 8·2^-53 / 2^-24 = 2^-26 of values (< 0.02
    expected over all cases here); 8 allows for clustering, and a wrong formula breaks about half of them."""
    got = kernel_randn(seed, batch, shape, stream, first, device="cuda").cpu()
    ref = torch.from_numpy(noise.randn(seed, batch, shape, stream, first))
    ulp = torch.nextafter(ref.abs(), torch.tensor(float("inf"))) - ref.abs()
    diff = (got - ref).abs()
    assert bool((diff <= ulp).all()), float((diff / ulp).max())
    assert int((got != ref).sum()) <= 8


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name,nfe", [("dpmpp-3m", 4), ("ddpm", 4)])
def test_gpu_fast_and_cuda_graph_equal_eager(compiled, name, nfe):
    g, plan, z, cond, _ = _gmm_case(name, nfe)
    g = g.cuda()
    z, cond = z.cuda(), cond.cuda()
    eager = fast.sample(plan, g, z, cond=cond, guidance=2.0, seed=5)
    eps = torch.from_numpy(noise.draw(5, z.shape[0], z.shape[1:], len(plan.stochastic_rows))[1]).cuda() \
        if plan.stochastic_rows else None  # the seed's ε: the kernel's, up to an ulp (test_gpu_kernel_noise)
    ref = sample(plan, g, z, cond=cond, guidance=2.0, noise=eps)
    # The compiled kernel contracts mul+add pairs into FMAs and may reorder; torch rounds every op. Per row each
    # side is within (8 + 3K)·2^-24 of Σ|terms| of the exact update (see _assert_close): 2·(8 + 3K) for the two,
    # + 2 for the GMM's float64 → float32 rounding of D on two different inputs; CFG scales the D terms by
    # 1 + 2w. peers.rounding_bound carries that through the E rows (the σ_max·|z| state damped by the GMM's
    # Jacobian; the last row's σ undamped; ×4 safety): 2.2e-4 (DPM++ 3M) and 8.7e-5 (DDPM) of max|sample| at 4 NFE.
    k, w = plan.history, 2.0
    bound = (1 + 2 * w) * rounding_bound(F32_EPS, plan.nfe, plan.rows[-1].sigma, float(z.abs().max()),
                                         float(ref.abs().max()), ops=2 * (8 + 3 * k) + 2)
    assert float((eager - ref).abs().max()) <= bound * float(ref.abs().max())
    cg = fast.CUDAGraphSampler(plan, g, z, cond, guidance=2.0).capture()
    torch.testing.assert_close(cg.run(z, cond, seed=5), eager, rtol=0, atol=0)
    z2 = torch.randn_like(z)
    torch.testing.assert_close(cg.run(z2, cond, seed=6), fast.sample(plan, g, z2, cond=cond, guidance=2.0, seed=6),
                               rtol=0, atol=0)
    torch.cuda.synchronize()


def test_block_choice_under_interpreter(interpret):
    assert fu._block(10) == fu.BLOCK_INTERPRET
