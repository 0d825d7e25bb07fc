"""The fused solver update: all element-wise work between two network evaluations in one kernel (DESIGN §6).

For Plan row e (runtime/plan.py) the executor evaluates the network on u_e and then, in one pass::

    u_e   = a_e·x + Σ_{k=1..K} p_{e,k}·h_{e-k}            # recomputed: x and the history are read anyway
    d_e   = skip·u_e + scale·(F_u + w·(F_c − F_u))         # CFG combine; without CFG F_u is the output
    h_e   = d_e − s_e·u_e                                  # written into the history slot
    x'    = c_e·x + Σ_{k=0..K} q_{e,k}·h_{e-k} + g_e·ε     # ε ~ N(0, 1), see "Noise" below
    u'    = c_in' · (a_{e+1}·x' + Σ_{k=1..K} p_{e+1,k}·h_{e+1-k})   # the next network input

``skip, scale`` fold a preconditioned network's output (``D = c_skip·u + c_out·F``, runtime/denoisers.py)
into the same pass, and ``c_in'`` is c_in(σ_{e+1}) of the same denoiser: the executor then feeds u' to the
raw network directly. With a plain denoiser they are (0, 1) and 1.

Every coefficient is a ``tl.constexpr``: one specialisation per Plan row, so zero terms cost neither a load
nor a multiply and the kernel reads only the history entries the row uses (K = the Plan's ``MAX_HISTORY``:
one pointer per entry, most of them never dereferenced). Storage is fp32, fp16 or bf16;
arithmetic is fp32; h_e, x' and u' are computed from the fp32 values (not from their rounded stores).

Noise: with a seed, ε is drawn in-kernel from exactly the stream of ``fewstep.runtime.noise`` (Philox4x32-10
keyed by the 64-bit seed, counter (n//4 mod 2^32, n//4 >> 32, first_sample + b, stream) for element n of batch
row b, output word n % 4, Box–Muller in float64 rounded once to float32), so the fast executor, the reference
executor fed ``noise.draw``, the exported graph and the C++ runtime see the same ε for one seed (DESIGN §5).
The seed is read from a one-element int64 tensor (its uint64 bits) so a captured CUDA graph replays with a new
seed. Under TRITON_INTERPRET the float64 ops are numpy's, as in runtime/noise.py: bit-identical. Compiled, log,
sin and cos are libdevice's (≤ 2 float64 ulp; numpy's differ from glibc's by an ulp too), which moves the float32
result by one ulp only when the float64 value lies within a few float64 ulps of a float32 rounding boundary
(a fraction ≲ 2^-26 of values): identical in practice, not by construction, as between numpy and C++. Cost: one
Philox block, an int64 division and float64 log, sqrt, sin and cos per element of a noisy row — cheap next to the
memory traffic where float64 runs at half rate (A100, H100), not measured on GPUs where it runs at 1/64.
``kernel_randn`` draws the in-kernel stream into a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..runtime.noise import NoiseError, _check_int
from ..runtime.plan import MAX_HISTORY

# 1024 elements per program, 4 warps (Triton's default): 8 elements per thread, i.e. one 128-bit access per tensor in
# fp16/bf16 and two in fp32, enough bytes in flight per SM for a streaming kernel, and the size Triton's element-wise
# tutorial (vector add) uses. Chosen by that reasoning, not tuned: no GPU was available (benchmarks/gpu_suite.py).
# Under the interpreter the cost is per program, so the launcher uses one huge block there (see _block).
BLOCK_GPU = 1024
BLOCK_INTERPRET = 1 << 16


@dataclass(frozen=True)
class RowCoefs:
    """The constants of one fused update (one kernel specialisation).

    ``p[k-1]`` multiplies h_{e-k} in u_e; ``q[k]`` multiplies h_{e-k} in x'; ``p_next[k-1]`` multiplies
    h_{e+1-k} in u' (so p_next[0] is the coefficient of the new h_e). ``has_next=False`` for the last row.
    """

    a: float = 1.0
    p: tuple[float, ...] = ()
    s: float = 0.0
    c: float = 1.0
    q: tuple[float, ...] = (0.0,)
    g: float = 0.0
    w: float = 1.0
    skip: float = 0.0
    scale: float = 1.0
    has_next: bool = False
    a_next: float = 1.0
    p_next: tuple[float, ...] = ()
    c_in_next: float = 1.0

    def __post_init__(self):
        for name, n in (("p", MAX_HISTORY), ("q", MAX_HISTORY + 1), ("p_next", MAX_HISTORY)):
            v = tuple(float(t) for t in getattr(self, name))
            if len(v) > n:
                raise ValueError(f"RowCoefs.{name}: at most {n} entries, got {len(v)}")
            object.__setattr__(self, name, v + (0.0,) * (n - len(v)))

    def reads(self) -> tuple[bool, ...]:
        """Which of h_{e-1}..h_{e-K} (K = MAX_HISTORY) the update reads."""
        return tuple(
            self.p[k - 1] != 0.0 or self.q[k] != 0.0
            or (self.has_next and k + 1 <= MAX_HISTORY and self.p_next[k] != 0.0)
            for k in range(1, MAX_HISTORY + 1)
        )


# --------------------------------------------------------------------------------------------------------------
# torch reference


def fused_update_ref(x, hist, d, coefs: RowCoefs, d_c=None, eps=None):
    """The readable definition. Returns ``(h_e, x', u' or None)`` in x's dtype.

    ``hist[k-1]`` is h_{e-k} (entries the row does not read may be None); ``d`` is the network output (the
    unconditional half with CFG, ``d_c`` the conditional half); ``eps`` is ε (required when g ≠ 0).
    """
    f32 = torch.float32
    xf = x.to(f32)
    hs = [None if h is None else h.to(f32) for h in list(hist) + [None] * (MAX_HISTORY - len(hist))]
    u = xf * coefs.a if coefs.a != 1.0 else xf
    for k in range(1, MAX_HISTORY + 1):
        if coefs.p[k - 1] != 0.0:
            u = u + coefs.p[k - 1] * hs[k - 1]
    f = d.to(f32)
    if d_c is not None:
        f = f + coefs.w * (d_c.to(f32) - f)
    dd = f * coefs.scale if coefs.scale != 1.0 else f
    if coefs.skip != 0.0:
        dd = dd + coefs.skip * u
    h = dd - coefs.s * u if coefs.s != 0.0 else dd
    xn = xf * coefs.c if coefs.c != 1.0 else xf
    if coefs.q[0] != 0.0:
        xn = xn + coefs.q[0] * h
    for k in range(1, MAX_HISTORY + 1):
        if coefs.q[k] != 0.0:
            xn = xn + coefs.q[k] * hs[k - 1]
    if coefs.g != 0.0:
        if eps is None:
            raise ValueError("fused_update_ref: g ≠ 0 needs eps")
        xn = xn + coefs.g * eps.to(f32)
    un = None
    if coefs.has_next:
        un = xn * coefs.a_next if coefs.a_next != 1.0 else xn
        newer = [h] + hs[:MAX_HISTORY - 1]  # newer[k-1] is h_{e+1-k}
        for k in range(1, MAX_HISTORY + 1):
            if coefs.p_next[k - 1] != 0.0:
                un = un + coefs.p_next[k - 1] * newer[k - 1]
        if coefs.c_in_next != 1.0:
            un = un * coefs.c_in_next
        un = un.to(x.dtype)
    return h.to(x.dtype), xn.to(x.dtype), un


# --------------------------------------------------------------------------------------------------------------
# Triton kernel sources. Plain functions here (so importing fewstep never needs a GPU); ``kernels()`` wraps them
# with triton.jit once per mode (compiled / TRITON_INTERPRET). The AOT build (kernels/aot.py) compiles the same source.

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional until a kernel is launched
    triton = tl = None


def kernel_source(k: int = MAX_HISTORY) -> str:
    """The Triton source of ``_fused_update_kernel`` for a history bound ``k``.

    Generated, not written out: Triton's AOT compiler (kernels/aot.py) takes flat signatures, so every history
    entry is its own pointer and constexpr (h1..hK, P1..PK, Q0..QK, PN1..PNK); writing the K-way unrolling out
    by hand would repeat one line per entry and drift. Argument order: x, d, d_c, h1..hK, eps, seed, h_out,
    x_out, u_out, u_out2, n, per_sample, first_sample, noise_stream, then the constexprs A, P1..PK, S, C, Q0..QK, G,
    CFG, W, SKIP, SCALE, NOISE, NEXT, AN, PN1..PNK, CIN, DUP_U, BLOCK.
    """
    ks = range(1, k + 1)

    def acc(var, terms, pad="    "):  # var += C·v for each (C, v); the constexpr test drops zero terms at compile time
        return [line for c, v in terms for line in (f"{pad}if {c} != 0.0:", f"{pad}    {var} += {c} * {v}")]

    hp = "".join(f"h{i}_ptr, " for i in ks)
    pc = "".join(f"P{i}: tl.constexpr, " for i in ks)
    qc = "".join(f"Q{i}: tl.constexpr, " for i in range(0, k + 1))
    pn = "".join(f"PN{i}: tl.constexpr, " for i in ks)
    src = [
        "def _fused_update_kernel(",
        f"    x_ptr, d_ptr, dc_ptr, {hp}eps_ptr, seed_ptr,",
        "    h_out_ptr, x_out_ptr, u_out_ptr, u_out2_ptr,",
        "    n, per_sample, first_sample, noise_stream,  # the noise counter: see _philox_normal",
        f"    A: tl.constexpr, {pc}S: tl.constexpr, C: tl.constexpr, {qc}",
        "    G: tl.constexpr, CFG: tl.constexpr, W: tl.constexpr, SKIP: tl.constexpr, SCALE: tl.constexpr,",
        "    NOISE: tl.constexpr,  # 0: none, 1: in-kernel Philox, 2: read eps_ptr",
        f"    NEXT: tl.constexpr, AN: tl.constexpr, {pn}CIN: tl.constexpr,",
        "    DUP_U: tl.constexpr,  # also write u' to u_out2 (the CFG batch [u'; u'] without a torch.cat)",
        "    BLOCK: tl.constexpr,",
        "):",
        "    # int64: offsets of tensors with >= 2^31 elements must not wrap.",
        "    pid = tl.program_id(0).to(tl.int64)",
        "    offs = pid * BLOCK + tl.arange(0, BLOCK)",
        "    mask = offs < n",
        "    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)",
        "    # The history entries this row reads (constexpr conditions: the others are never loaded).",
    ]
    for i in ks:
        nxt = f" or (NEXT and PN{i + 1} != 0.0)" if i < k else ""
        src += [f"    if (P{i} != 0.0) or (Q{i} != 0.0){nxt}:",
                f"        h{i} = tl.load(h{i}_ptr + offs, mask=mask).to(tl.float32)"]
    src += ["    u = x", "    if A != 1.0:", "        u = x * A"]
    src += acc("u", [(f"P{i}", f"h{i}") for i in ks])
    src += [
        "    f = tl.load(d_ptr + offs, mask=mask).to(tl.float32)",
        "    if CFG:",
        "        fc = tl.load(dc_ptr + offs, mask=mask).to(tl.float32)",
        "        f = f + W * (fc - f)",
        "    d = f",
        "    if SCALE != 1.0:",
        "        d = f * SCALE",
        "    if SKIP != 0.0:",
        "        d += SKIP * u",
        "    h = d",
        "    if S != 0.0:",
        "        h = d - S * u",
        "    tl.store(h_out_ptr + offs, h.to(h_out_ptr.dtype.element_ty), mask=mask)",
        "    xn = x",
        "    if C != 1.0:",
        "        xn = x * C",
    ]
    src += acc("xn", [("Q0", "h")] + [(f"Q{i}", f"h{i}") for i in ks])
    src += [
        "    if NOISE == 1:",
        "        xn += G * _philox_normal(seed_ptr, offs, per_sample, first_sample, noise_stream)",
        "    if NOISE == 2:",
        "        xn += G * tl.load(eps_ptr + offs, mask=mask).to(tl.float32)",
        "    tl.store(x_out_ptr + offs, xn.to(x_out_ptr.dtype.element_ty), mask=mask)",
        "    if NEXT:",
        "        un = xn",
        "        if AN != 1.0:",
        "            un = xn * AN",
    ]
    src += acc("un", [(f"PN{i}", "h" if i == 1 else f"h{i - 1}") for i in ks], pad="        ")
    src += [
        "        if CIN != 1.0:",
        "            un = un * CIN",
        "        tl.store(u_out_ptr + offs, un.to(u_out_ptr.dtype.element_ty), mask=mask)",
        "        if DUP_U:",
        "            tl.store(u_out2_ptr + offs, un.to(u_out2_ptr.dtype.element_ty), mask=mask)",
    ]
    return "\n".join(src) + "\n"


# The in-kernel noise: runtime/noise.py's stream, element for element. Source text (not a module-level function) so it
# is jitted in the same scope as the kernels that call it, once per mode (see kernels()). It calls only tl builtins:
# triton.language's own @jit helpers (tl.randn, tl.zeros_like, ...) stay compiled-only when triton was imported with
# TRITON_INTERPRET off, and the interpreter refuses to call them (tests/test_kernels.py imports triton that way).
NOISE_SOURCE = """
def _philox_normal(seed_ptr, offs, per_sample, first_sample, noise_stream):
    # offs: int64 flat indices into a [batch, per_sample] tensor; row b is absolute sample first_sample + b.
    b = offs // per_sample
    m = offs - b * per_sample  # the element index n of runtime/noise.py, within its sample
    blk = m // 4
    # Counter (n//4 mod 2^32, n//4 >> 32, sample, stream); int64 → uint32 conversions keep the low 32 bits.
    c0 = blk.to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    c2 = (first_sample + b).to(tl.uint32)
    c3 = (offs * 0 + noise_stream).to(tl.uint32)  # a tensor even when Triton specialises the value 1
    seed = tl.load(seed_ptr).to(tl.uint64, bitcast=True)  # the uint64 seed's bits (seed_tensor)
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    # Philox4x32-10. The literals are uint32 (Triton types 2^31 ≤ v < 2^32 so): products wrap mod 2^32 (the low
    # word) and umulhi gives the high word. Bumping the key after the last round as well is harmless (unused).
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    # Box–Muller on (w0, w1) → (n0, n1) and (w2, w3) → (n2, n3), float64 as in runtime/noise.py _randn, same
    # operations in the same order (no add next to a multiply to contract into an FMA), rounded to float32 once.
    word = m % 4
    wa = tl.where(word < 2, c0, c2).to(tl.float64)
    wb = tl.where(word < 2, c1, c3).to(tl.float64)
    scale = tl.full([1], 2.0**-32, tl.float64)
    two_pi = tl.full([1], 6.283185307179586, tl.float64)  # 2π as a float64: the compiler may type a bare literal fp32
    u1 = (wa + 0.5) * scale  # exact: < 2^33 · 2^-32 with 33 significant bits
    u2 = (wb + 0.5) * scale
    r = tl.sqrt(-2.0 * tl.log(u1))
    theta = two_pi * u2
    z = tl.where(word % 2 == 0, r * tl.cos(theta), r * tl.sin(theta))
    return z.to(tl.float32)


