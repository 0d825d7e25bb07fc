"""requirements.lock is what `make` installs: it must satisfy pyproject.toml, and the venv must hold it.

A version bump of a dependency then happens on purpose: `make lock` rewrites the lock from
pyproject.toml, and the commit that carries the new lock is the one that runs the suite.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11, as the Makefile's own set-up

ROOT = Path(__file__).resolve().parents[1]


def locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if m:
            pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


def declared() -> list[Requirement]:
    d = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    extras = d["project"]["optional-dependencies"]
    return [Requirement(r) for r in d["project"]["dependencies"] + extras["test"] + extras["build"]]


def test_lock_satisfies_pyproject():
    pins = locked()
    assert len(pins) > 20  # the whole closure, not only the direct requirements
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, pyproject.toml asks {req}: run `make lock`")


def test_torch_pin_is_portable():
    # `torch==2.13.0` takes the CPU wheel where it lies on disk and the release elsewhere; a local
    # label (+cpu) in the lock would make the install fail on a machine without that file.
    assert re.search(r"^torch==2\.13\.0$", (ROOT / "requirements.lock").read_text(encoding="utf-8"), re.M)


def test_venv_holds_the_locked_versions():
    wrong = {}
    for name, version in locked().items():
        try:
            have = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong[name] = (str(version), "missing")
            continue
        if Version(have.base_version) != Version(version.base_version) or (version.local and have != version):
            wrong[name] = (str(version), str(have))
    assert not wrong, f"installed ≠ requirements.lock (locked, installed): {wrong}"
