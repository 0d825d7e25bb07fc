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
