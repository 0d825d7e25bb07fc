"""`fewstep export --conv winograd`: the wide low-resolution 3×3 convolutions traced as Winograd F(2×2, 3×3).

ONNX Runtime's CPU Conv computes a 3×3 convolution directly: 9 multiply-adds per input channel and output pixel.
Winograd's minimal filtering (Lavin & Gray, CVPR 2016) computes each 2×2 output tile from a 4×4 input tile with 16
products instead of 36: transform the input tiles (Bᵀ d B, additions only), multiply by the pre-transformed weights
(G g Gᵀ, computed once at export) as one batched MatMul over the 16 tile positions, and transform back (Aᵀ m A,
additions only). Written in standard ONNX ops (strided Slice, Add/Sub, MatMul, DepthToSpace) it runs in every runtime
and TensorRT parses it, so no contrib op is involved.

The transforms are memory-bound, so it pays only where the channels are many and the image small
(`benchmarks/results/conv_winograd.md`, ONNX Runtime CPU, batch 2: Winograd ÷ Conv 0.62 / 0.80 at 1280 channels on
16², 0.84 / 0.80 at 640 on 32² with 1 / 2 threads, but 1.02 / 1.24 at 320 on 64²): a convolution is rewritten only
with ≥ ``MIN_CHANNELS`` input channels on ≤ ``MAX_PIXELS`` pixels (even sides), decided per call at trace time
(the engine's spatial sizes are fixed). Accuracy: F(2×2, 3×3)'s transforms have entries 0, ±1 and ±½, so the
rounding stays that of a few additions around a shorter dot product: 4e-7 of the output's largest magnitude against
a float64 convolution where ONNX Runtime's Conv has 2.5e-6 to 4e-6 (the same file). Opt-in; the denoiser is a deep
copy for the trace only (``onnx._prepare``), and the original forward methods are put back on exit.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV_KINDS = ("onnx", "winograd")
MIN_CHANNELS = 640  # input channels; at 320 (SD's 64² level) the rewrite was slower (conv_winograd.md)
MAX_PIXELS = 32 * 32  # H·W of the input

# F(2×2, 3×3) (Lavin & Gray 2016): y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A
_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _bt(t: list) -> list:
    """Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]] applied to four slices."""
    return [t[0] - t[2], t[1] + t[2], t[2] - t[1], t[1] - t[3]]


def _at(m) -> list:
    """Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]] applied along the first axis of ``m`` (4 entries)."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def transformed_weight(weight: torch.Tensor) -> torch.Tensor:
    """G g Gᵀ of every (output, input) filter of a [O, C, 3, 3] weight, as [16, 1, O, C] (computed in float64)."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("xi,ocij,yj->xyoc", g, weight.detach().double(), g)
    return u.reshape(16, 1, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


def winograd_conv(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, w, bias, padding=1) for even H, W, with ``u = transformed_weight(w)``. The batch is never read
    from the shape (−1 in every reshape), so a dynamic batch stays dynamic in the trace."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    xp = F.pad(x, (1, 1, 1, 1))
    rows = _bt([xp[:, :, r:r + h:2, :] for r in range(4)])  # each [N, C, H/2, W + 2]
    v = [e for t in rows for e in _bt([t[..., s:s + w:2] for s in range(4)])]  # 16 × [N, C, H/2, W/2]
    m = torch.matmul(u, torch.stack(v).reshape(16, -1, c, (h // 2) * (w // 2)))  # [16, N, O, P]
    o = u.shape[2]
    m = m.reshape(4, 4, -1, o, h // 2, w // 2)
    y = [e for a in _at(m) for e in _at(a)]  # y[2·i + j]: the output pixel (i, j) of each 2×2 tile
    y = F.pixel_shuffle(torch.stack(y, 2).reshape(-1, o * 4, h // 2, w // 2), 2)
    return y if bias is None else y + bias.reshape(1, -1, 1, 1)


def _eligible(m) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1) and m.padding == (1, 1)
            and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros"
            and m.in_channels >= MIN_CHANNELS)


class _WinogradForward:
    """A Conv2d's forward for the trace: Winograd on inputs of ≤ MAX_PIXELS with even sides, else the conv's own."""

    def __init__(self, conv: nn.Conv2d, original):
        self.conv, self.original, self.used = conv, original, 0
        self.u = transformed_weight(conv.weight)

    def __call__(self, x):
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h * w > MAX_PIXELS or h % 2 or w % 2:
            return self.original(x)
        self.used += 1
        return winograd_conv(x, self.u, self.conv.bias)


@contextlib.contextmanager
def winograd_convs(*modules):
    """Within the block, every eligible Conv2d under ``modules`` (3×3, stride 1, padding 1, ≥ MIN_CHANNELS inputs)
    runs as Winograd on small inputs; yields the list of patched forwards (``sum(f.used for f in …)`` after a trace:
    how many convolutions the graph computes that way)."""
    patched = []
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if _eligible(m):
                f = _WinogradForward(m, m.forward)
                m.forward = f  # an instance attribute: nn.Module.__call__ calls it instead of the class's forward
                patched.append((m, f))
    try:
        yield [f for _, f in patched]
    finally:
        for m, _ in patched:
            del m.forward
