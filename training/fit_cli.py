"""`fewstep fit …` and `fewstep bench fit`: fitted solvers from the command line."""

from __future__ import annotations

import os


def register(sub, bench_sub) -> None:
    from ..runtime.cli_args import add_count
    from ..runtime.solvers import fittable
    from .fit import METHODS

    p = sub.add_parser("fit", help="fit a solver's coefficients / timesteps to a teacher (D-ODE, IIA, timesteps)")
    p.add_argument("--model", required=True, help="digits | gmm | PATH")
    p.add_argument("--solver", required=True, help=f"base solver family ({', '.join(fittable())})")
    p.add_argument("--nfe", type=int, required=True, help="network evaluations of the fitted plan")
    p.add_argument("--method", required=True, help=f"{' | '.join(METHODS)}; combine with '+', e.g. timesteps+iia; "
                                                  "learned (alias plan): every row coefficient and σ by gradient "
                                                  "descent from a closed-form fit")
    add_count(p, "fitting samples (default per method: D-ODE 100, IIA 16/200, …)", dest="batch", old="--batch")
    p.add_argument("--fine", type=int, help="D-ODE: teacher step factor (10); IIA: sub-steps M (3, guided 10)")
    p.add_argument("--class", dest="cls", type=int, help="fit for one class label")
    p.add_argument("--guidance", type=float, help="CFG scale W the plan is fitted for (written into its rows)")
    p.add_argument("--schedule", help="base σ schedule: edm | logsnr | vp (default: the solver's)")
    p.add_argument("--seed", type=int, default=0, help="Philox seed of the fitting noise")
    p.add_argument("--out", required=True, help="output plan JSON")
    p.add_argument("--quiet", action="store_true")
    from ..runtime.cli_args import add_conditioning

    add_conditioning(p)  # a pipeline's fitting batch: its prompts (cycled over the samples) or embeddings
    _learned_args(p)
    p.set_defaults(fn=cmd_fit)

    b = bench_sub.add_parser("fit", help="fitted vs base solvers: RMSE, FD-digits / sliced W2, fit seconds")
    b.add_argument("--model", default="gmm", help="gmm | digits")
    b.add_argument("--out", default="benchmarks/results")
    b.add_argument("--nfe", default="2,3,4,5,6,8,10")
    b.add_argument("--solvers", default="ddim,heun,dpmpp-2m,dpmpp-3m,ipndm,deis-2,deis-3,unipc")
    b.add_argument("--n", type=int, default=1000, help="held-out evaluation samples")
    b.add_argument("--seed", type=int, default=1, help="held-out noise seed (fitting uses seed 0)")
    b.set_defaults(fn=cmd_bench_fit)


