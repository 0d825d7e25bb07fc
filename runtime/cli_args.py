"""Arguments every command spells the same way (one vocabulary across `fewstep …` and `fewstep-run`).

- ``--n N``: how many samples (sample, eval, run, fit's fitting samples); ``--batch`` is the batch of
  a graph or of one call (export, bench latency, distill), never a sample count.
- ``--class C|none``: a class index, or ``none`` for the null label (unconditional).
- ``--out``: the file or directory written; missing parent directories are created.
Old spellings keep working where they existed, with one deprecation line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import FewstepError


def class_arg(text: str):
    """A class index, or "none" (the null label: unconditional sampling)."""
    if text.strip().lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class index or 'none', got {text!r}") from None


class DeprecatedAlias(argparse.Action):
    """An old spelling of a flag: stores into the new flag's ``dest`` and says which flag to use."""

    def __init__(self, option_strings, dest, new: str, **kw):
        self.new = new
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"fewstep: warning: {option_string} is deprecated in `{parser.prog}`; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_count(p: argparse.ArgumentParser, help: str, dest: str = "n", old: str | None = None, **kw) -> None:
    """``--n`` (how many samples), plus ``old`` as a deprecated spelling of it."""
    p.add_argument("--n", dest=dest, type=int, help=help, **kw)
    if old:
        p.add_argument(old, dest=dest, type=int, action=DeprecatedAlias, new="--n", help=argparse.SUPPRESS)


class ArgumentError(FewstepError):
    """Arguments that do not fit together (exit 2, one line)."""


MODEL_HELP = ("digits | digits-guided | digits-dmd2 | digits-cud | gmm | PATH (checkpoint, distilled bundle, diffusers "
              "model or pipeline folder)")


def add_sampler(p: argparse.ArgumentParser, title: str = "sampler (one of)", force: bool = True) -> None:
    """``--model`` and the sampler flags every sampling command takes; ``resolve_plan`` reads them."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    g = p.add_argument_group(title)
    g.add_argument("--solver", help="solver name (see `fewstep solvers`)")
    g.add_argument("--nfe", type=int, help="network evaluations (with --solver; alone, a distilled model's "
                                           "student for that many steps)")
    g.add_argument("--stochastic", action="store_true",
                   help="distilled students: the stochastic sampler (a double step, then re-noise one step back)")
    g.add_argument("--schedule", help="σ schedule for --solver: edm | logsnr | vp (default: the solver's)")
    g.add_argument("--plan", help="a plan JSON file (fewstep.plan/1)")
    if force:
        p.add_argument("--force", action="store_true", help="use a plan fitted for another model anyway")


def student_steps(args) -> int | None:
    """--nfe without --solver/--plan names a distilled model's student (ignored by other models)."""
    return args.nfe if args.nfe is not None and not args.solver and not getattr(args, "plan", None) else None


def load_model(args):
    """The ``--model`` of ``args`` (a distilled bundle's student when ``--nfe`` alone names one), with the
    command's text conditioning bound to it."""
    from .models import load

    model = load(args.model, steps=student_steps(args))
    apply_conditioning(args, model)
    return model


def student_plan(args, model):
    """A distilled student's own Plan when the command named none, else None."""
    if model.plans and not args.solver and not getattr(args, "plan", None):
        return model.plans["stochastic" if getattr(args, "stochastic", False) else "deterministic"]
    if getattr(args, "stochastic", False):
        raise ArgumentError("--stochastic picks a distilled student's stochastic sampler: use it with a distilled "
                            "model (e.g. --model digits-guided --nfe 4) and no --solver/--plan")
    return None


def resolve_plan(args, model, optional: bool = False):
    """The Plan the sampler flags name for ``model``: a student's own, ``--plan FILE`` (refused when fitted for
    another model, unless ``--force``) or ``--solver NAME --nfe N``. ``optional``: None when none is named."""
    from .plan import Plan
    from .solvers import build

    own = student_plan(args, model)
    if own is not None:
        return own
    if args.plan and (args.solver or args.nfe is not None):
        raise ArgumentError("give either --plan FILE or --solver NAME --nfe N, not both")
    if args.plan:
        plan = Plan.load(args.plan)
        want = plan.provenance.get("teacher_hash")
        if want and want != model.content_hash and not getattr(args, "force", False):
            raise ArgumentError(f"plan {args.plan} was fitted for teacher {want[:19]}…, but {model.name} is "
                                f"{model.content_hash[:19]}… (content hash); pass --force to use it anyway")
        return plan
    if args.solver and args.nfe is not None:
        den = model.denoiser
        return build(args.solver, args.nfe, den.sigma_min, den.sigma_max, schedule=getattr(args, "schedule", None))
    if optional and not args.solver and args.nfe is None:
        return None
    raise ArgumentError("choose a sampler: --solver NAME --nfe N, or --plan FILE")


def add_conditioning(p: argparse.ArgumentParser) -> None:
    """Text conditioning for pipeline models (``--model DIR`` with model_index.json)."""
    g = p.add_argument_group("text-to-image pipelines (--model DIR with model_index.json)")
    g.add_argument("--prompt", action="append", metavar="TEXT",
                   help="prompt, encoded by the pipeline's text encoders; repeat for one per sample (cycled)")
    g.add_argument("--negative-prompt", action="append", metavar="TEXT",
                   help="the unconditional half of --guidance (default: the empty prompt); repeatable")
    g.add_argument("--embeddings", metavar="FILE.safetensors",
                   help="precomputed conditioning: the engine's input names ([N or 1, …] float tensors; "
                        "negative_<name> for the unconditional half), instead of --prompt")


def apply_conditioning(args, model) -> None:
    """Bind --prompt / --negative-prompt / --embeddings to ``model`` (``Model.cond_source``); refuse them on a model
    that takes no text."""
    prompts, negs, emb = getattr(args, "prompt", None), getattr(args, "negative_prompt", None), \
        getattr(args, "embeddings", None)
    if model.pipeline is None:
        if prompts or negs or emb:
            raise ArgumentError(f"--prompt / --negative-prompt / --embeddings: {model.name} is not a text-to-image "
                                f"pipeline")
        return
    from .noise import MAX_ELEMENTS
    from .pipelines import CondSource, check_prompts, read_embeddings

    if emb and (prompts or negs):
        raise ArgumentError("give either --prompt (with --negative-prompt) or --embeddings, not both")
    if negs and not prompts:
        raise ArgumentError("--negative-prompt needs --prompt")
    if emb:
        model.cond_source = CondSource(model.pipeline, embeddings=read_embeddings(emb, model.pipeline.cond_inputs,
                                                                                  MAX_ELEMENTS))
    elif prompts:
        model.cond_source = CondSource(model.pipeline, check_prompts(prompts), check_prompts(negs))