# noise_stream, not stream: the AOT launchers' first parameter is the CUstream `stream`.
def _randn_kernel(out_ptr, seed_ptr, n, per_sample, first_sample, noise_stream, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _philox_normal(seed_ptr, offs, per_sample, first_sample, noise_stream), mask=offs < n)
"""


def _compile_source(src: str, tag: str) -> dict:
    """The functions of generated source, registered with linecache: triton.jit (and its interpreter) read
    the source back through ``inspect.getsourcelines``. Returns the scope they were defined in."""
    import linecache

    filename = f"<fewstep generated {tag}, K={MAX_HISTORY}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    scope = {"tl": tl, "triton": triton}
    exec(compile(src, filename, "exec"), scope)
    for fn in scope.values():
        if callable(fn) and getattr(fn, "__code__", None) is not None and fn.__code__.co_filename == filename:
            fn.__module__ = __name__
    return scope


_KERNELS: dict = {}


def _triton():
    if triton is None:
        raise ImportError("fewstep.kernels.fused_update needs the 'triton' package (pip install triton)")
    return triton, tl


def kernels():
    """``(_fused_update_kernel, _randn_kernel)`` wrapped by ``triton.jit`` on first use.

    ``triton.jit`` decides at decoration time whether a function is compiled or interpreted
    (TRITON_INTERPRET), so one pair is built per mode: a GPU test session can still run the CPU tests. The
    helper ``_philox_normal`` is jitted in the kernels' own scope, in the same mode, before they are compiled
    (a kernel resolves the names it calls through its globals when it is compiled or interpreted).
    """
    mode = _interpreting()
    if mode in _KERNELS:
        return _KERNELS[mode]
    _triton()
    scope = _compile_source(NOISE_SOURCE + "\n\n" + kernel_source(), "fused update")
    scope["_philox_normal"] = triton.jit(scope["_philox_normal"])
    _KERNELS[mode] = (triton.jit(scope["_fused_update_kernel"]), triton.jit(scope["_randn_kernel"]))
    return _KERNELS[mode]


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block(n: int) -> int:
    if _interpreting():
        return BLOCK_INTERPRET
    return BLOCK_GPU


def _check_device(t: torch.Tensor) -> None:
    if not t.is_cuda and not _interpreting():
        raise ValueError("fused_update: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                         "use fused_update_ref")


def _flat(t, name, like):
    if t is None:
        return None
    if t.shape != like.shape:
        raise ValueError(f"fused_update: {name} has shape {tuple(t.shape)}, x has {tuple(like.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"fused_update: {name} must be contiguous")
    return t


def seed_tensor(seed: int, device) -> torch.Tensor:
    """The one-element int64 tensor the kernel reads the seed from (a tensor so a CUDA graph replays with a new
    value): the bits of ``seed`` in [0, 2^64) as runtime/noise.py keys Philox with it, stored two's complement."""
    seed = _check_int("seed", seed, 0, 2**64)
    return torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64, device=device)