def _learned_args(p) -> None:
    from .learned import LM_BLOCKS, LM_SAMPLE_ROWS, LOSSES, LR_DECAYS, OPTIMIZERS, LearnConfig

    d = LearnConfig()
    g = p.add_argument_group("--method learned (S4S-Alt / LD3; training/learned.py)")
    g.add_argument("--init", help="start from this fitted plan file instead of a closed-form fit")
    g.add_argument("--init-method", default="fast", help="start: fast (heuristic grid + D-ODE on 16 samples) or a "
                   "closed-form fit method (timesteps+dode: Nelder-Mead, 45-416 s on digits)")
    g.add_argument("--loss", default=d.loss, choices=LOSSES, help="endpoint L2, or LD3's slack-ball soft loss")
    g.add_argument("--slack", type=float, default=d.slack, help=f"LD3 ball radius, RMS in z units ({d.slack})")
    g.add_argument("--reg", type=float, default=d.reg, help=f"pull toward the closed-form rows ({d.reg})")
    g.add_argument("--rounds", type=int, default=d.rounds, help=f"coefficient + grid phases ({d.rounds})")
    g.add_argument("--coef-steps", type=int, default=d.coef_steps, help=f"steps per coefficient phase ({d.coef_steps})")
    g.add_argument("--grid-steps", type=int, default=d.grid_steps, help=f"steps per grid phase ({d.grid_steps})")
    g.add_argument("--optimizer", default=d.optimizer, choices=OPTIMIZERS,
                   help="adam; lbfgs (one minibatch per phase); lm (Levenberg-Marquardt, --lm-* flags); "
                        "auto: lm with the l2 loss; with ld3, lbfgs in phases of >= 10 steps, else adam "
                        f"({d.optimizer})")
    g.add_argument("--minibatch", type=int, default=d.minibatch, help=f"samples per Adam step ({d.minibatch})")
    g.add_argument("--lm-rounds", type=int, default=d.lm_rounds,
                   help=f"Levenberg-Marquardt rounds, a held-out check after each ({d.lm_rounds})")
    g.add_argument("--lm-steps", type=int, default=d.lm_steps,
                   help=f"Levenberg-Marquardt iterations per parameter block per round ({d.lm_steps})")
    g.add_argument("--lm-blocks", default=d.lm_blocks, choices=LM_BLOCKS,
                   help=f"joint: all parameters at once; rows: the sigmas, then each row ({d.lm_blocks})")
    g.add_argument("--lm-batch", type=int, default=d.lm_batch,
                   help=f"samples per Levenberg-Marquardt iteration (default: {LM_SAMPLE_ROWS} // NFE within 8..32 "
                        "for joint, 32 for rows)")
    g.add_argument("--budget", type=float, default=d.budget,
                   help=f"wall-clock seconds: the whole fit from the fast init, else the gradient phases "
                        f"({d.budget:g}; 0: no limit); the held-out best so far is returned")
    g.add_argument("--joint-below", type=int, default=d.joint_below,
                   help="run each round's coefficient and grid steps as one phase where the budget leaves phases "
                        f"of fewer steps than this ({d.joint_below}: always alternate)")
    g.add_argument("--heldout", type=int, default=50, help="held-out samples for early stopping (50)")
    g.add_argument("--history", type=int, help="K of the learned rows (default: max(init's K, 2))")
    g.add_argument("--evals", type=int, default=d.evals,
                   help=f"network evaluations for all steps ({d.evals}; 0: no limit)")
    g.add_argument("--patience", type=int, default=d.patience, help=f"Adam / L-BFGS phases without a held-out gain "
                   f"before stopping ({d.patience}; 0: never stop; lm runs its --lm-rounds)")
    g.add_argument("--lr-decay", default=d.lr_decay, choices=LR_DECAYS,
                   help=f"step-size schedule: in each phase (cosine) or over the rounds ({d.lr_decay})")
    g.add_argument("--spread", type=float, default=d.spread,
                   help=f"weight of matching each sample's contrast (std) to the reference's ({d.spread})")
    g.add_argument("--features", type=float, default=d.features,
                   help="weight of matching the endpoint's features in the teacher's own network (its middle block) "
                        f"to the reference's, beside the pixel L2 ({d.features}: off)")
    g.add_argument("--feature-sigma", type=float, default=d.feature_sigma,
                   help=f"noise level at which those features are read ({d.feature_sigma})")
    g.add_argument("--grid-first", action="store_true", help="each round: grid phase before the coefficient phase")


