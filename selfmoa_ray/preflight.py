"""Pre-flight: every source, file, model and optional library a config names, checked at once.

Why: a misspelt seed source, a missing prompt file or model folder used to fail only after the run
folder was written and Ray had started, one mistake per attempt. These checks load no weights,
build nothing and start nothing: prompt specs go through ``load_prompts`` (so every form it
accepts is checked as the run will read it), models through ``check_model`` (folders, packages,
the HF cache), libraries through ``find_spec``. Every problem found is listed in one
:class:`PreflightError`. Each command checks only what it reads (``COMMAND_PARTS``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from selfmoa_ray.config import Config, EvaluatorSection, JudgeSection, ModelSection
from selfmoa_ray.schema import BENIGN_TRAIN_SOURCE
from selfmoa_ray.sources.models import ModelSourceError, check_model

__all__ = [
    "COMMAND_PARTS",
    "PreflightError",
    "check_config",
    "evaluator_model",
    "judge_checks",
    "run_checks",
]

# What each command reads of a config; what it ignores is not checked.
ALL_PARTS = frozenset(
    {"seeds", "eval", "policy", "generators", "judge", "audit", "engine", "training", "tracking"}
)
COMMAND_PARTS: dict[str, frozenset[str]] = {
    "run": ALL_PARTS,
    "compare": ALL_PARTS,
    "evaluate": frozenset({"eval", "policy", "judge", "audit", "engine"}),
    "redteam": frozenset({"seeds", "policy", "generators", "judge", "engine"}),
    "train": frozenset({"policy", "training"}),
}
# Evaluator kinds whose ``model`` is a model spec that transformers loads (evaluators/composite.py);
# other kinds' settings are checked by the config's own validation.
HF_MODEL_KINDS = frozenset({"llama_guard", "reward_model", "rubric"})
TRACKING_HINT = "pip install 'selfmoa-ray[tracking]'"
DEEPSPEED_HINT = "pip install 'selfmoa-ray[deepspeed]' (or train.strategy=ddp)"
VLLM_HINT = "pip install 'selfmoa-ray[gpu]' (on CPU: the separate venv of tools/vllm_env.sh)"
# What a check may raise for bad input: unknown names and bad files (ValueError), missing files
# (OSError), missing data packages (ImportError), unusable models (ModelSourceError).
INPUT_ERRORS = (ValueError, OSError, ImportError, ModelSourceError)

Check = tuple[str, Callable[[], object]]  # (the config key it is about, the check)


class PreflightError(ValueError):
    """Things the config names that cannot be used; ``problems`` holds one line for each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} problems with the config:\n{lines}"
        super().__init__(message)


def check_config(config: Config, command: str) -> None:
    """Run every check ``command`` needs on ``config``; raise one ``PreflightError`` listing all
    that failed."""
    run_checks(_config_checks(config, COMMAND_PARTS[command]))


def run_checks(checks: Iterable[Check]) -> None:
    """Run each check; collect ``key: message`` for those that raise bad-input errors."""
    problems = []
    for key, check in checks:
        try:
            check()
        except INPUT_ERRORS as err:
            problems.append(f"{key}: {err}")
    if problems:
        raise PreflightError(problems)


def evaluator_model(spec: EvaluatorSection) -> str | None:
    """The model spec an evaluator loads with transformers, or None (no model, or a kind whose
    ``model`` means something else: a probe's split or folder, an endpoint's served name)."""
    return spec.model if spec.kind in HF_MODEL_KINDS else None


# --------------------------------------------------------------------------- the checks


