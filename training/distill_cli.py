"""`fewstep distill guided|progressive|dmd2|catchup|ship`: distilled students from the command line.

Both training commands resume: run the same command again after an interruption (even
``kill -9``) and it continues from the last checkpoint in ``--out``. Under
``torchrun --nproc_per_node P -m fewstep distill …`` they train data-parallel (gloo on CPU).
"""

from __future__ import annotations

import os
import sys


def _common(p, defaults, out_help: str, ckpt_help: str | None = None) -> None:
    """The flags every training stage shares, with the stage's defaults."""
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--batch", type=int, default=defaults.batch)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--ckpt-every", type=int, default=defaults.ckpt_every, help=ckpt_help)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def register(sub, bench_sub) -> None:
    from .guided import GuidedConfig
    from .progressive import ProgressiveConfig

    g0, p0 = GuidedConfig(), ProgressiveConfig()
    d = sub.add_parser("distill", help="distil students: guided (CFG → one W-conditioned model), progressive")
    dsub = d.add_subparsers(dest="dcmd", metavar="STAGE")

    g = dsub.add_parser("guided", help="stage 1: a student that takes the guidance scale W as an input")
    g.add_argument("--teacher", default="digits", help="digits (the shipped teacher) | PATH to a digits checkpoint")
    _common(g, g0, "run directory (checkpoints, student.safetensors + .json)")
    g.add_argument("--steps", type=int, default=g0.steps)
    g.add_argument("--w-min", type=float, default=g0.w_min, help="guidance range (W = 1 + the paper's w)")
    g.add_argument("--w-max", type=float, default=g0.w_max)
    g.set_defaults(fn=cmd_guided)

    p = dsub.add_parser("progressive", help="stage 2: halve the steps of a guided student down to 1")
    p.add_argument("--student", required=True, help="the stage-1 student (its directory or student.safetensors)")
    _common(p, p0, "bundle directory: steps_N/ per halving + students.json")
    p.add_argument("--from-steps", type=int, default=p0.from_steps, help="the first teacher's DDIM steps")
    p.add_argument("--to-steps", type=int, default=p0.to_steps)
    p.add_argument("--iters", type=int, default=p0.iters, help="training steps per halving")
    p.set_defaults(fn=cmd_progressive)

    from .dmd2 import DMD2Config

    m0 = DMD2Config()
    m = dsub.add_parser("dmd2", help="DMD2: 1- and few-step generators matching the teacher's distribution")
    m.add_argument("--teacher", default="digits", help="digits (the shipped teacher) | PATH to a digits checkpoint")
    _common(m, m0, "bundle directory: steps_K/ per student + students.json", ckpt_help="loop steps between checkpoints")
    m.add_argument("--steps", default="1,4", help="the students' step counts, in training order (each starts "
                                                  "from the previous one's networks)")
    m.add_argument("--iters", default="500,150", help="generator updates per student (one count, or one each)")
    m.add_argument("--fake-updates", type=int, default=m0.fake_updates,
                   help="fake-score / classifier updates per generator update (two time-scale; 1 = ablation)")
    m.add_argument("--guidance", type=float, default=m0.guidance, help="the real score's CFG scale W")
    m.add_argument("--no-gan", action="store_true", help="no GAN term (ablation)")
    m.add_argument("--gan-g", type=float, default=m0.gan_g, help="generator GAN loss weight")
    m.add_argument("--gan-d", type=float, default=m0.gan_d, help="classifier GAN loss weight")
    m.add_argument("--ema-halflife", type=float, default=m0.ema_halflife, help="EMA of the weights (loop steps)")
    m.set_defaults(fn=cmd_dmd2)

    from .catchup import CUDConfig

    c0 = CUDConfig()
    c = dsub.add_parser("catchup", help="catch-up distillation: a flow-velocity model for few Euler steps (no teacher)")
    _common(c, c0, "bundle directory: student.safetensors, onestep/, plans, students.json")
    c.add_argument("--method", default=c0.method, help="cud | fm (the plain flow-matching baseline)")
    c.add_argument("--heads", default=c0.heads, help="Runge–Kutta alignment heads: none | rk2 | rk3")
    c.add_argument("--steps", type=int, default=c0.steps, help="training steps of the flow model")
    c.add_argument("--extra-steps", type=int, default=c0.extra_steps,
                   help="additional one-step training on the model's own 16-step samples (0 = none)")
    c.add_argument("--traj-n", type=int, default=c0.traj_n, help="saved 16-step trajectories for it")
    c.add_argument("--delta-max", type=float, default=c0.delta_max, help="catch-up step Δ ~ U(0, DELTA_MAX)")
    c.add_argument("--extra-lr", type=float, default=c0.extra_lr)
    c.set_defaults(fn=cmd_catchup)

    s = dsub.add_parser("ship", help="copy a bundle's weights, JSON and plans (no training state) to DEST")
    s.add_argument("src")
    s.add_argument("dest")
    s.set_defaults(fn=cmd_ship)


