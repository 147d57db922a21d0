"""Training objectives, one module each: ``dpo.py``, ``ipo.py``, ``modpo.py``,
``scalarised_dpo.py``, ``pt_align.py``. ``train.loss`` names a module of this folder.

Each module defines ``OBJECTIVE``, an :class:`~selfmoa_ray.training.objectives.base.Objective`:
the rows it trains on, the columns they must carry, whether it needs the reference pass, and the
function that computes it (next to its paper's equation). Adding a loss is adding a module here;
the config finds it by name without importing torch (:func:`names`).
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selfmoa_ray.training.objectives.base import Objective

_NOT_OBJECTIVES = {"base"}


@functools.cache
def names() -> list[str]:
    """Every objective's name: the modules of this package (none is imported), listed once."""
    found = (m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return sorted(set(found) - _NOT_OBJECTIVES)


@functools.cache
def get(name: str) -> Objective:
    """The objective called ``name`` (a module of this package); the trainer asks every step."""
    if name not in names():
        raise ValueError(f"unknown loss {name!r}; one of {', '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").OBJECTIVE
