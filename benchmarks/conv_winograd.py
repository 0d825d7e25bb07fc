"""Would Winograd convolutions make the SD 1.5 engine faster in ONNX Runtime on this CPU? (issue 16, the latency
targets: convolutions are 47 % of a fused UNet call, `sd15_profile.md`.)

A 3×3 stride-1 convolution as Winograd F(2×2, 3×3) written in ONNX ops (strided Slice + Add/Sub for the input
transform, one batched MatMul against the pre-transformed weights — 16 products instead of 36 per 2×2 output tile,
2.25× fewer multiplies — and Add/Sub + DepthToSpace for the output transform), against ONNX Runtime's own Conv, at the
SD 1.5 UNet's conv sizes with CFG's batch 2 (320 ch at 64², 640 at 32², 1280 at 16² and 8², and the up path's
2560 → 1280 at 8² and 1920 → 640 at 32²). Medians of 7 runs after a
warm-up, both graphs in one process, one and two intra-op threads; the error against a float64 convolution.

    .venv/bin/python benchmarks/conv_winograd.py      # -> benchmarks/results/conv_winograd.{json,md}

In isolation the wide low-resolution convolutions are faster this way; an SD 1.5 engine with them rewritten was
much slower (`results/sd15_winograd_engine.md`), so fewstep's exporter does not do it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "conv_winograd")


class WinogradConv(nn.Module):
    """``conv`` (3×3, stride 1, padding 1, even H and W) as Winograd F(2×2, 3×3) (Lavin & Gray 2016)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        w = conv.weight.detach().double()
        g = torch.tensor([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=torch.float64)
        u = torch.einsum("xi,ocij,yj->xyoc", g, w, g)  # G w Gᵀ per (out, in) pair: [4, 4, O, C]
        self.register_buffer("u", u.reshape(16, 1, w.shape[0], w.shape[1]).float().contiguous())
        self.register_buffer("b", conv.bias.detach().reshape(1, -1, 1, 1).clone())

    @staticmethod
    def _bt(t):  # Bᵀ = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]] applied to 4 slices
        return [t[0] - t[2], t[1] + t[2], t[2] - t[1], t[1] - t[3]]

    def forward(self, x):
        n, c, h, w = x.shape
        xp = F.pad(x, (1, 1, 1, 1))
        rows = self._bt([xp[:, :, r:r + h:2, :] for r in range(4)])
        v = [e for t in rows for e in self._bt([t[..., s:s + w:2] for s in range(4)])]
        m = torch.matmul(self.u, torch.stack(v).reshape(16, n, c, (h // 2) * (w // 2)))  # [16, n, O, P]
        o = m.shape[2]
        m = m.reshape(4, 4, n, o, h // 2, w // 2)
        at = [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]  # Aᵀ = [[1,1,1,0],[0,1,-1,-1]]
        y = [e for a in at for e in (a[0] + a[1] + a[2], a[1] - a[2] - a[3])]
        return F.pixel_shuffle(torch.stack(y, 2).reshape(n, o * 4, h // 2, w // 2), 2) + self.b


def main() -> int:
    import onnxruntime as ort

    from fewstep.runtime.plan import atomic_write_text

    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ch, cout, res in ((320, 320, 64), (640, 640, 32), (1920, 640, 32), (1280, 1280, 16), (1280, 1280, 8),
                              (2560, 1280, 8)):
            conv = nn.Conv2d(ch, cout, 3, padding=1)
            x = torch.randn(2, ch, res, res)
            wino = WinogradConv(conv)
            with torch.no_grad():
                ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
                scale = float(ref.abs().max())
                errs = {k: float((m(x).double() - ref).abs().max()) / scale for k, m in (("conv", conv),
                                                                                         ("winograd", wino))}
            paths = {}
            for name, m in (("conv", conv), ("winograd", wino)):
                paths[name] = os.path.join(tmp, f"{name}_{ch}_{cout}_{res}.onnx")
                torch.onnx.export(m, (x,), paths[name], dynamo=False, opset_version=17, input_names=["x"])
            for threads in (1, 2):
                ms = {}
                for name, path in paths.items():
                    so = ort.SessionOptions()
                    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
                    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
                    feed = {"x": x.numpy()}
                    s.run(None, feed)
                    ts = []
                    for _ in range(7):
                        t0 = time.perf_counter()
                        s.run(None, feed)
                        ts.append(time.perf_counter() - t0)
                    ms[name] = statistics.median(ts) * 1e3
                rows.append({"channels": ch, "out_channels": cout, "resolution": res, "batch": 2, "threads": threads,
                             "conv_ms": ms["conv"], "winograd_ms": ms["winograd"],
                             "ratio": ms["winograd"] / ms["conv"], "rel_err_conv": errs["conv"],
                             "rel_err_winograd": errs["winograd"]})
                print(json.dumps(rows[-1]), flush=True)
    res = {"device": "CPU (2 cores; see BENCHMARKS.md)", "onnxruntime": ort.__version__, "rows": rows}
    atomic_write_text(OUT + ".json", json.dumps(res, indent=1) + "\n")
    lines = ["# 3×3 convolution: ONNX Runtime's Conv vs Winograd F(2×2, 3×3) in ONNX ops (issue 16)", "",
             "Generated by `benchmarks/conv_winograd.py`; medians of 7 runs, ONNX Runtime "
             f"{ort.__version__} CPU EP, batch 2 (CFG). Error: max |y − y₆₄| / max |y₆₄| against a float64 conv.", "",
             "| channels in → out | resolution | threads | Conv ms | Winograd ms | Winograd ÷ Conv | Conv err "
             "| Winograd err |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['channels']} → {r['out_channels']} | {r['resolution']}² | {r['threads']} "
                     f"| {r['conv_ms']:.1f} | {r['winograd_ms']:.1f} | {r['ratio']:.2f} | {r['rel_err_conv']:.1e} "
                     f"| {r['rel_err_winograd']:.1e} |")
    atomic_write_text(OUT + ".md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
