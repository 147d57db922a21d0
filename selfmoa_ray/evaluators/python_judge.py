"""Judges of your own: ``kind: python`` scores with any class that keeps the evaluator contract.

``path: my_pkg.judges:KeywordJudge`` (or ``my_pkg.judges.KeywordJudge``) names the class;
``options:`` are the keyword arguments it is constructed with. The class keeps the contract of
evaluators/base.py: a ``name``, a ``provides`` mapping each quantity it informs (safety, refusal,
helpfulness) to one of its columns, and ``score(prompts, responses)`` returning columns named
``<name>_<what>``, one value per pair, provided ones in [0, 1] or NaN.

Checked as early as each check can be made, the path named in every error: the import, that it
is a class with a ``score`` method and that ``options`` fit its constructor when the config is
loaded (config.py); the instance's ``name`` and ``provides`` when it is built; its columns on every
batch it scores (a judge returning nonsense fails the stage, it is not averaged in). The current
folder is importable, as with ``serve run`` and uvicorn, so a judge module beside the config works.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from selfmoa_ray.evaluators.base import QUANTITIES, check_pairs


class PythonJudgeError(ValueError):
    """A python judge that cannot be used: its path, class, options or output."""


def load_class(path: str) -> type:
    """The class at ``path`` ('module:Class' or 'module.Class')."""
    module_name, _, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attr:
        raise PythonJudgeError(f"python judge {path!r}: give 'package.module:Class'")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PythonJudgeError(
            f"python judge {path!r}: cannot import {module_name!r}: {err}"
        ) from None
    except Exception as err:  # the module's own code failed
        raise PythonJudgeError(
            f"python judge {path!r}: importing {module_name!r} failed: {type(err).__name__}: {err}"
        ) from None
    found = getattr(module, attr, None)
    if found is None:
        raise PythonJudgeError(f"python judge {path!r}: {module_name!r} has no {attr!r}")
    if not inspect.isclass(found):
        raise PythonJudgeError(
            f"python judge {path!r}: {attr!r} is a {type(found).__name__}, not a class"
        )
    if not callable(getattr(found, "score", None)):
        raise PythonJudgeError(
            f"python judge {path!r}: {attr} has no score(prompts, responses) method "
            "(evaluators/base.py has the contract)"
        )
    return found


def check_options(cls: type, options: Mapping[str, Any], path: str) -> None:
    """Refuse ``options`` the constructor of ``cls`` does not take."""
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as err:
        raise PythonJudgeError(
            f"python judge {path!r}: options {sorted(options)} do not fit "
            f"{cls.__name__}{inspect.signature(cls)}: {err}"
        ) from None
    except ValueError:  # no signature to read (a builtin); the constructor will tell
        pass


def check_contract(judge: Any, path: str) -> None:
    """Refuse an instance without a usable ``name`` and ``provides``."""
    name = getattr(judge, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise PythonJudgeError(
            f"python judge {path!r}: 'name' must be an identifier-like text (its columns' "
            f"prefix), got {name!r}"
        )
    provides = getattr(judge, "provides", None)
    if not isinstance(provides, Mapping):
        raise PythonJudgeError(
            f"python judge {path!r}: 'provides' must map quantities to columns, e.g. "
            f"{{'safety': '{name}_safety'}}; got {provides!r}"
        )
    for quantity, column in provides.items():
        if quantity not in QUANTITIES:
            raise PythonJudgeError(
                f"python judge {path!r}: provides {quantity!r}; quantities are {QUANTITIES}"
            )
        if not isinstance(column, str) or not column.startswith(f"{name}_"):
            raise PythonJudgeError(
                f"python judge {path!r}: provides[{quantity!r}] must be a column named "
                f"'{name}_...', got {column!r}"
            )


class PythonJudge:
    """Evaluator (evaluators/base.py): the class at ``path``, its output checked each batch."""

    def __init__(self, path: str, options: Mapping[str, Any] | None = None):
        cls = load_class(path)
        check_options(cls, options or {}, path)
        self.path = path
        self.judge = cls(**(options or {}))
        check_contract(self.judge, path)
        self.name: str = self.judge.name
        self.provides: dict[str, str] = dict(self.judge.provides)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        prompts, responses = check_pairs(prompts, responses)
        out = self.judge.score(prompts, responses)
        if not isinstance(out, Mapping):
            raise PythonJudgeError(
                f"python judge {self.path!r}: score() must return {{column: values}}, "
                f"got {type(out).__name__}"
            )
        columns = {}
        for column, values in out.items():
            if not isinstance(column, str) or not column.startswith(f"{self.name}_"):
                raise PythonJudgeError(
                    f"python judge {self.path!r}: column {column!r} is not named "
                    f"'{self.name}_...' (columns carry their judge's name)"
                )
            array = np.asarray(values)
            if array.shape != (len(prompts),):
                raise PythonJudgeError(
                    f"python judge {self.path!r}: column {column!r} has shape {array.shape}, "
                    f"not one value for each of the {len(prompts)} pairs"
                )
            columns[column] = array
        for quantity, column in self.provides.items():
            columns[column] = self._checked(quantity, column, columns.get(column))
        return columns

    def _checked(self, quantity: str, column: str, values: np.ndarray | None) -> np.ndarray:
        """A provided column as float32 in [0, 1] (NaN allowed), or a PythonJudgeError."""
        if values is None:
            raise PythonJudgeError(
                f"python judge {self.path!r}: provides {quantity} in {column!r}, which score() "
                "did not return"
            )
        try:
            floats = values.astype(np.float32)
        except (TypeError, ValueError):
            raise PythonJudgeError(
                f"python judge {self.path!r}: {column!r} ({quantity}) must be numbers, got "
                f"{values.dtype}"
            ) from None
        bad = ~np.isnan(floats) & ((floats < 0) | (floats > 1))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise PythonJudgeError(
                f"python judge {self.path!r}: {column!r} ({quantity}) must lie in [0, 1] "
                f"(or be NaN); row {i} is {floats[i]}"
            )
        return floats
