"""The `fewstep` command line.

User errors (bad plans, unknown names, missing files, wrong shapes) print one line
`fewstep: error: …` and exit 2, with no traceback; FEWSTEP_DEBUG=1 shows tracebacks.
Outputs are written atomically, and only after every input has been checked.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time

import fewstep

from .runtime.cli_args import ArgumentError, load_model, resolve_plan

# Exit codes (README): 0 done, 1 internal error (a bug: please report it), 2 bad input,
# 3 a result that is not finite (nothing written), 130 interrupted (nothing left behind).
EXIT_INTERNAL, EXIT_USER, EXIT_NONFINITE, EXIT_INTERRUPTED = 1, 2, 3, 130


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (its default prints the whole usage first)."""

    def error(self, message: str):
        self.exit(EXIT_USER, f"fewstep: error: {self.prog.removeprefix('fewstep ')}: {message}\n")


_USER_ERROR_CLASSES = (("fewstep.runtime.plan", "PlanError"), ("fewstep.runtime.solvers", "SolverError"),
                       ("fewstep.runtime.schedules", "ScheduleError"), ("fewstep.runtime.executor", "InputError"),
                       ("fewstep.runtime.models", "ModelError"))


def _user_errors() -> tuple[type[BaseException], ...]:
    from .errors import FewstepError

    # A class whose module was never imported cannot have been raised: importing it here would cost an error
    # from `fewstep run` the torch import (the executor's) that the command itself avoided.
    loaded = tuple(getattr(sys.modules[m], name) for m, name in _USER_ERROR_CLASSES if m in sys.modules)
    return (FewstepError, *loaded, FileNotFoundError, NotADirectoryError, PermissionError, IsADirectoryError)


# ---------------------------------------------------------------------------------------
# shared arguments


def _add_model_plan(p: argparse.ArgumentParser) -> None:
    from .runtime.cli_args import add_conditioning, add_sampler, class_arg

    add_sampler(p)
    add_conditioning(p)
    p.add_argument("--class", dest="cls", type=class_arg,
                   help="class label for conditional models, or 'none' (the null label: unconditional)")
    p.add_argument("--guidance", type=float, help="CFG scale W: D_u + W·(D_c − D_u); 1 = plain conditional")
    p.add_argument("--n", type=int, help="number of samples (default: the noise file's N, else 64; eval 256)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--seed", type=int, default=0, help="Philox seed for z (and ε of stochastic rows)")
    src.add_argument("--noise", help="initial z as a float32 .npy of shape N×…")


def _read_noise(path: str):
    from .runtime.files import read_npy
    from .runtime.noise import MAX_ELEMENTS

    return read_npy(path, "noise file", MAX_ELEMENTS)


def _inputs(args, teacher, plan):
    from .runtime.sampling import make_inputs

    z = _read_noise(args.noise) if args.noise else None
    return make_inputs(teacher, plan, _count(args, z, teacher), args.seed, args.cls, z)


def _count(args, z, teacher=None) -> int:
    if args.n is not None:
        return args.n
    if z is not None and z.ndim >= 1:
        return z.shape[0]
    given = getattr(getattr(teacher, "cond_source", None), "default_n", None)  # one sample per prompt / row
    return given or args.default_n


