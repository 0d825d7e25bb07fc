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

Noise: with ``noise="philox"`` ε is drawn in-kernel by Triton's ``tl.randn(seed, offset + i)`` (Philox4x32,
seed read from a one-element int64 tensor so a captured CUDA graph can be replayed with a new seed). That is
NOT the Philox/Box–Muller stream of ``fewstep.runtime.noise`` which the exported graphs and the C++ runtime
use: to reproduce those samples pass ε explicitly (``noise="tensor"``). ``kernel_randn`` draws the in-kernel
stream into a tensor, which is how the tests compare the fused path with the reference exactly.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch

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
    x_out, u_out, u_out2, n, noise_offset, then the constexprs A, P1..PK, S, C, Q0..QK, G, CFG, W, SKIP, SCALE,
    NOISE, NEXT, AN, PN1..PNK, CIN, DUP_U, BLOCK.
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
        "    n, noise_offset,",
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
        "        seed = tl.load(seed_ptr)",
        "        xn += G * tl.randn(seed, noise_offset + offs)",
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


def _compile_source(src: str, name: str):
    """A plain function from generated source, registered with linecache: triton.jit (and its interpreter) read
    the source back through ``inspect.getsourcelines``."""
    import linecache

    filename = f"<fewstep generated {name}, K={MAX_HISTORY}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
    scope = {"tl": tl, "triton": triton}
    exec(compile(src, filename, "exec"), scope)
    fn = scope[name]
    fn.__module__ = __name__
    return fn


def _randn_kernel(out_ptr, seed_ptr, n, noise_offset, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seed_ptr)
    tl.store(out_ptr + offs, tl.randn(seed, noise_offset + offs), mask=offs < n)


_KERNELS: dict = {}


def _triton():
    if triton is None:
        raise ImportError("fewstep.kernels.fused_update needs the 'triton' package (pip install triton)")
    return triton, tl


def kernels():
    """``(_fused_update_kernel, _randn_kernel)`` wrapped by ``triton.jit`` on first use.

    ``triton.jit`` decides at decoration time whether a function is compiled or interpreted
    (TRITON_INTERPRET), so one pair is built per mode: a GPU test session can still run the CPU tests.
    """
    mode = _interpreting()
    if mode in _KERNELS:
        return _KERNELS[mode]
    _triton()
    _KERNELS[mode] = (triton.jit(_compile_source(kernel_source(), "_fused_update_kernel")), triton.jit(_randn_kernel))
    return _KERNELS[mode]


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block(n: int) -> int:
    if _interpreting():
        return BLOCK_INTERPRET
    return BLOCK_GPU


@contextlib.contextmanager
def _launching():
    """Under TRITON_INTERPRET, make ``tl.randn`` and its helpers callable by the interpreter for one launch.

    ``triton.language.random`` wraps them with ``triton.jit`` when triton is imported; when that import happened
    with the interpreter off (diffusers imports triton, for one) they stay compiled-only ``JITFunction``s, which
    the interpreter refuses to call. They are swapped for interpreted wrappers of the same Python functions
    during the launch and restored after, so compiled launches never see the swap.
    """
    if not _interpreting():
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    lang = [sys.modules[m] for m in _TL_MODULES]
    # The interpreter patches triton.language.core for a nested call and never restores it (triton 3.9,
    # InterpretedFunction.__call__); a later compiled kernel would then trip over the patches. Snapshot them all.
    before = [dict(vars(m)) for m in lang]
    for mod in (lang[3], lang[0]):
        for name, value in list(vars(mod).items()):
            if isinstance(value, JITFunction) and getattr(value.fn, "__module__", "") == "triton.language.random":
                setattr(mod, name, InterpretedFunction(value.fn))
    try:
        yield
    finally:
        # The interpreter also injects its own globals into the modules of the functions it rewrites (once, then
        # caches the rewrite); a compiled kernel would resolve names through them. Remove both.
        for mod, snap in zip(lang, before):
            for name in set(vars(mod)) - set(snap):
                delattr(mod, name)
            for name, value in snap.items():
                if vars(mod).get(name) is not value:
                    setattr(mod, name, value)
        for fn in [f for f in InterpretedFunction.rewritten_fn if getattr(f, "__module__", "") in _TL_MODULES]:
            del InterpretedFunction.rewritten_fn[fn]


_TL_MODULES = ("triton.language", "triton.language.core", "triton.language.math", "triton.language.random")


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
    """The one-element int64 seed the kernel reads (a tensor so a CUDA graph replays with a new value)."""
    return torch.tensor([int(seed) & 0x7FFFFFFFFFFFFFFF], dtype=torch.int64, device=device)


def kernel_randn(seed, shape, noise_offset: int = 0, device="cuda", block: int | None = None) -> torch.Tensor:
    """ε of the fused kernel's in-kernel stream: element i of a row is ``tl.randn(seed, noise_offset + i)``."""
    triton, _ = _triton()
    _, rk = kernels()
    seed_t = seed if isinstance(seed, torch.Tensor) else seed_tensor(seed, device)
    _check_device(seed_t)
    out = torch.empty(shape, dtype=torch.float32, device=seed_t.device)
    n = out.numel()
    blk = block or _block(n)
    with _launching():
        rk[(triton.cdiv(n, blk),)](out, seed_t, n, int(noise_offset), BLOCK=blk)
    return out


def fused_update(
    x, hist, d, coefs: RowCoefs, d_c=None, *, eps=None, seed=None, noise_offset: int = 0,
    h_out=None, x_out=None, u_out=None, u_out2=None, block: int | None = None,
):
    """One fused update (one kernel launch). Returns ``(h_out, x_out, u_out or None)``.

    Same meaning as ``fused_update_ref``. Noise when ``coefs.g ≠ 0``: ``eps`` (a tensor) is read from memory;
    otherwise ``seed`` (an int or the one-element int64 tensor of ``seed_tensor``) draws it in-kernel from
    Philox at ``noise_offset + i``. Outputs may alias inputs element-for-element (``x_out is x`` is fine: each
    element is read before it is written by the same program). ``u_out2`` gets a second copy of u'.
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
    with _launching():
        kern[(triton.cdiv(n, blk),)](
            x, d, d_c if d_c is not None else dummy, *hp,
            eps if noise == 2 else dummy, seed if noise == 1 else _dummy_seed(x.device),
            h_out, x_out, u_out if coefs.has_next else dummy, u_out2 if u_out2 is not None else dummy,
            n, int(noise_offset),
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
