"""``fewstep ARGS`` in the test's own process (the CLI's entry point, no interpreter start-up per call)."""

from __future__ import annotations

import subprocess


def run(capsys, *args, ok=True) -> subprocess.CompletedProcess:
    """The CLI's exit code and captured output as a CompletedProcess; ``ok``: assert it succeeded."""
    from fewstep.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    p = subprocess.CompletedProcess(args, rc, out.out, out.err)
    if ok:
        assert rc == 0, p.stderr[-3000:]
    return p