def save_grid(path: str, images, ncol: int | None = None, scale: int = 4, captions=None) -> None:
    """Tile [N, C, H, W] images in [−1, 1] into a PNG (nearest-neighbour upscaled); ``captions``: one line of
    text under each image (prompts)."""
    import math

    import numpy as np
    from PIL import Image

    from .runtime.plan import atomic_write_bytes

    x = np.asarray(images, dtype=np.float32)
    n, c, h, w = x.shape
    ncol = ncol or max(1, int(math.ceil(math.sqrt(n))))
    nrow = int(math.ceil(n / ncol))
    pad = 1
    grid = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = \
            x[i].transpose(1, 2, 0)
    img = ((np.clip(grid, -1, 1) + 1) * 127.5).round().astype(np.uint8)
    img = img.repeat(scale, 0).repeat(scale, 1)
    pil = Image.fromarray(img[..., 0] if c == 1 else img)
    if captions is not None:
        pil = _captioned(pil, captions, nrow, ncol, (h + pad) * scale, (w + pad) * scale, pad * scale)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _captioned(pil, captions, nrow: int, ncol: int, cell_h: int, cell_w: int, pad: int):
    """The grid with a text band under each row: each image's caption, cut to the cell width."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    band = 14
    out = Image.new("RGB", (pil.width, pil.height + nrow * band), "white")
    draw = ImageDraw.Draw(out)
    for r in range(nrow):
        out.paste(pil.crop((0, r * cell_h, pil.width, (r + 1) * cell_h + pad)).convert("RGB"), (0, r * (cell_h + band)))
        for col in range(ncol):
            i = r * ncol + col
            if i >= len(captions):
                break
            text = str(captions[i]).replace("\n", " ")
            while text and draw.textlength(text, font=font) > cell_w - 2:
                text = text[:-2] + "…" if len(text) > 1 else ""
            draw.text((col * cell_w + pad, (r + 1) * cell_h + pad + r * band), text, fill="black", font=font)
    return out


def save_images(out_dir: str, images) -> list[str]:
    """One PNG per [C, H, W] image in [−1, 1]: DIR/00000.png, …"""
    import numpy as np
    from PIL import Image

    from .runtime.plan import atomic_write_bytes

    paths = []
    for i, x in enumerate(np.asarray(images, dtype=np.float32)):
        img = ((np.clip(x.transpose(1, 2, 0), -1, 1) + 1) * 127.5).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, format="PNG")
        paths.append(os.path.join(out_dir, f"{i:05d}.png"))
        atomic_write_bytes(paths[-1], buf.getvalue())
    return paths


def check_out_dir(path: str) -> None:
    from .runtime.files import check_writable_dir

    check_writable_dir(path)


def _prepare_out_dir(path: str) -> None:
    check_out_dir(path)
    os.makedirs(path, exist_ok=True)


# ---------------------------------------------------------------------------------------
# commands


NONFINITE_HINT = ("nothing was written. A plan coefficient or --guidance far out of range does this: "
                  "try a smaller --guidance, or check the plan's rows")


def cmd_sample(args) -> int:
    from .errors import check_finite
    from .runtime.files import save_npy
    from .runtime.sampling import run_plan

    teacher = load_model(args)
    plan = resolve_plan(args, teacher)
    inputs = _inputs(args, teacher, plan)
    from .runtime.sampling import check_guidance

    check_guidance(teacher, args.guidance, inputs.labels)
    check_out_dir(args.out)
    t0 = time.perf_counter()
    x = run_plan(teacher, plan, inputs, args.guidance)
    secs = time.perf_counter() - t0
    check_finite(x, f"{plan.name} on {teacher.name}", NONFINITE_HINT)
    decoder = None if getattr(args, "latents", False) else teacher.decoder()
    images = None
    if decoder is not None:  # latents → pixels through the pipeline's VAE
        import torch

        with torch.no_grad():
            images = torch.cat([decoder(x[i:i + 8]) for i in range(0, x.shape[0], 8)])
        check_finite(images, f"decoding {teacher.name}'s latents", NONFINITE_HINT)
    _prepare_out_dir(args.out)
    arr = x.detach().cpu().numpy().astype("float32")
    save_npy(os.path.join(args.out, "samples.npy"), arr)
    extra = ""
    if images is not None:
        imgs = images.float().numpy()
        save_images(args.out, imgs)
        captions = teacher.cond_source.captions(len(imgs)) if teacher.cond_source is not None else None
        save_grid(os.path.join(args.out, "grid.png"), imgs[:100], scale=max(1, 128 // imgs.shape[-1]),
                  captions=captions[:100] if captions else None)  # cells ≥ 128 px wide: room for a caption
        extra = f", {len(imgs)} PNG images + grid {os.path.join(args.out, 'grid.png')}"
    elif teacher.is_image and teacher.pipeline is None:
        save_grid(os.path.join(args.out, "grid.png"), arr[:100])
        extra = f", grid {os.path.join(args.out, 'grid.png')}"
    print(f"{plan.name}: {arr.shape[0]} samples of {teacher.name} at NFE {plan.nfe} in {secs:.2f} s "
          f"-> {os.path.join(args.out, 'samples.npy')}{extra}")
    return 0


def cmd_eval(args) -> int:
    from .errors import NonFiniteError
    from .training.evaluate import evaluate

    teacher = load_model(args)
    plan = resolve_plan(args, teacher)
    z = _read_noise(args.noise) if args.noise else None
    res = evaluate(teacher, plan, _count(args, z, teacher), args.seed, args.cls, args.guidance, z)
    bad = [k for k, v in res.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"{plan.name} on {teacher.name}: {', '.join(bad)} not finite")
    if args.json:
        print(json.dumps(res))
    else:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    return 0


def cmd_teacher_train(args) -> int:
    if args.which != "digits":
        raise ArgumentError(f"unknown teacher {args.which!r}: only 'digits' is trained (gmm is exact)")
    from .training.digits import train_teacher

    kw = {} if args.steps is None else {"steps": args.steps}
    path = train_teacher(args.out, seed=args.seed, progress=not args.quiet, **kw)
    print(f"digits teacher -> {path}")
    return 0


def cmd_demo(args) -> int:
    """The product on the shipped digits teacher: base solver, fitted solver, 1-step student, C++ engine."""
    from .demo import run

    check_out_dir(args.out)
    if args.n < COLS_DEMO:
        raise ArgumentError(f"--n must be ≥ {COLS_DEMO} (one sample per class in the picture), got {args.n}")
    if args.nfe < 1:
        raise ArgumentError(f"--nfe must be ≥ 1, got {args.nfe}")
    run(args.out, solver=args.solver, nfe=args.nfe, n=args.n, seed=args.seed)
    return 0


COLS_DEMO = 10


def cmd_solvers(args) -> int:
    from .runtime.solvers import aliases_of, solvers

    for s in solvers().values():
        also = aliases_of(s.name)
        print(f"{s.name:16s} {s.summary}" + (f"  [also: {', '.join(also)}]" if also else "")
              + ("" if s.fittable else "  (not fittable)"))
    print("names are matched case-insensitively, with '_' for '-' and k-diffusion's sample_ prefix")
    return 0


def cmd_bench_quality(args) -> int:
    from .training.quality_table import run

    run(args.model, args.out, n=args.n, nfes=[int(v) for v in args.nfe.split(",")], seed=args.seed)
    return 0


def build_parser(command: str | None = "") -> argparse.ArgumentParser:
    """The whole CLI; ``command`` (a top-level command, or None for none) registers only the plugin that owns it:
    the training plugins import torch, which `fewstep run` on an engine and `fewstep --version` never need."""
    p = Parser(prog="fewstep", description="Few-step diffusion sampling.")
    p.add_argument("--version", action="version", version=f"fewstep {fewstep.__version__}")
    from ._native import CMakePrefixPathAction

    p.add_argument("--cmake-prefix-path", action=CMakePrefixPathAction,
                   help="print the CMake prefix of the installed C library (find_package(fewstep)) and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")

    s = sub.add_parser("sample", help="sample a model with a solver or a plan")
    _add_model_plan(s)
    s.add_argument("--out", required=True, help="output directory (samples.npy, grid.png; pipelines: one PNG "
                                                "per sample too)")
    s.add_argument("--latents", action="store_true", help="pipelines: write latents only (no VAE decode)")
    s.set_defaults(fn=cmd_sample, default_n=64)

    e = sub.add_parser("eval", help="sample and score: RMSE vs a reference solve, FD-digits / sliced W2")
    _add_model_plan(e)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(fn=cmd_eval, default_n=256)

    t = sub.add_parser("teacher", help="teachers")
    tsub = t.add_subparsers(dest="tcmd", metavar="ACTION")
    tt = tsub.add_parser("train", help="train a teacher (digits)")
    tt.add_argument("which", help="digits")
    tt.add_argument("--out", default="digits_teacher", help="output directory (checkpoints; resumes if present)")
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--steps", type=int, help="training steps (default: the shipped teacher's)")
    tt.add_argument("--quiet", action="store_true")
    tt.set_defaults(fn=cmd_teacher_train)

    d = sub.add_parser("demo", help="the main job on the shipped digits teacher: base vs fitted solver vs the "
                                    "1-step student, and the fitted sampler as a C++ engine")
    d.add_argument("--out", default="demo_out", help="directory for demo.png")
    d.add_argument("--solver", default="dpmpp-2m")
    d.add_argument("--nfe", type=int, default=4)
    d.add_argument("--n", type=int, default=500)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(fn=cmd_demo)

    ls = sub.add_parser("solvers", help="list solvers")
    ls.set_defaults(fn=cmd_solvers)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bcmd", metavar="KIND")
    bq = bsub.add_parser("quality", help="base-solver quality table (writes JSON + Markdown + PNG)")
    bq.add_argument("--model", default="gmm", help="gmm | digits")
    bq.add_argument("--out", default="benchmarks/results")
    bq.add_argument("--n", type=int, default=1000)
    bq.add_argument("--nfe", default="2,3,4,5,6,8,10")
    bq.add_argument("--seed", type=int, default=0)
    bq.set_defaults(fn=cmd_bench_quality)

    # Commands that live with their stage: each module has `register(subparsers, bench_subparsers)`.
    # All are part of the package: a missing one is a broken install, so the import fails loudly.
    import importlib

    if command is None:
        wanted = ()
    elif command in PLUGIN_COMMANDS:
        wanted = (PLUGIN_COMMANDS[command],)
    else:  # a core command, `bench` (every plugin adds to it), --help or a typo: the whole CLI
        wanted = PLUGINS
    for mod in wanted:
        importlib.import_module(mod).register(sub, bsub)
    return p


PLUGINS = ("fewstep.training.fit_cli", "fewstep.training.distill_cli", "fewstep.export.cli", "fewstep.runtime.run_cli")
# The top-level command each plugin adds (tests/test_cli.py checks this against the plugins' register()).
PLUGIN_COMMANDS = {"fit": PLUGINS[0], "distill": PLUGINS[1], "export": PLUGINS[2], "run": PLUGINS[3]}
# Top-level options that act and exit without a command (no plugin needed); --help lists every command.
_EARLY_EXIT = ("--version", "--cmake-prefix-path")


def _command(argv: list[str]) -> str | None:
    """The top-level command of ``argv`` ("" = unknown, so every plugin), None for `--version` alone."""
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is None:
        return None if any(a in _EARLY_EXIT for a in argv) and not {"-h", "--help"} & set(argv) else ""
    return first


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    from .errors import NonFiniteError
    from .runtime.files import one_line

    debug = bool(os.environ.get("FEWSTEP_DEBUG"))
    try:
        return args.fn(args)
    except NonFiniteError as exc:
        if debug:
            raise
        print(f"fewstep: error: {one_line(exc, 500)}", file=sys.stderr)
        return EXIT_NONFINITE
    except _user_errors() as exc:
        if debug:
            raise
        msg = str(exc) if not isinstance(exc, OSError) or not exc.filename else f"{exc.strerror}: {exc.filename}"
        print(f"fewstep: error: {one_line(msg, 500)}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("fewstep: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        if debug:
            raise
        print("fewstep: error: out of memory (ask for fewer samples or a smaller batch)", file=sys.stderr)
        return EXIT_INTERNAL
    except Exception as exc:  # a bug: still one line, never a traceback (FEWSTEP_DEBUG=1 shows it)
        if debug:
            raise
        print(f"fewstep: error: internal error, {type(exc).__name__}: {one_line(exc, 300)} "
              f"(FEWSTEP_DEBUG=1 shows the traceback; please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
