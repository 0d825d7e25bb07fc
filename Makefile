# fewstep: the two README commands are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.fewstep-installed

.PHONY: demo test install dev lint clean

$(VENV)/bin/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Build deps first so the package builds without isolation (no second torch download).
$(STAMP): $(VENV)/bin/python pyproject.toml CMakeLists.txt
	$(PIP) install -q "torch==2.13.0" scikit-build-core pybind11 cmake ninja
	$(PIP) install -q --no-build-isolation ".[test]"
	touch $(STAMP)

install: $(STAMP)
	$(PIP) install -q --no-build-isolation --no-deps --force-reinstall .

demo: install
	$(VENV)/bin/fewstep demo --out demo_out

# pytest from the venv's entry point (not `python -m`), so tests import the installed package.
test: install
	$(VENV)/bin/pytest -q tests

# Development: the source tree imports as `fewstep` (symlinks + the built extension).
dev: $(STAMP)
	for d in runtime kernels export training; do ln -sfn ../$$d fewstep/$$d; done
	cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DSKBUILD_PROJECT_NAME=fewstep \
	  -DSKBUILD_PROJECT_VERSION=$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) \
	  -DPython_EXECUTABLE=$(abspath $(VPY)) -Dpybind11_DIR=$$($(VPY) -m pybind11 --cmakedir) >/dev/null
	cmake --build build/dev
	cp build/dev/_C*.so fewstep/
	$(PIP) uninstall -y -q fewstep || true
	echo $(CURDIR) > $$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fewstep_dev.pth

lint:
	$(VENV)/bin/ruff check .

clean:
	rm -rf build demo_out
