"""`fewstep export --attention ort`: diffusers' attention layers traced as ONNX Runtime's fused MultiHeadAttention.

A plain export writes each attention as MatMul → Softmax → MatMul: the [heads, S, S] score matrix is written,
read back by Softmax, written again and read by the second MatMul. At the SD 1.5 UNet's 64² latents (S = 4096,
8 heads, 2 CFG rows) that is 1 GiB per layer per pass, and Softmax alone was 13 % of a UNet call in ONNX Runtime's
CPU provider (benchmarks/results/sd15_latency.md). ``com.microsoft::MultiHeadAttention`` takes Q, K, V as
[B, S, heads·d] and runs a fused kernel (flash attention on the CPU and CUDA providers) that never stores the
score matrix. It is an ONNX Runtime contrib op: engines that use it run in ONNX Runtime (every provider of the C++
runtime falls back to ORT's own kernel for it) and cannot be built by TensorRT's ONNX parser, so it is opt-in.

Only the plain case is rewritten (diffusers' default processors, no attention mask, no per-head q/k norms: SD /
SDXL UNets, UNet2DModel's attention blocks, a VAE's mid-block); any other attention layer keeps its processor.
The rewrite lasts for the trace only: the denoiser itself is a deep copy (``onnx._prepare``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

ATTENTION_KINDS = ("onnx", "ort")


class _FusedAttention(torch.autograd.Function):
    """softmax(Q Kᵀ / √d) V over ``heads`` heads of [B, S, heads·d] inputs; traces to one contrib op."""

    @staticmethod
    def forward(ctx, q, k, v, heads: int):
        b, s, inner = q.shape
        d = inner // heads

        def split(t):  # [B, S, heads·d] → [B, heads, S, d]
            return t.view(b, -1, heads, d).transpose(1, 2)

        # the scale MultiHeadAttention uses by default, 1/√d, is SDPA's default too
        return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(b, s, inner)

    @staticmethod
    def symbolic(g, q, k, v, heads: int):
        out = g.op("com.microsoft::MultiHeadAttention", q, k, v, num_heads_i=heads)
        out.setType(q.type())  # [B, S_q, heads·d]: the query's shape, whatever the key's length
        return out


class _FusedProcessor:
    """diffusers' AttnProcessor2_0 steps with the attention itself as ``_FusedAttention``; anything it does not
    cover goes to the layer's own processor."""

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args,
                 **kwargs):
        if attention_mask is not None or args or kwargs:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q = attn.to_q(hidden_states)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            ctx = attn.norm_encoder_hidden_states(ctx)
        out = _FusedAttention.apply(q, attn.to_k(ctx), attn.to_v(ctx), attn.heads).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _fusable(module, attention_cls, default_processors) -> bool:
    """A diffusers ``Attention`` with a default processor and nothing the fused op would change."""
    if not isinstance(module, attention_cls) or type(module.processor) not in default_processors:
        return False
    if getattr(module, "norm_q", None) is not None or getattr(module, "norm_k", None) is not None:
        return False
    inner = module.to_q.out_features
    if inner % module.heads or not module.to_k.out_features == inner == module.to_v.out_features:
        return False
    # the fused op scales by 1/√d; AttnProcessor (not 2_0) would honour another ``scale``
    return abs(module.scale * (inner // module.heads) ** 0.5 - 1) < 1e-6


@contextlib.contextmanager
def fused_attention(*modules):
    """Within the block, every fusable attention layer under ``modules`` traces as MultiHeadAttention; yields
    how many layers that is (0: nothing to fuse). The original processors are put back on exit."""
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    except ImportError:  # no diffusers: no diffusers attention layers either
        modules = ()
    swapped = []
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if _fusable(m, Attention, (AttnProcessor, AttnProcessor2_0)):
                swapped.append((m, m.processor))
                m.processor = _FusedProcessor(m.processor)
    try:
        yield len(swapped)
    finally:
        for m, p in swapped:
            m.processor = p
