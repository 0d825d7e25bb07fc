"""What every benchmark and report writes the same way: the machine it ran on and its result files.

Importable from every stage (like ``errors``): it needs the standard library, and torch / onnxruntime /
matplotlib only when asked for them.
"""

from __future__ import annotations

import json
import os
import platform
import sys


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def machine(threads: int | None = None, ort: bool = False, **extra) -> dict:
    """The machine a figure was measured on: CPU, cores, threads used, versions, the load average (the box is
    shared, so every timing says how busy it was)."""
    import torch

    m = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": threads if threads is not None else
         torch.get_num_threads(), "platform": platform.platform(), "python": sys.version.split()[0],
         "torch": torch.__version__, "load_average": os.getloadavg(), "device": "cpu"}
    if ort:
        import onnx
        import onnxruntime

        m.update(onnxruntime=onnxruntime.__version__, onnx=onnx.__version__)
    m.update(extra)
    return m


def write_results(out_dir: str, stem: str, result: dict, markdown: str) -> str:
    """``stem``.json and ``stem``.md in ``out_dir``, each written atomically; returns the path without suffix."""
    from .runtime.plan import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, stem)
    atomic_write_text(base + ".json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(base + ".md", markdown if markdown.endswith("\n") else markdown + "\n")
    return base


def save_plot(path: str, draw, figsize=(6, 4), nrows: int = 1, ncols: int = 1, dpi: int = 100) -> bool:
    """``draw(fig, axes)`` on a fresh figure (``axes`` a [nrows, ncols] array), saved as PNG atomically; False
    (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import io

    from .runtime.plan import atomic_write_bytes

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    try:
        draw(fig, axes)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True