def _check_positive(args, names) -> None:
    from .guided import DistillError

    for n in names:
        v = getattr(args, n)
        if v is None or v < 1:
            raise DistillError(f"--{n.replace('_', '-')} must be ≥ 1, got {v}")


def _threads() -> None:
    # One intra-op thread: on a 2-core box two threads ran these small convolutions up to 10× slower;
    # OMP_NUM_THREADS overrides.
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def cmd_guided(args) -> int:
    from .guided import DistillError, GuidedConfig, train_guided

    _check_positive(args, ("steps", "batch", "ckpt_every"))
    if not args.lr > 0:
        raise DistillError(f"--lr must be > 0, got {args.lr}")
    if not args.w_min <= args.w_max:
        raise DistillError(f"--w-min {args.w_min} is above --w-max {args.w_max}")
    cfg = GuidedConfig(steps=args.steps, batch=args.batch, lr=args.lr, w_min=args.w_min, w_max=args.w_max,
                       ckpt_every=args.ckpt_every)
    _threads()
    path = train_guided(args.out, None if args.teacher == "digits" else args.teacher, cfg, args.seed,
                        progress=not args.quiet)
    print(f"guided student -> {path}", file=sys.stderr)
    return 0


def cmd_progressive(args) -> int:
    from .guided import DistillError
    from .progressive import ProgressiveConfig, train_progressive

    _check_positive(args, ("from_steps", "to_steps", "iters", "batch", "ckpt_every"))
    if not args.lr > 0:
        raise DistillError(f"--lr must be > 0, got {args.lr}")
    cfg = ProgressiveConfig(from_steps=args.from_steps, to_steps=args.to_steps, iters=args.iters, batch=args.batch,
                            lr=args.lr, ckpt_every=args.ckpt_every)
    _threads()
    index = train_progressive(args.out, args.student, cfg, args.seed, progress=not args.quiet)
    print(f"students for {', '.join(index['students'])} steps -> {os.path.join(args.out, 'students.json')}",
          file=sys.stderr)
    return 0


def _int_list(name: str, text: str) -> list[int]:
    from .guided import DistillError

    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise DistillError(f"--{name} expects comma-separated integers, got {text!r}") from None


def cmd_dmd2(args) -> int:
    from .dmd2 import DMD2Config, check_bundle, train_bundle
    from .guided import DistillError

    steps = _int_list("steps", args.steps)
    iters = _int_list("iters", args.iters)
    if len(iters) == 1:
        iters = iters * len(steps)
    if any(v < 1 for v in steps + iters):
        raise DistillError(f"--steps and --iters must be ≥ 1, got {args.steps!r} and {args.iters!r}")
    cfg = DMD2Config(steps=steps[0], iters=iters[0], fake_updates=args.fake_updates, batch=args.batch, lr=args.lr,
                     ema_halflife=args.ema_halflife, ckpt_every=args.ckpt_every, guidance=args.guidance,
                     gan=not args.no_gan, gan_g=args.gan_g, gan_d=args.gan_d)
    if not args.ema_halflife >= 0:
        raise DistillError(f"--ema-halflife must be ≥ 0, got {args.ema_halflife}")
    check_bundle(cfg, steps, iters)
    if args.teacher != "digits" and not os.path.exists(args.teacher):
        raise DistillError(f"--teacher {args.teacher}: not found")
    _threads()
    index = train_bundle(args.out, cfg, steps, iters, None if args.teacher == "digits" else args.teacher, args.seed,
                         progress=not args.quiet)
    print(f"dmd2 students for {', '.join(index['students'])} steps -> {os.path.join(args.out, 'students.json')}",
          file=sys.stderr)
    return 0


def cmd_catchup(args) -> int:
    from .catchup import CUDConfig, check_config, train_bundle

    cfg = CUDConfig(method=args.method, heads=args.heads, steps=args.steps, extra_steps=args.extra_steps,
                    traj_n=args.traj_n, delta_max=args.delta_max, batch=args.batch, lr=args.lr,
                    extra_lr=args.extra_lr, ckpt_every=args.ckpt_every)
    check_config(cfg)
    _threads()
    index = train_bundle(args.out, cfg, args.seed, progress=not args.quiet)
    print(f"{cfg.method} flow model, Euler plans for {', '.join(index['students'])} steps -> "
          f"{os.path.join(args.out, 'students.json')}", file=sys.stderr)
    return 0


def cmd_ship(args) -> int:
    from .bundle import ship

    for f in ship(args.src, args.dest):
        print(f)
    return 0
