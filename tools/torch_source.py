"""Print the pip arguments that install torch's CPU build, for the Makefile's first install step.

Why: PyPI's Linux torch wheels are CUDA builds (~2 GB of nvidia-* packages); the CPU build lives
on the PyTorch CPU wheel index. Where pip is already configured with a local wheelhouse
(``find-links``) that holds the wanted torch, as on offline CI machines, plain pip is right and
the network must not be touched. Which case applies is asked of pip itself, offline:
``pip install --dry-run --no-index --no-deps torch==X`` looks only at the configured find-links.

    python tools/torch_source.py 2.13.0                 # auto: local wheel, else the CPU index
    python tools/torch_source.py 2.13.0 --index-url URL # your own mirror of the CPU index: wins

Prints nothing (plain pip) or ``--index-url <torch index> --extra-index-url <PyPI>``: torch's own
dependencies (sympy, filelock, ...) still come from PyPI. Says on stderr what it chose and why.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CPU_INDEX_URL = "https://download.pytorch.org/whl/cpu"
PYPI_URL = "https://pypi.org/simple"


def local_torch(version: str, python: str = sys.executable) -> str | None:
    """Where pip's configured find-links hold torch==``version`` (its URL), else None.

    ``--no-index`` keeps pip off every index, so this never reaches the network; ``--no-deps``
    and ``--ignore-installed`` make the answer depend on the wheelhouse alone.
    """
    cmd = [python, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps"]
    cmd += ["--ignore-installed", "--quiet", "--report", "-", f"torch=={version}"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        if "No matching distribution" not in result.stderr:  # not "absent": say what pip said
            why = (result.stderr.strip().splitlines() or ["no output"])[-1]
            print(
                f"tools/torch_source.py: pip cannot tell (pip >= 22.2 needed): {why}",
                file=sys.stderr,
            )
        return None
    try:
        (item,) = json.loads(result.stdout)["install"]
    except (ValueError, KeyError):
        return None
    return str(item["download_info"]["url"])


def pip_args(version: str, index_url: str | None, pypi_url: str) -> list[str]:
    """The arguments for ``pip install torch==<version>``; explains the choice on stderr."""
    if index_url:
        print(
            f"tools/torch_source.py: torch {version} from {index_url} (TORCH_INDEX_URL)",
            file=sys.stderr,
        )
    else:
        found = local_torch(version)
        if found:
            print(
                f"tools/torch_source.py: torch {version} from pip's find-links: {found}",
                file=sys.stderr,
            )
            return []
        index_url = CPU_INDEX_URL
        print(
            f"tools/torch_source.py: no local torch {version} wheel in pip's find-links; "
            f"the CPU build from {index_url}",
            file=sys.stderr,
        )
    args = ["--index-url", index_url]
    return args + ["--extra-index-url", pypi_url] if pypi_url else args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("version", help="torch version, e.g. 2.13.0")
    parser.add_argument("--index-url", default="", help="torch's index; empty: decide (default)")
    parser.add_argument(
        "--pypi-url", default=PYPI_URL, help="index for torch's dependencies (empty: none)"
    )
    args = parser.parse_args(argv)
    print(" ".join(pip_args(args.version, args.index_url or None, args.pypi_url)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
