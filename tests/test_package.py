"""Packaging: one import package `fewstep`, its extension in step with it, nothing generic in site-packages."""

import importlib
import importlib.metadata
import re
from pathlib import Path, PurePosixPath

import pytest

import fewstep
from fewstep import _C

ROOT = Path(__file__).resolve().parents[1]


def test_extension_version_matches_package():
    assert _C.version() == fewstep.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", fewstep.__version__)
    pyproject = ROOT / "pyproject.toml"
    if pyproject.is_file():  # running from the repository: one version everywhere
        m = re.search(r'^version = "(.*)"$', pyproject.read_text(), re.M)
        assert m and m.group(1) == fewstep.__version__


@pytest.mark.parametrize("name", ["runtime", "kernels", "export", "training"])
def test_subpackages_import(name):
    mod = importlib.import_module(f"fewstep.{name}")
    # the sub-package is fewstep's own folder, not some other top-level `runtime` / `training`
    assert mod.__name__ == f"fewstep.{name}"
    assert Path(mod.__file__).resolve().parent.name == name
    assert Path(mod.__file__).resolve().parent.parent in {Path(fewstep.__file__).resolve().parent, ROOT}


def _installed_wheel():
    """The fewstep distribution if this fewstep was installed from a wheel (not the `make dev` checkout)."""
    try:
        dist = importlib.metadata.distribution("fewstep")
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.files is None or Path(fewstep.__file__).resolve().parent == ROOT / "fewstep":
        return None
    return dist


@pytest.mark.skipif(_installed_wheel() is None, reason="fewstep is not installed from a wheel (dev checkout)")
def test_installed_files_are_namespaced():
    files = [PurePosixPath(str(f)) for f in _installed_wheel().files]
    top = {f.parts[0] for f in files if f.parts[0] != ".."}  # ".." = console scripts in bin/
    assert {t for t in top if not t.endswith(".dist-info")} == {"fewstep"}, top
    names = [str(f) for f in files]
    assert any(re.fullmatch(r"fewstep/_C\..*(so|pyd)", n) for n in names)
    assert any(n.startswith("fewstep/training/") for n in names)
    assert any(n.startswith("fewstep/runtime/") and n.endswith(".py") for n in names)
    # C/C++ sources stay out; the public headers ship on purpose (fewstep/include/, for find_package(fewstep))
    assert not [n for n in names if n.endswith((".cpp", ".h", ".c")) and not n.startswith("fewstep/include/")]
    assert "fewstep/include/fewstep.h" in names
