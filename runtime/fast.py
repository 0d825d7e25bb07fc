"""The fast Python executor: one fused update per evaluation and, on CUDA, the whole loop in one CUDA graph.

Same Plan semantics as ``runtime/executor.py`` (the reference every path here is tested against). Per row the
network is evaluated once, then ``fewstep.kernels.fused_update`` does everything element-wise up to the next
network input: the Triton kernel for CUDA tensors (or when ``use_kernel=True``, e.g. under TRITON_INTERPRET),
``fused_update_ref`` in torch elsewhere.

How the network is called (``_Network.mode``):

* ``"raw"``: a ``Denoiser`` that is ``preconditioned`` (EDM, VP, flow adapters, the digits teacher and its
  students). The fast path calls ``run_model`` on the input the previous update already scaled by c_in(σ),
  and the update folds ``D = c_skip·u + c_out·F`` (and CFG) into its single pass.
* ``"denoise"``: a ``Denoiser`` with its own closed-form ``_denoise`` (the exact GMM): D is called as is; CFG
  is still combined in the kernel from the batched [unconditional; conditional] call.
* ``"call"``: any other callable ``den(x, sigma, cond[, guidance])``: a black box that does its own CFG.

Noise for stochastic rows (g ≠ 0): ``noise`` [S, B, ...] as in the reference executor (read from memory, so
the result matches ``sample`` with the same noise), or ``seed``: the stream of ``runtime/noise.py`` (stream 1 + j
for the j-th stochastic row, row b of the batch being sample ``first_sample + b``), drawn in the kernel or, without
it, by ``noise.randn``: the same ε as ``sample(..., noise=noise.draw(seed, ...)[1])`` and the C++ runtime.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..kernels.fused_update import fused_update, fused_update_ref, plan_coefs, seed_tensor
from .denoisers import GUIDANCE_INPUT, Denoiser, cat_cond, guidance_applies
from .executor import InputError, call_denoiser
from .noise import randn
from .plan import Plan


def sample(plan: Plan, denoiser, z: torch.Tensor, cond=None, guidance: float | None = None, noise=None,
           seed: int | None = None, use_kernel: bool | None = None, first_sample: int = 0) -> torch.Tensor:
    """Run ``plan`` like ``fewstep.runtime.sample``, with one fused update per evaluation."""
    return FastSampler(plan, denoiser, z, cond, guidance, use_kernel=use_kernel).run(
        z, cond, noise=noise, seed=seed, first_sample=first_sample)


class _Network:
    """Calls the network for one row; returns ``(F_u, F_c or None)`` and knows the row's scalings.

    Reads only what the denoiser says of itself (``Denoiser.preconditioned``, ``guidance_mode``): see the
    module docstring for the three modes. CFG's two halves are combined by the update; a model that takes W
    as an input gets it beside its conditioning, one evaluation of B rows.
    """

    def __init__(self, denoiser):
        self.den = denoiser
        if not isinstance(denoiser, Denoiser):
            self.mode = "call"
        else:
            self.mode = "raw" if denoiser.preconditioned else "denoise"
        self.w_input = self.mode != "call" and denoiser.guidance_mode == GUIDANCE_INPUT

    def scalings(self, sigma32: float):
        """(c_skip, c_out, c_in) as floats, from σ rounded to the state dtype as the reference does."""
        if self.mode != "raw":
            return 0.0, 1.0, 1.0
        sig = torch.tensor([sigma32], dtype=torch.float64)
        return tuple(float(c.reshape(-1)[0]) for c in self.den.get_scalings(sig))

    def kernel_cfg(self, w, cond) -> bool:
        """Whether the row is guided and the update combines the two halves (not the black box)."""
        return self.mode != "call" and not self.w_input and guidance_applies(cond, w)

    def __call__(self, u, sigma, sigma2, t, t2, cond, cond2, w, cfg: bool):
        if self.mode == "call":
            return call_denoiser(self.den, u, sigma, cond, w), None
        b = sigma.shape[0]
        c = cond2 if cfg else cond
        if self.w_input:  # w: this row's [B] tensor of W (None: the plain conditional model)
            c = (cond, w)
        with self.den.shared_rows(b) if cfg else nullcontext():  # u's halves are one x: see Denoiser.shared_rows
            if self.mode == "raw":
                f = self.den.run_model(u, t2 if cfg else t, c)
            else:
                f = self.den._denoise(u, sigma2 if cfg else sigma, c)
        f = f.to(u.dtype)
        if not f.is_contiguous():
            f = f.contiguous()
        return (f[:b], f[b:]) if cfg else (f, None)


class FastSampler:
    """A Plan bound to a denoiser, a batch shape, a dtype and a device, with its buffers allocated once.

    ``run`` is the eager fast path; ``CUDAGraphSampler`` captures ``_loop`` into one graph.
    """

    def __init__(self, plan: Plan, denoiser, z_like: torch.Tensor, cond=None, guidance: float | None = None,
                 use_kernel: bool | None = None):
        self.plan, self.net = plan, _Network(denoiser)
        self.shape, self.dtype, self.device = tuple(z_like.shape), z_like.dtype, z_like.device
        self.use_kernel = z_like.is_cuda if use_kernel is None else use_kernel
        b = self.shape[0]
        self.n = z_like.numel()
        self.rows = []
        for row in plan.rows:
            w = row.guidance if row.guidance is not None else guidance
            sig = torch.full((b,), row.sigma, dtype=self.dtype, device=self.device)
            sigma32 = float(sig[0].to(torch.float64)) if b else row.sigma
            c_skip, c_out, c_in = self.net.scalings(sigma32)
            sig2 = torch.cat([sig, sig])
            t = t2 = None
            if self.net.mode == "raw":
                t = self.net.den.sigma_to_t(sig.to(torch.float64))
                t2 = torch.cat([t, t])
            # A guidance-input model reads W as a [B] float32 tensor, made once here (not inside a CUDA graph).
            wv = torch.full((b,), float(w), dtype=torch.float32, device=self.device) \
                if self.net.w_input and guidance_applies(cond, w) else None
            self.rows.append(dict(w=w, wv=wv, cfg=self.net.kernel_cfg(w, cond), sigma=sig, sigma2=sig2, t=t, t2=t2,
                                  c_skip=c_skip, c_out=c_out, c_in=c_in))
        self.coefs = plan_coefs(plan, [(r["c_skip"], r["c_out"], r["c_in"]) for r in self.rows],
                                [r["w"] if r["cfg"] else None for r in self.rows])
        self.stochastic = plan.stochastic_rows
        # Static buffers: the state x (updated in place), a ring of K + 1 history slots (h_e and the K = plan.history
        # it may read) and the network input [2B, ...] (its first half alone when the row is not guided).
        kw = dict(dtype=self.dtype, device=self.device)
        self.x = torch.empty(self.shape, **kw)
        self.ring = [torch.empty(self.shape, **kw) for _ in range(plan.history + 1)]
        self.u2 = torch.empty((2 * b,) + self.shape[1:], **kw)
        self.seed_buf = torch.zeros(1, dtype=torch.int64, device=self.device)
        self.first_sample = 0  # of the batch being run (run() sets it; a CUDA graph captures 0)

    # -- inputs ---------------------------------------------------------------------------------------------------
    def _check(self, z, noise):
        if tuple(z.shape) != self.shape or z.dtype != self.dtype:
            raise InputError(f"z: expected shape {self.shape} and dtype {self.dtype}, got {tuple(z.shape)} {z.dtype}")
        if noise is not None:
            if len(noise) != len(self.stochastic):
                raise InputError(f"noise: expected {len(self.stochastic)} slice(s), one per stochastic row, "
                                 f"got {len(noise)}")
            for i, n in enumerate(noise):
                if tuple(n.shape) != self.shape:
                    raise InputError(f"noise[{i}]: expected shape {self.shape}, got {tuple(n.shape)}")

    def run(self, z, cond=None, noise=None, seed: int | None = None, first_sample: int = 0) -> torch.Tensor:
        """One batch, eagerly. Returns a new tensor (the state buffer's copy). With ``seed``, batch row b's ε is
        that of absolute sample ``first_sample + b`` (runtime/noise.py)."""
        self._check(z, noise)
        if self.stochastic and noise is None and seed is None:
            raise InputError(f"plan {self.plan.name!r} has {len(self.stochastic)} stochastic row(s): "
                             "pass noise [S, B, ...] or seed")
        if noise is not None:
            noise = [n.to(self.dtype).contiguous() for n in noise]
        elif self.stochastic and not self.use_kernel:
            noise = [torch.from_numpy(randn(seed, self.shape[0], self.shape[1:], 1 + j, first_sample))
                     .to(device=self.device, dtype=self.dtype) for j in range(len(self.stochastic))]
        if seed is not None:
            self.seed_buf.copy_(seed_tensor(seed, self.device))
        self.first_sample = first_sample
        cond2 = self._cond2(cond)
        self._loop(z, cond, cond2, noise)
        return self.x.clone()

    def _cond2(self, cond):
        if cond is None or not any(r["cfg"] for r in self.rows):
            return None
        return cat_cond(self.net.den.null_cond(cond), cond)

    # -- the loop (also what the CUDA graph captures) ------------------------------------------------------------
    def _loop(self, z, cond, cond2, noise):
        b = self.shape[0]
        plan, x = self.plan, self.x
        # Prologue: x_0 = σ_init·z and the first network input (row 0 reads no history).
        torch.mul(z, plan.sigma_init, out=x)
        r0 = plan.rows[0]
        u0 = x * r0.a if r0.a != 1.0 else x
        if self.rows[0]["c_in"] != 1.0:
            u0 = u0 * self.rows[0]["c_in"]
        self.u2[:b].copy_(u0)
        if self.rows[0]["cfg"]:
            self.u2[b:].copy_(u0)
        ns = 0
        for e, row in enumerate(plan.rows):
            r, coefs = self.rows[e], self.coefs[e]
            u_in = self.u2 if r["cfg"] else self.u2[:b]
            w = r["wv"] if self.net.w_input else r["w"]
            f_u, f_c = self.net(u_in, r["sigma"], r["sigma2"], r["t"], r["t2"], cond, cond2, w, r["cfg"])
            slots = len(self.ring)
            hist = [self.ring[(e - k) % slots] for k in range(1, slots)]
            h_out = self.ring[e % slots]
            eps = None
            if row.g != 0.0 and noise is not None:
                eps = noise[ns]
            next_cfg = e + 1 < len(plan.rows) and self.rows[e + 1]["cfg"]
            if self.use_kernel:
                fused_update(x, hist, f_u, coefs, d_c=f_c, eps=eps, seed=self.seed_buf, stream=1 + ns,
                             first_sample=self.first_sample,
                             h_out=h_out, x_out=x, u_out=self.u2[:b], u_out2=self.u2[b:] if next_cfg else None)
            else:
                h, xn, un = fused_update_ref(x, [hh if rd else None for hh, rd in zip(hist, coefs.reads())], f_u,
                                             coefs, d_c=f_c, eps=eps)
                h_out.copy_(h)
                x.copy_(xn)
                if un is not None:
                    self.u2[:b].copy_(un)
                    if next_cfg:
                        self.u2[b:].copy_(un)
            if row.g != 0.0:
                ns += 1
        return x


class CUDAGraphSampler:
    """The whole loop (prologue, E network calls, E fused updates) captured in one ``torch.cuda.CUDAGraph``.

    For a static batch: ``z``, ``cond`` and the seed are copied into the captured input buffers and the graph
    is replayed — one graph launch per batch. Noise is drawn in-kernel from ``seed`` (explicit noise would be
    another captured input; not supported here). Warm-up runs eagerly on a side stream first (Triton compiles
    and autotuning-free launches must not happen during capture).
    """

    def __init__(self, plan: Plan, denoiser, z_like: torch.Tensor, cond=None, guidance: float | None = None):
        if not z_like.is_cuda:
            raise InputError("CUDAGraphSampler: needs CUDA tensors")
        self.fs = FastSampler(plan, denoiser, z_like, cond, guidance, use_kernel=True)
        self.z = torch.zeros_like(z_like)
        self.cond = None if cond is None else _clone_cond(cond)
        self.graph = None

    def capture(self, warmup: int = 2):
        fs = self.fs
        cond2 = fs._cond2(self.cond)
        self.cond2 = cond2
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch.no_grad():
            for _ in range(warmup):
                fs._loop(self.z, self.cond, cond2, None)
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            fs._loop(self.z, self.cond, cond2, None)
        return self

    def run(self, z, cond=None, seed: int = 0) -> torch.Tensor:
        if self.graph is None:
            self.capture()
        self.fs._check(z, None)
        self.z.copy_(z)
        if cond is not None:
            _copy_cond(self.cond, cond)
            if self.cond2 is not None:
                _copy_cond(self.cond2, cat_cond(self.fs.net.den.null_cond(cond), cond))
        self.fs.seed_buf.copy_(seed_tensor(seed, self.fs.device))
        self.graph.replay()
        return self.fs.x.clone()


def _clone_cond(c):
    if isinstance(c, dict):
        return {k: _clone_cond(v) for k, v in c.items()}
    return c.clone() if isinstance(c, torch.Tensor) else c


def _copy_cond(dst, src):
    if isinstance(dst, dict):
        for k in dst:
            _copy_cond(dst[k], src[k])
    elif isinstance(dst, torch.Tensor):
        dst.copy_(torch.as_tensor(src, device=dst.device))
