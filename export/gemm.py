"""Linear layers traced as 2-D ``Gemm`` (bias inside the matrix product), for every export.

``nn.Linear`` on a [B, S, K] activation traces to ``MatMul`` + ``Add``: the product is written, then read and
written again to add the bias. ONNX Runtime's MatMulAddFusion folds the pair into a ``Gemm`` only when the
activation's shape is fully known, which a dynamic-batch engine's is not, so every bias stays its own pass over
the output (at SD 1.5's 64² latents a GEGLU projection's output is [2, 4096, 2560·2] floats, 168 MB). Traced on
[B·S, K] instead, the layer is one ``Gemm`` whose C input is the bias (accumulated into the product's tiles),
between two ``Reshape``\\ s that copy nothing. diffusers' GEGLU (``proj`` then ``chunk(2)``) is traced as its two
halves' products, so no ``Slice`` copies the projection's output either. Same arithmetic per output element;
standard ops only (TensorRT, every ONNX Runtime provider). The rewrite lasts for the trace only, on the exporter's
own copy of the network (``onnx._prepare``).
"""

from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F
from torch import nn


def _linear_2d(self, x):
    if x.dim() <= 2 or self.bias is None:
        return F.linear(x, self.weight, self.bias)
    y = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _geglu_halves(self, hidden_states, *args, **kwargs):
    return self._fewstep_h(hidden_states) * self.gelu(self._fewstep_gate(hidden_states))


def _split(lin: nn.Linear, half: int) -> nn.Linear:
    out = nn.Linear(lin.in_features, lin.out_features // 2, bias=lin.bias is not None,
                    device=lin.weight.device, dtype=lin.weight.dtype)
    rows = slice(0, out.out_features) if half == 0 else slice(out.out_features, lin.out_features)
    with torch.no_grad():
        out.weight.copy_(lin.weight[rows])
        if lin.bias is not None:
            out.bias.copy_(lin.bias[rows])
    out.forward = types.MethodType(_linear_2d, out)
    return out.requires_grad_(False)


def _is_geglu(m: nn.Module) -> bool:
    proj = getattr(m, "proj", None)
    return type(m).__name__ == "GEGLU" and type(proj) is nn.Linear and proj.out_features % 2 == 0 \
        and callable(getattr(m, "gelu", None))


@contextlib.contextmanager
def gemm_linears(*modules):
    """Within the block, every ``nn.Linear`` under ``modules`` traces as a 2-D Gemm and every diffusers GEGLU as
    two; yields how many layers were rewritten. Everything is put back on exit."""
    linears, geglus = [], []
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if _is_geglu(m):
                geglus.append(m)
            elif type(m) is nn.Linear and "forward" not in vars(m):
                linears.append(m)
    try:
        for m in linears:
            m.forward = types.MethodType(_linear_2d, m)
        for m in geglus:
            m._fewstep_h, m._fewstep_gate = _split(m.proj, 0), _split(m.proj, 1)
            m.forward = types.MethodType(_geglu_halves, m)
        yield len(linears) + len(geglus)
    finally:
        for m in linears:
            vars(m).pop("forward", None)
        for m in geglus:
            vars(m).pop("forward", None)
            for name in ("_fewstep_h", "_fewstep_gate"):
                if name in m._modules:
                    del m._modules[name]