def _config_checks(config: Config, parts: frozenset[str]) -> Iterator[Check]:
    data = config.data
    if "seeds" in parts:
        yield from _prompt_checks("data.seeds", data.seeds)
        yield from _prompt_checks("benign training prompts", [BENIGN_TRAIN_SOURCE])
    if "eval" in parts:
        for key in ("eval_harmful", "eval_benign", "eval_files"):
            yield from _prompt_checks(f"data.{key}", getattr(data, key))
    if "policy" in parts:
        yield from _model_checks("policy", config.policy)
    if "generators" in parts:
        yield from _model_checks("redteam.generator", config.redteam.generator)
        yield from _model_checks("pt_align.generator", config.pt_align.generator)
    if "judge" in parts:
        yield from judge_checks(config.judge, "judge")
    if "audit" in parts:
        yield from judge_checks(config.evaluate.judge, "evaluate.judge")
    if "engine" in parts and config.engine.backend == "vllm" and not config.policy.endpoint:
        yield "engine.backend", lambda: _need_module("vllm", "engine.backend=vllm", VLLM_HINT)
    if "training" in parts and config.train.strategy == "deepspeed":
        need = ("deepspeed", "train.strategy=deepspeed", DEEPSPEED_HINT)
        yield "train.strategy", lambda: _need_module(*need)
    if "tracking" in parts:
        yield from _tracking_checks(config)


def _prompt_checks(key: str, specs: list[str]) -> Iterator[Check]:
    from selfmoa_ray.sources.prompts import load_prompts

    for spec in dict.fromkeys(specs):
        yield key, lambda spec=spec: load_prompts(spec)


def _model_checks(key: str, section: ModelSection | None) -> Iterator[Check]:
    """A model section's source, unless it is answered by an endpoint (nothing loads then)."""
    if section is not None and section.endpoint is None:
        yield f"{key}.source", lambda: check_model(section.source)


def judge_checks(judge: JudgeSection, key: str) -> Iterator[Check]:
    """The checks of one judge section's evaluators (also ``selfmoa serve``'s judge)."""
    for i, spec in enumerate(judge.evaluators):
        model = evaluator_model(spec)
        if model is not None:
            yield f"{key}.evaluators.{i}.model", lambda model=model: check_model(model)
        elif spec.kind == "probe":
            yield f"{key}.evaluators.{i}", lambda spec=spec: _check_probe(spec.model)
        elif spec.kind == "endpoint":  # its key is set, it answers, it serves the model
            yield f"{key}.evaluators.{i}", lambda spec=spec: _check_endpoint_judge(spec)


def _check_endpoint_judge(spec: EvaluatorSection) -> None:
    from selfmoa_ray.evaluators.endpoint_judge import connect

    connect(spec)


def _check_probe(model: str | None) -> None:
    """A probe's embedder package, and its folder when ``model`` names one (the cached train and
    audit probes are trained on first use)."""
    from selfmoa_ray.evaluators.embeddings import minilm_dir
    from selfmoa_ray.evaluators.probe_format import probe_source

    folder, _ = probe_source(model)
    if folder is not None and not Path(folder).is_dir():
        raise FileNotFoundError(
            f"probe folder {folder!r} does not exist (write one with "
            f"`selfmoa evaluators train --out {folder}`, or use model train or audit)"
        )
    minilm_dir()


def _tracking_checks(config: Config) -> Iterator[Check]:
    section = config.tracking
    what = f"tracking.backend={section.backend}"
    if section.backend == "mlflow":
        # The default store is SQLite under the run folder, which MLflow reaches via SQLAlchemy.
        modules = ["mlflow"] + (["sqlalchemy", "alembic"] if section.uri is None else [])
        for module in modules:
            yield "tracking.backend", lambda m=module: _need_module(m, what, TRACKING_HINT)
    elif section.backend == "tensorboard":  # torch's writer needs tensorboard; tensorboardX too
        need = ("tensorboard", what, TRACKING_HINT, "tensorboardX")
        yield "tracking.backend", lambda: _need_module(*need)


def _need_module(module: str, what: str, hint: str, *alternatives: str) -> None:
    """An ImportError unless ``module`` (or one of ``alternatives``) is installed."""
    if all(importlib.util.find_spec(m) is None for m in (module, *alternatives)):
        raise ImportError(f"{what} needs {module}, which is not installed here: {hint}")