def _counter_args(batch: int, stream, first_sample) -> tuple[int, int]:
    """``stream`` and ``first_sample`` checked as runtime/noise.py checks them (one NoiseError line)."""
    stream = _check_int("stream", stream, 0, 2**32)
    first_sample = _check_int("first_sample", first_sample, 0, 2**32)
    if first_sample + batch > 2**32:
        raise NoiseError(f"first_sample + batch must be ≤ 2^32 (sample indices are 32-bit), got {first_sample + batch}")
    return stream, first_sample


def kernel_randn(seed, batch: int, shape, stream: int = 0, first_sample: int = 0, device="cuda",
                 block: int | None = None) -> torch.Tensor:
    """The in-kernel stream drawn into a float32 [batch, *shape] tensor: ``runtime.noise.randn(seed, batch, shape,
    stream, first_sample)`` computed by the kernel's own code (``seed``: an int or a ``seed_tensor``)."""
    triton, _ = _triton()
    _, rk = kernels()
    batch = _check_int("batch", batch, 1, 2**32)
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    stream, first_sample = _counter_args(batch, stream, first_sample)
    seed_t = seed if isinstance(seed, torch.Tensor) else seed_tensor(seed, device)
    _check_device(seed_t)
    out = torch.empty((batch, *dims), dtype=torch.float32, device=seed_t.device)
    n = out.numel()
    blk = block or _block(n)
    rk[(triton.cdiv(n, blk),)](out, seed_t, n, n // batch, first_sample, stream, BLOCK=blk)
    return out


def fused_update(
    x, hist, d, coefs: RowCoefs, d_c=None, *, eps=None, seed=None, stream: int = 1, first_sample: int = 0,
    h_out=None, x_out=None, u_out=None, u_out2=None, block: int | None = None,
):
    """One fused update (one kernel launch). Returns ``(h_out, x_out, u_out or None)``.

    Same meaning as ``fused_update_ref``. Noise when ``coefs.g ≠ 0``: ``eps`` (a tensor) is read from memory;
    otherwise ``seed`` (an int or the one-element int64 tensor of ``seed_tensor``) draws it in-kernel: x's
    first dimension is the batch, and row b gets ``runtime.noise.randn(seed, 1, x.shape[1:], stream,
    first_sample + b)`` (stream 1 + j for the j-th stochastic row of a plan). Outputs may alias inputs
    element-for-element (``x_out is x`` is fine: each element is read before it is written by the same program).
    ``u_out2`` gets a second copy of u'.
    """
    triton, _ = _triton()
    kern, _ = kernels()
    _check_device(x)
    x = _flat(x, "x", x)
    hist = list(hist) + [None] * (MAX_HISTORY - len(hist))
    if len(hist) > MAX_HISTORY:
        raise ValueError(f"fused_update: at most {MAX_HISTORY} history tensors")
    reads = coefs.reads()
    for k in range(MAX_HISTORY):
        if reads[k] and hist[k] is None:
            raise ValueError(f"fused_update: the row reads h_(e-{k + 1}) but hist[{k}] is None")
        _flat(hist[k], f"hist[{k}]", x)
    _flat(d, "d", x)
    _flat(d_c, "d_c", x)
    noise = 0
    if coefs.g != 0.0:
        if eps is not None:
            _flat(eps, "eps", x)
            noise = 2
        elif seed is not None:
            noise = 1
            if x.dim() == 0:
                raise ValueError("fused_update: in-kernel noise needs x with a batch dimension")
            stream, first_sample = _counter_args(x.shape[0], stream, first_sample)
            if not isinstance(seed, torch.Tensor):
                seed = seed_tensor(seed, x.device)
        else:
            raise ValueError("fused_update: g ≠ 0 needs eps or seed")
    h_out = torch.empty_like(x) if h_out is None else _flat(h_out, "h_out", x)
    x_out = torch.empty_like(x) if x_out is None else _flat(x_out, "x_out", x)
    if coefs.has_next:
        u_out = torch.empty_like(x) if u_out is None else _flat(u_out, "u_out", x)
    if u_out2 is not None:
        _flat(u_out2, "u_out2", x)
    n = x.numel()
    blk = block or _block(n)
    dummy = x  # pointers the specialisation never dereferences still need a tensor
    hp = [h if h is not None else dummy for h in hist]
    per_sample = n // x.shape[0] if noise == 1 else 1
    kern[(triton.cdiv(n, blk),)](
        x, d, d_c if d_c is not None else dummy, *hp,
        eps if noise == 2 else dummy, seed if noise == 1 else _dummy_seed(x.device),
        h_out, x_out, u_out if coefs.has_next else dummy, u_out2 if u_out2 is not None else dummy,
        n, per_sample, first_sample if noise == 1 else 0, stream if noise == 1 else 0,
        A=coefs.a, **{f"P{k}": v for k, v in enumerate(coefs.p, 1)}, S=coefs.s, C=coefs.c,
        **{f"Q{k}": v for k, v in enumerate(coefs.q)},
        G=coefs.g, CFG=d_c is not None, W=coefs.w, SKIP=coefs.skip, SCALE=coefs.scale,
        NOISE=noise, NEXT=coefs.has_next, AN=coefs.a_next,
        **{f"PN{k}": v for k, v in enumerate(coefs.p_next, 1)}, CIN=coefs.c_in_next,
        DUP_U=coefs.has_next and u_out2 is not None,
        BLOCK=blk,
    )
    return h_out, x_out, (u_out if coefs.has_next else None)


_DUMMY_SEEDS: dict = {}


def _dummy_seed(device):
    key = str(device)
    if key not in _DUMMY_SEEDS:
        _DUMMY_SEEDS[key] = torch.zeros(1, dtype=torch.int64, device=device)
    return _DUMMY_SEEDS[key]


def plan_coefs(plan, scalings=None, guidance=None) -> list[RowCoefs]:
    """The E kernel specialisations of a Plan.

    ``scalings[e] = (c_skip, c_out, c_in)`` of the denoiser at row e's σ for a preconditioned network called raw
    (None: the update receives D itself). ``guidance[e]``: the CFG scale w when the update combines the two
    halves of a guided call (None or 1: it does not).
    """
    rows = plan.rows
    sc = scalings or [(0.0, 1.0, 1.0)] * len(rows)
    gw = guidance or [None] * len(rows)
    out = []
    for e, row in enumerate(rows):
        nxt = rows[e + 1] if e + 1 < len(rows) else None
        w = gw[e]
        out.append(RowCoefs(
            a=row.a, p=row.p, s=row.s, c=row.c, q=row.q, g=row.g,
            w=1.0 if w is None else float(w), skip=sc[e][0], scale=sc[e][1],
            has_next=nxt is not None, a_next=nxt.a if nxt else 1.0, p_next=nxt.p if nxt else (),
            c_in_next=sc[e + 1][2] if nxt else 1.0,
        ))
    return out
