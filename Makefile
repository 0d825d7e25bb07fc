# fewstep: the two README commands are `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
PIP     := $(VPY) -m pip
STAMP   := $(VENV)/.fewstep-installed
LOCK    := requirements.lock
PIP_VERSION       := 26.3
PIP_TOOLS_VERSION := 7.6.2

.PHONY: demo test install dev lint clean sysdeps asan students lock dmd2 cud openvino

# A fresh Debian machine may lack venv/ensurepip or a C++ compiler: install them (as root).
sysdeps:
	@if ! $(PY) -c "import venv, ensurepip" 2>/dev/null || ! command -v g++ >/dev/null; then \
	  echo "installing python3-venv python3-dev g++ (apt-get)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-dev g++ >/dev/null; fi

$(VENV)/bin/python:
	$(MAKE) sysdeps
	$(PY) -m venv $(VENV)
	$(PIP) install -q pip==$(PIP_VERSION)

# Every package the venv holds (runtime, test and build; see pyproject.toml) at the exact version
# in requirements.lock, so a fresh machine installs what CI passed with. The package itself then
# builds without isolation: no second torch in a throw-away build env.
$(STAMP): $(VENV)/bin/python $(LOCK)
	$(PIP) install -q -r $(LOCK)
	touch $(STAMP)

# Refresh requirements.lock from pyproject.toml (pip-tools resolves through pip, with this
# machine's package sources): `make lock` keeps every pin that pyproject.toml still allows and
# resolves what changed; `make lock UPGRADE=1` moves everything to the newest allowed versions.
# An upgrade of torch, diffusers, onnx or onnxruntime is a commit of the new lock that has passed
# `make test`. torch's local label (+cpu) is dropped: `torch==2.13.0` takes the CPU wheel where
# one lies on disk and is the plain release elsewhere.
lock: $(VENV)/bin/python
	$(PIP) install -q pip-tools==$(PIP_TOOLS_VERSION)
	$(VENV)/bin/pip-compile -q --extra test --extra build --allow-unsafe --strip-extras --no-emit-index-url \
	  --no-emit-find-links $(if $(UPGRADE),--upgrade) -o $(LOCK) pyproject.toml
	sed -i -E 's/^(torch==[0-9.]+)\+[a-z0-9]+/\1/' $(LOCK)

install: $(STAMP)
	$(PIP) install -q --no-build-isolation --no-deps --force-reinstall .

demo: install
	$(VENV)/bin/fewstep demo --out demo_out

# pytest from the venv's entry point (not `python -m`), so tests import the installed package. The
# openvino provider's tests run against the onnxruntime-openvino build when `make openvino` could fetch it
# (they skip, saying why, where it cannot: another CPU architecture, no registry).
test: install
	$(MAKE) --no-print-directory openvino || echo "openvino: onnxruntime-openvino not available here; its tests skip"
	$(VENV)/bin/ruff check --quiet .
	FEWSTEP_OPENVINO_ORT_LIBRARY=$$(ls $(CURDIR)/$(OV_DIR)/onnxruntime-openvino/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null \
	  | head -1) $(VENV)/bin/pytest -q tests

# ONNX Runtime's OpenVINO build (and OpenVINO's own runtime, for benchmarks/cpu_suite.py), unpacked beside the
# venv, never installed into it: it would replace the onnxruntime package. The C++ runtime reaches it through
# FEWSTEP_ORT_LIBRARY / ort_library and `--provider openvino`.
OV_DIR      := $(VENV)/openvino
OV_PACKAGES := onnxruntime-openvino==1.24.1 openvino==2026.4.1
openvino: $(OV_DIR)/.unpacked
$(OV_DIR)/.unpacked: $(VENV)/bin/python
	rm -rf $(OV_DIR) && mkdir -p $(OV_DIR)/wheels
	$(PIP) download -q --no-deps -d $(OV_DIR)/wheels $(OV_PACKAGES)
	$(VPY) -m zipfile -e $$(ls $(OV_DIR)/wheels/onnxruntime_openvino-*.whl) $(OV_DIR)/onnxruntime-openvino
	$(VPY) -m zipfile -e $$(ls $(OV_DIR)/wheels/openvino-*.whl) $(OV_DIR)/openvino
	rm -rf $(OV_DIR)/wheels
	touch $@

# Development: the source tree imports as `fewstep` (symlinks + the built extension).
dev: $(STAMP)
	for d in runtime kernels export training; do ln -sfn ../$$d fewstep/$$d; done
	cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DSKBUILD_PROJECT_NAME=fewstep \
	  -DSKBUILD_PROJECT_VERSION=$$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml) \
	  -DPython_EXECUTABLE=$(abspath $(VPY)) -Dpybind11_DIR=$$($(VPY) -m pybind11 --cmakedir) >/dev/null
	cmake --build build/dev
	install -m 755 build/dev/_C*.so fewstep/  # unlink + create: running processes keep the old file
	$(PIP) uninstall -y -q fewstep || true
	echo $(CURDIR) > $$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/fewstep_dev.pth

# Rebuild the shipped distilled students (runtime/weights/digits_guided/): stage 1 (guided), then
# progressive halvings 64 → 32 → 16 → 8 → 4 → 2 → 1, then copy the artifacts without training state.
# Resumable: rerun after an interruption. ~25 min on 2 cores (benchmarks/results/distill_digits.md).
STUDENTS_RUN ?= out/digits_guided
students: install
	OMP_NUM_THREADS=1 $(VENV)/bin/fewstep distill guided --out $(STUDENTS_RUN)/guided
	OMP_NUM_THREADS=1 $(VENV)/bin/fewstep distill progressive --student $(STUDENTS_RUN)/guided --out $(STUDENTS_RUN)
	$(VENV)/bin/fewstep distill ship $(STUDENTS_RUN) runtime/weights/digits_guided

# Rebuild the shipped DMD2 students (runtime/weights/digits_dmd2/): a 1-step generator, then a 4-step one
# started from its networks (W = 1), then copy the sampling artifacts without training state. Resumable:
# rerun after an interruption. Training wall time: benchmarks/results/dmd2_digits.md.
DMD2_RUN ?= out/digits_dmd2
dmd2: install
	OMP_NUM_THREADS=1 $(VENV)/bin/fewstep distill dmd2 --out $(DMD2_RUN)
	$(VENV)/bin/fewstep distill ship $(DMD2_RUN) runtime/weights/digits_dmd2

# Rebuild the shipped catch-up distilled flow model (runtime/weights/digits_cud/): the flow model with RK2
# alignment, its additional one-step training on its own 16-step samples, the Euler plans (1–16 steps), then
# copy the sampling artifacts without training state. Resumable. Wall time: benchmarks/results/cud_digits.md.
CUD_RUN ?= out/digits_cud
cud: install
	OMP_NUM_THREADS=1 $(VENV)/bin/fewstep distill catchup --out $(CUD_RUN)
	$(VENV)/bin/fewstep distill ship $(CUD_RUN) runtime/weights/digits_cud

# AddressSanitizer / LeakSanitizer over 1,000 load/sample/free cycles of the C API (also part of `make test`).
asan: install
	$(VENV)/bin/pytest -q tests/test_cpp_asan.py

lint:
	$(VENV)/bin/ruff check .

clean:
	rm -rf build demo_out
