"""Write requirements/constraints-gpu.txt: exact versions of what '.[gpu]' installs on GPU nodes.

Why: cluster/Dockerfile installs the project with the gpu extra (vLLM through ray[llm], CUDA
torch, DeepSpeed) on top of rayproject/ray's image; without pins, each build takes whatever PyPI
holds that day. This resolves '.[gpu]' from PyPI alone, as a fresh machine would: pip's config
files, wheelhouse (find-links) and PIP_* settings are left out, network ones (certificate, proxy,
timeout) excepted. ``pip install --dry-run --ignore-installed --report`` reads package metadata
only (no CUDA wheels are downloaded) and installs nothing. Run it on the image's platform,
Python 3.11 on Linux x86_64: environment markers are evaluated on the running interpreter.

    make constraints-gpu    # python3 tools/constraints_gpu.py --output requirements/...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "selfmoa-ray"
TARGET = ((3, 11), "Linux", "x86_64")  # rayproject/ray:<version>-py311-gpu
KEEP_ENV = {"PIP_CERT", "PIP_CLIENT_CERT", "PIP_PROXY", "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT"}
HEADER = """\
# Exact versions of '.[gpu]' (Ray {ray} with vLLM through ray[llm], CUDA torch, DeepSpeed) for
# Python 3.11 on Linux x86_64: cluster/Dockerfile installs with
#   pip install -c requirements/constraints-gpu.txt ".[gpu]"
# Resolved from PyPI alone by `make constraints-gpu` (tools/constraints_gpu.py: pip install
# --dry-run --ignore-installed --report, metadata only). Regenerate after changing pyproject.toml's
# dependencies, on Python 3.11 / Linux x86_64. CPU machines use constraints-cpu.txt instead.
"""


def resolve(index_url: str, python: str = sys.executable) -> list[tuple[str, str]]:
    """(name, version) of every distribution pip would install for '.[gpu]', project excluded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in KEEP_ENV}
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        cmd += ["--index-url", index_url, "--report", str(report), f"{ROOT}[gpu]"]
        subprocess.run(cmd, env=env, check=True)
        items = json.loads(report.read_text())["install"]
    pins = {(i["metadata"]["name"], i["metadata"]["version"]) for i in items}
    return sorted((n, v) for n, v in pins if n.lower() != PROJECT)


def render(pins: list[tuple[str, str]]) -> str:
    versions = dict(pins)
    body = "".join(f"{name}=={version}\n" for name, version in sorted(pins, key=_key))
    return HEADER.format(ray=versions.get("ray", "?")) + body


def _key(pin: tuple[str, str]) -> str:
    return pin[0].lower().replace("_", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index-url", default="https://pypi.org/simple")
    parser.add_argument("--output", type=Path, default=ROOT / "requirements/constraints-gpu.txt")
    args = parser.parse_args(argv)
    here = (sys.version_info[:2], platform.system(), platform.machine())
    if here != TARGET:
        sys.exit(f"tools/constraints_gpu.py: run on Python 3.11, Linux x86_64 (here: {here})")
    try:
        pins = resolve(args.index_url or "https://pypi.org/simple")
    except subprocess.CalledProcessError as err:
        sys.exit(
            f"tools/constraints_gpu.py: pip could not resolve '.[gpu]' (exit {err.returncode})"
        )
    args.output.write_text(render(pins))
    print(f"tools/constraints_gpu.py: {len(pins)} pins -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