def _cmd_fit_learned(args, say) -> int:
    from ..runtime.cli_args import apply_conditioning
    from ..runtime.models import load
    from .fit import parse_method
    from .fitcore import FitError
    from .learned import LearnConfig, fit_learned

    cfg = LearnConfig(loss=args.loss, slack=args.slack, reg=args.reg, rounds=args.rounds, coef_steps=args.coef_steps,
                      grid_steps=args.grid_steps, optimizer=args.optimizer, minibatch=args.minibatch,
                      budget=args.budget or None, history=args.history, evals=args.evals or None,
                      patience=args.patience or None, lr_decay=args.lr_decay, spread=args.spread,
                      features=args.features, feature_sigma=args.feature_sigma,
                      grid_first=args.grid_first, joint_below=args.joint_below, lm_steps=args.lm_steps,
                      lm_batch=args.lm_batch, lm_blocks=args.lm_blocks, lm_rounds=args.lm_rounds).check()
    init = None
    if args.init is not None:
        from ..runtime.plan import Plan

        init = Plan.load(args.init)
    elif args.init_method != "fast":
        parse_method(args.init_method)
    for flag, v in (("--n", args.batch), ("--heldout", args.heldout)):
        if v is not None and v < 1:
            raise FitError(f"{flag} must be ≥ 1, got {v}")
    teacher = load(args.model)
    apply_conditioning(args, teacher)
    if teacher.kind == "gmm":
        import torch

        torch.set_num_threads(1)
    plan = fit_learned(teacher, args.solver, args.nfe, cfg, init=init, init_method=args.init_method,
                       batch=args.batch or 100, heldout=args.heldout, cls=args.cls, guidance=args.guidance,
                       seed=args.seed, schedule=args.schedule, progress=say)
    plan.save(args.out)
    pv = plan.provenance
    print(f"{plan.name}: held-out endpoint RMSE {pv['heldout_rmse_init']:.4g} (closed-form) -> "
          f"{pv['heldout_rmse']:.4g} "
          f"({pv['winner']} kept) in {pv['fit_seconds']:.1f} s (gradient phases {pv['learn_seconds']:.1f} s) "
          f"-> {args.out}")
    return 0


def cmd_fit(args) -> int:
    import sys

    import torch

    from ..runtime.cli_args import apply_conditioning
    from ..runtime.files import check_writable_file
    from ..runtime.models import load
    from .fit import FitConfig, fit, parse_method
    from .fitcore import FitError
    from .learned import METHODS as LEARNED

    if args.method in LEARNED:
        if args.nfe < 1:
            raise FitError(f"--nfe must be ≥ 1, got {args.nfe}")
        check_writable_file(args.out)
        return _cmd_fit_learned(args, None if args.quiet else
                                (lambda s: print(f"fewstep fit: {s}", file=sys.stderr, flush=True)))
    parse_method(args.method)  # bad arguments fail before any work
    if args.nfe < 1:
        raise FitError(f"--nfe must be ≥ 1, got {args.nfe}")
    for flag, v in (("--n", args.batch), ("--fine", args.fine)):
        if v is not None and v < 1:
            raise FitError(f"{flag} must be ≥ 1, got {v}")
    check_writable_file(args.out)
    teacher = load(args.model)
    apply_conditioning(args, teacher)
    if teacher.kind == "gmm":
        # The exact GMM's ops are tiny: intra-op threads only contend (7 ms vs 0.08 ms per softmax on 2 busy cores).
        torch.set_num_threads(1)
    say = None if args.quiet else (lambda s: print(f"fewstep fit: {s}", file=sys.stderr, flush=True))
    cfg = FitConfig(args.solver, args.nfe, args.method, batch=args.batch, fine=args.fine, cls=args.cls,
                    guidance=args.guidance, seed=args.seed, schedule=args.schedule)
    plan = fit(teacher, cfg, progress=say)
    plan.save(args.out)
    pv = plan.provenance
    print(f"{plan.name}: fitting-batch endpoint RMSE {pv['fit_rmse_base']:.4g} (base) -> {pv['fit_rmse']:.4g} "
          f"in {pv['fit_seconds']:.1f} s -> {args.out}")
    return 0


def cmd_bench_fit(args) -> int:
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "benchmarks", "fit_quality.py")
    if not os.path.exists(path):  # installed wheel: benchmarks/ is not shipped
        print("fewstep: error: benchmarks/fit_quality.py not found (run from a source checkout)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("fit_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(["--model", args.model, "--out", args.out, "--nfe", args.nfe, "--solvers", args.solvers,
                     "--n", str(args.n), "--seed", str(args.seed)])
