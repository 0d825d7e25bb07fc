"""The C library inside the installed package (`pip install .`): ``fewstep/lib/libfewstep.so``,
``fewstep/include/fewstep.h`` / ``fewstep.hpp``, ``fewstep/lib/cmake/fewstep`` (find_package(fewstep) →
fewstep::fewstep) and ``fewstep/bin/fewstep-run``, the layout of ``cmake --install`` with the package
directory as its prefix.

- ``fewstep --cmake-prefix-path`` (or ``python -m fewstep --cmake-prefix-path``, or :func:`cmake_prefix_path`)
  prints that prefix, for ``cmake -DCMAKE_PREFIX_PATH=...`` (cf. ``torch.utils.cmake_prefix_path``,
  ``pybind11 --cmakedir``).
- The ``fewstep-run`` console script execs the packaged native binary (the convention of the cmake / ninja
  wheels): same process, same arguments, stdio and exit codes.

A development checkout (``make dev``) has none of these: build them with ``cmake -S . -B build/c
-DFEWSTEP_PYTHON=OFF && cmake --install build/c --prefix PREFIX``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_CONFIG = Path("lib") / "cmake" / "fewstep" / "fewstepConfig.cmake"
_DEV_HINT = ("this fewstep is a development checkout without the C library; `pip install .` installs it "
             "(or build it: cmake -S . -B build/c -DFEWSTEP_PYTHON=OFF && cmake --install build/c --prefix PREFIX)")


def cmake_prefix_path() -> str | None:
    """The CMake prefix holding fewstep's package config (``find_package(fewstep)``), or None when this
    installation has no C library (a development checkout)."""
    return str(PACKAGE_DIR) if (PACKAGE_DIR / _CONFIG).is_file() else None


def fewstep_run_path() -> Path | None:
    """The packaged native ``fewstep-run``, or None."""
    exe = PACKAGE_DIR / "bin" / "fewstep-run"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


class CMakePrefixPathAction(argparse.Action):
    """``--cmake-prefix-path``: print the prefix and exit 0 (like ``--version``), or one error line, exit 2."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        prefix = cmake_prefix_path()
        if prefix is None:
            parser.exit(2, f"fewstep: error: {_DEV_HINT}\n")
        print(prefix)
        parser.exit(0)


def run_main() -> None:
    """Entry point of the ``fewstep-run`` console script: replace this process with the native binary."""
    exe = fewstep_run_path()
    if exe is None:
        print(f"fewstep-run: error: {_DEV_HINT}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(exe, [str(exe), *sys.argv[1:]])
