"""`fewstep demo`: what fewstep is for, on the shipped digits teacher, in a few minutes on a CPU.

1. a classic solver at a few network calls (DPM-Solver++(2M), 4 NFE);
2. the same solver with learned timesteps + D-ODE coefficients, fitted here in seconds;
3. the shipped one-step student (DMD2 where shipped, else the progressive student);
4. the fitted sampler exported to one ONNX graph and run by the C++ runtime, timed against the
   eager PyTorch executor on the same batch.

Every sampler starts from the same Philox noise and classes; each is scored against the reference
ODE solve from that noise (RMSE), and by FD-digits, precision / recall and class accuracy. One
summary table on stdout, one labelled picture (a row per sampler, classes 0–9 as columns).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch

import fewstep

COLS = 10  # one column per class


def _timed(fn, repeats: int = 5) -> tuple[object, float]:
    """(result, median seconds) of ``repeats`` calls after one warm-up call."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def picture(path: str, rows: list[tuple[str, np.ndarray]], scale: int = 4) -> None:
    """A PNG with one labelled row per sampler: label on the left, ``COLS`` samples [C, H, W] in [−1, 1]."""
    import io

    from PIL import Image, ImageDraw

    from .runtime.plan import atomic_write_bytes

    h, w = rows[0][1].shape[-2:]
    cell, pad, label_w, head = h * scale, 2, 260, 18
    img = Image.new("L", (label_w + COLS * (cell + pad), head + len(rows) * (cell + pad)), 255)
    draw = ImageDraw.Draw(img)
    for c in range(COLS):
        draw.text((label_w + c * (cell + pad) + cell // 2 - 3, 3), str(c), fill=0)
    for r, (label, x) in enumerate(rows):
        y0 = head + r * (cell + pad)
        draw.text((4, y0 + cell // 2 - 6), label, fill=0)
        for c in range(COLS):
            tile = ((np.clip(x[c, 0], -1, 1) + 1) * 127.5).round().astype(np.uint8)
            tile = Image.fromarray(tile).resize((cell, cell), Image.NEAREST)
            img.paste(tile, (label_w + c * (cell + pad), y0))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _student():
    from .runtime.models import SHIPPED_BUNDLES, load

    for name in ("digits-dmd2", "digits-guided"):
        if os.path.exists(os.path.join(SHIPPED_BUNDLES.get(name, ""), "students.json")):
            return load(name, steps=1)
    return None


def run(out_dir: str, solver: str = "dpmpp-2m", nfe: int = 4, n: int = 500, seed: int = 0,
        say=print) -> list[dict]:
    from .export.onnx import export_onnx
    from .runtime.executor import sample
    from .runtime.models import load
    from .runtime.reference import REFERENCE_STEPS, reference
    from .runtime.run import load_engine
    from .runtime.run import sample as engine_sample
    from .runtime.sampling import make_inputs, run_plan
    from .runtime.solvers import build
    from .training.evaluate import quality
    from .training.fit import FitConfig, fit

    t_start = time.perf_counter()
    teacher = load("digits")
    den = teacher.denoiser
    say(f"fewstep {fewstep.__version__} demo: the digits teacher ({teacher.content_hash[:19]}…), {n} samples, "
        f"classes drawn evenly, seed {seed}")
    base = build(solver, nfe, den.sigma_min, den.sigma_max)
    inputs = make_inputs(teacher, base, n, seed)
    say(f"  reference ODE solve ({4 * REFERENCE_STEPS['digits']} NFE) ...")
    ref = reference(teacher, inputs, base.sigma_init)
    rows, pics = [], []

    def score(label, plan_nfe, x, extra=None):
        q = quality(teacher, x, inputs, ref)
        rows.append({"sampler": label, "nfe": plan_nfe, **q, **(extra or {})})
        pics.append((label, x[:COLS].numpy()))
        say(f"  {label:34s} NFE {plan_nfe:2d}  FD {q['fd_digits']:6.2f}  RMSE {q['rmse_vs_reference']:.4f}")

    score(f"{solver} (base)", nfe, run_plan(teacher, base, inputs))
    t0 = time.perf_counter()
    # fitting noise ≠ evaluation noise; a smaller search than `fewstep fit`'s defaults keeps it to seconds
    # (dpmpp-2m-4: 18 s, fitting-batch RMSE 0.091 against 0.172 for D-ODE alone, measured 2026-12-01)
    fitted = fit(teacher, FitConfig(solver, nfe, "timesteps+dode", batch=50, timestep_evals=30, joint_evals=6,
                                    seed=seed + 1000))
    fit_s = time.perf_counter() - t0
    score(f"{solver} + timesteps + D-ODE", nfe, run_plan(teacher, fitted, inputs), {"fit_seconds": fit_s})
    student = _student()
    if student is not None:
        plan1 = student.plans["deterministic"]
        score(f"{student.name} (1-step student)", plan1.nfe, run_plan(student, plan1, inputs))

    # The fitted sampler as one engine, run by the C++ runtime from the same noise.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fitted.onnx")
        export_onnx(den, fitted, path, sample_shape=teacher.shape, num_classes=teacher.num_classes,
                    teacher_hash=teacher.content_hash)
        eng = load_engine(path, threads=torch.get_num_threads())
        labels = inputs.labels.numpy()
        b = 16  # one latency batch, the same for both paths
        z = inputs.z[:b].numpy()
        x_eng, eng_s = _timed(lambda: eng.sample(seed, b, labels=labels[:b], z=z))
        with torch.no_grad():
            _, eager_s = _timed(lambda: sample(fitted, den, inputs.z[:b], cond=inputs.labels[:b]))
        x_all = engine_sample(eng, seed, n, cls=None, z=inputs.z.numpy())
    score(f"exported, C++ runtime (batch {b})", nfe, torch.from_numpy(x_all),
          {"latency_ms": eng_s * 1e3, "eager_latency_ms": eager_s * 1e3})
    pics.append((f"reference ODE ({4 * REFERENCE_STEPS['digits']} NFE)", ref[:COLS].numpy()))
    rows.append({"sampler": "reference ODE solve", "nfe": 4 * REFERENCE_STEPS["digits"],
                 **quality(teacher, ref, inputs, None)})
    os.makedirs(out_dir, exist_ok=True)
    grid = os.path.join(out_dir, "demo.png")
    picture(grid, pics)
    summary = (f"fit: {fit_s:.1f} s; C++ engine {eng_s * 1e3:.1f} ms vs eager PyTorch {eager_s * 1e3:.1f} ms per "
               f"batch of {b} ({eng_s / eager_s:.2f}×, {torch.get_num_threads()} thread(s), medians of 5); "
               f"{time.perf_counter() - t_start:.0f} s in all")
    say("")
    say(table(rows))
    say("")
    say(f"  {summary}; picture: {grid}")
    from .runtime.plan import atomic_write_text

    atomic_write_text(os.path.join(out_dir, "demo.md"),
                      f"# fewstep demo (digits, {solver} at {nfe} NFE, {n} samples, seed {seed})\n\n"
                      f"{table(rows)}\n\n{summary}.\n\n![samples](demo.png)\n")
    return rows


def table(rows: list[dict]) -> str:
    head = "| sampler | network calls | FD-digits | precision | recall | class acc. | RMSE vs reference |"
    lines = [head, "|" + " --- |" * 7]
    def f(r, k, fmt):
        return format(r[k], fmt) if k in r else "–"

    for r in rows:
        lines.append(f"| {r['sampler'].strip()} | {r['nfe']} | {f(r, 'fd_digits', '.2f')} | "
                     f"{f(r, 'precision', '.3f')} | {f(r, 'recall', '.3f')} | {f(r, 'class_accuracy', '.3f')} | "
                     f"{f(r, 'rmse_vs_reference', '.4f')} |")
    return "\n".join(lines)
