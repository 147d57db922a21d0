"""Where selfmoa-ray keeps converted weights, extracted data and trained probes.

Follows Hugging Face conventions: the cache lives under ``$HF_HOME/selfmoa`` (``HF_HOME`` defaults
to ``$XDG_CACHE_HOME/huggingface``, i.e. ``~/.cache/huggingface``); ``SELFMOA_CACHE`` moves it.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SELFMOA_CACHE"


def hf_home() -> Path:
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface"


def cache_root() -> Path:
    """The selfmoa cache folder (created on first use)."""
    root = (
        Path(os.environ[CACHE_ENV]).expanduser()
        if os.environ.get(CACHE_ENV)
        else hf_home() / "selfmoa"
    )
    root.mkdir(parents=True, exist_ok=True)
    return root
