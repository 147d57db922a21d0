"""The run in an experiment tracker: MLflow, TensorBoard, or nothing.

What a recipe logs, and when (recipes/selfmoa.py and pt_align.py)::

    with make_tracker(config.tracking, run.root, config.run.name) as tracker:
        tracker.log_config(config)           # once per tracker run: params, config.yaml
        tracker.log_iteration(t, metrics)    # each evaluated policy (0 = baseline)
        tracker.log_training(t, history)     # iteration t's per-step training curves
        tracker.log_report(run.root)         # report.html, metrics.json/.csv, plots/

Configured by the ``tracking`` section: ``backend`` ``none`` | ``mlflow`` | ``tensorboard``, and
``uri``. Leaving the ``with`` block by an exception marks the MLflow run FAILED (KILLED on Ctrl-C).

* ``mlflow``: with ``uri`` unset, a local SQLite store in ``<run>/mlflow/mlflow.db`` (artifacts
  in ``<run>/mlflow/artifacts``); otherwise the given tracking URI (a server, ``databricks``,
  another ``sqlite:///`` file). Experiment = the run name. The MLflow run id is kept in
  ``<run>/tracking.json``, so a resumed run keeps logging into the same MLflow run. Why SQLite:
  MLflow 3.x keeps the ``./mlruns`` file store in maintenance mode and refuses to open it unless
  ``MLFLOW_ALLOW_FILE_STORE=true`` is set; SQLite is its recommended local backend and works
  offline (it needs ``sqlalchemy`` and ``alembic``, which ``mlflow-skinny`` leaves out, so the
  ``tracking`` extra adds them). The config becomes params with dotted keys (:func:`flat_config`)
  and the ``config.yaml`` artifact; MLflow refuses to change a logged param, so a resumed run
  logs only the params it lacks, and one whose value differs keeps its first value (a warning and
  the ``selfmoa.params_changed`` tag name it; ``config.yaml`` is the new config).
* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` (``tensorboardX`` if that is what is
  installed) writing to ``<run>/tensorboard`` by default, or to ``uri``. The config is a text
  entry (``config``, the YAML); metrics and curves are scalars; report files are not logged (they
  sit in the run folder, and TensorBoard has no place for files).

Training curves: ``train/<metric>`` (``train/loss``, ``train/reward_margin``, ``train/epoch``,
``train/iteration``, ...) at a global step that keeps increasing across iterations (iteration 2's
first step follows iteration 1's last), read from the stage's per-step history file
(training/history.py). ``<run>/tracking.json`` lists what is already logged (the iterations'
steps, each training's global-step range, the config's fingerprint): a resumed loop calls the
tracker again for work it did before the restart, and those calls are skipped, so no metric gets
two points at one step. MLflow itself sends anonymous usage telemetry unless
``MLFLOW_DISABLE_TELEMETRY=true`` or ``DO_NOT_TRACK=true`` is set (off under pytest/CI).

Ray ships MLflow integrations (``ray.air.integrations.mlflow.setup_mlflow`` and
``MLflowLoggerCallback``), but they are built around Ray Tune trials and Ray Train workers
(``setup_mlflow`` opens a session inside a trainable, ``MLflowLoggerCallback`` is a Tune logger
callback). Our metrics are computed, and the training histories read, in the loop's driver
process, outside any Tune trial or Train worker, so the plain MLflow and TensorBoard clients are
used directly here.

mlflow and tensorboard are optional: ``pip install 'selfmoa-ray[tracking]'``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from selfmoa_ray.config import Config, TrackingSection
from selfmoa_ray.rundir import read_json, write_json
from selfmoa_ray.training.history import read_history

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
REPORT_FILES = ("report.html", "metrics.json", "metrics.csv")  # and plots/, see write_report
INSTALL_HINT = "pip install 'selfmoa-ray[tracking]'"


class TrackingError(RuntimeError):
    """The tracker cannot be set up (missing package, unusable store)."""


# --------------------------------------------------------------------------- metric names


def flat_metrics(policy_metrics: dict[str, Any]) -> dict[str, float]:
    """One policy's metrics as flat tracker names (``harmful/safety_rate``, ``benign/over_refusal``).

    Takes an entry of ``collect_run(...)["policies"]``, or an ``evaluate`` summary
    (``{"model", "splits"}``, as in ``<policy>/metrics.json``). Missing values are left out.
    """
    if "splits" in policy_metrics and "harmful" not in policy_metrics:
        from selfmoa_ray.report.collect import policy_metrics as from_summary

        policy_metrics = from_summary(policy_metrics)
    out: dict[str, Any] = {}
    harmful = policy_metrics.get("harmful") or {}
    harmful_keys = ("safety_rate", "attack_success_rate", "string_refusal_rate")
    for key in (*harmful_keys, "strict_refusal_rate", "refusal_rate"):
        out[f"harmful/{key}"] = harmful.get(key)
    for key, (low, high) in (harmful.get("intervals") or {}).items():
        out[f"harmful/{key}_low"], out[f"harmful/{key}_high"] = low, high
    for cat, m in (harmful.get("by_category") or {}).items():
        out[f"harmful_category/{cat}/safety_rate"] = m.get("safety_rate")
    benign = policy_metrics.get("benign") or {}
    benign_keys = ("over_refusal", "string_over_refusal", "strict_over_refusal")
    for key in (*benign_keys, "helpfulness", "safety_rate"):
        out[f"benign/{key}"] = benign.get(key)
    for key, (low, high) in (benign.get("intervals") or {}).items():
        out[f"benign/{key}_low"], out[f"benign/{key}_high"] = low, high
    for key, value in (policy_metrics.get("data") or {}).items():
        out[f"data/{key}"] = value
    if policy_metrics.get("eval_tokens") is not None:
        out["data/eval_tokens"] = policy_metrics["eval_tokens"]
    return {
        k: float(v)
        for k, v in out.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def cost_metrics(cost: dict[str, Any] | None) -> dict[str, float]:
    """The run's cost so far (``collect_run(...)["cost"]``) as tracker names: ``cost/cpu_seconds``,
    ``cost/per_point/cpu_seconds``, ... (per point of held-out safety, where there is a gain)."""
    cost = cost or {}
    out = {f"cost/{k}": v for k, v in cost.items() if k != "per_point"}
    out |= {f"cost/per_point/{k}": v for k, v in (cost.get("per_point") or {}).items()}
    return _clean(out)


# --------------------------------------------------------------------------- the config

CUT = " ... (cut: see config.yaml)"
_PARAM_KEY = re.compile(r"[^\w.\- /:]")  # the characters MLflow allows in a param key


def flat_config(config: dict[str, Any], limit: int = 6000) -> dict[str, str]:
    """The resolved config as MLflow params: dotted keys, string values.

    Sections nest (``train.beta``), lists of sections are walked by index
    (``judge.evaluators.0.kind``); any other list is one JSON value (``["q_proj", "v_proj"]``),
    other values are ``str(value)`` as ``mlflow.log_params`` writes them. A value longer than
    ``limit`` (MLflow's param length limit) is cut and ends in ``CUT``; the whole config is the
    run's ``config.yaml`` artifact.
    """
    out: dict[str, str] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict) and node:
            for name, value in node.items():
                walk(value, f"{key}.{name}" if key else str(name))
        elif isinstance(node, list) and node and all(isinstance(v, dict) for v in node):
            for i, value in enumerate(node):
                walk(value, f"{key}.{i}")
        else:
            text = json.dumps(node) if isinstance(node, (list, dict)) else str(node)
            out[_PARAM_KEY.sub("_", key)] = (
                text if len(text) <= limit else text[: limit - len(CUT)] + CUT
            )

    walk(config, "")
    return out


# --------------------------------------------------------------------------- trackers


class Tracker:
    """Logs the run's config, metrics, training curves and report. The base class is the no-op
    tracker (``tracking.backend: none``)."""

    backend = "none"

    def log_config(self, config: Config) -> None:
        """Record the resolved config (a resumed run's repeat adds nothing new)."""

    def log_iteration(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` at ``step`` (0 = baseline, t = after iteration t)."""

    def log_training(self, iteration: int, history: Path) -> None:
        """Record iteration ``iteration``'s per-step training metrics from its history file
        (training/history.py) as ``train/<metric>`` at global steps."""

    def log_report(self, root: Path) -> None:
        """Record the report files ``write_report`` left in ``root``."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and release the tracker; safe to call twice. ``status``: how the run ended."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.close()
        else:
            self.close("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")


def _clean(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


Points = list[tuple[int, dict[str, float]]]  # (step, metrics) in logging order


class _LedgerTracker(Tracker):
    """A tracker whose state lives in ``<run>/tracking.json`` (written atomically).

    The file names the backend and its target, and what is already logged: a resumed run
    replays the loop from the start, and what is in the ledger is not logged twice. ``steps``:
    the iterations' steps; ``training``: per iteration, ``[offset, steps]`` of its curve (global
    step = offset + the training's own step); ``config``: the fingerprint of the logged config.
    """

    def __init__(self, run_root: Path, target: dict[str, Any]):
        self.path = Path(run_root) / TRACKING_FILE
        stored = read_json(self.path) if self.path.exists() else {}
        same = all(stored.get(k) == v for k, v in target.items())
        self.state: dict[str, Any] = stored if same else dict(target, steps=[])
        self.state.setdefault("steps", [])
        self.state.setdefault("training", {})
        self._closed = False

    def log_iteration(self, step: int, metrics: dict[str, float]) -> None:
        if int(step) in self.state["steps"]:
            return
        self._log([(int(step), _clean(metrics))])
        self.state["steps"] = sorted({*self.state["steps"], int(step)})
        self.save()

    def log_training(self, iteration: int, history: Path) -> None:
        done: dict[str, list[int]] = self.state["training"]
        rows = read_history(history)
        if str(iteration) in done or not rows:
            return
        offset = max((first + steps for first, steps in done.values()), default=0)
        tagged = {"train/iteration": float(iteration)}
        points = [
            (offset + row["step"], _clean({f"train/{k}": v for k, v in row.items() if k != "step"}))
            for row in rows
        ]
        self._log([(step, metrics | tagged) for step, metrics in points])
        done[str(iteration)] = [offset, max(row["step"] for row in rows)]
        self.save()

    def save(self) -> None:
        write_json(self.path, self.state)

    def _log(self, points: Points) -> None:
        raise NotImplementedError

    def close(self, status: str = "FINISHED") -> None:
        if not self._closed:
            self._closed = True
            self._close(status)

    def _close(self, status: str) -> None:
        raise NotImplementedError


class MlflowTracker(_LedgerTracker):
    """One MLflow run per selfmoa run, reused on resume (its id is in ``<run>/tracking.json``)."""

    backend = "mlflow"

    def __init__(self, run_root: Path, run_name: str, uri: str | None = None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise TrackingError(
                f"tracking.backend=mlflow needs mlflow ({err}); {INSTALL_HINT}"
            ) from err
        self.run_root = Path(run_root)
        store = self.run_root / "mlflow"
        if uri is None:
            store.mkdir(parents=True, exist_ok=True)
            tracking_uri = f"sqlite:///{(store / 'mlflow.db').resolve()}"
            artifacts = (store / "artifacts").resolve().as_uri()
        else:
            tracking_uri, artifacts = uri, None
        super().__init__(run_root, {"backend": "mlflow", "tracking_uri": tracking_uri})
        self.tracking_uri = tracking_uri
        try:
            self.client = MlflowClient(tracking_uri=tracking_uri)
        except ImportError as err:  # sqlite needs sqlalchemy + alembic
            raise TrackingError(
                f"the MLflow store {tracking_uri} needs {err.name or err}; {INSTALL_HINT}"
            ) from err
        self.run_id = self._resume() or self._start(run_name, artifacts)

    def _resume(self) -> str | None:
        run_id = self.state.get("run_id")
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            run = None  # the store was wiped
        if run is None or run.info.lifecycle_stage != "active":
            # Start a fresh MLflow run: nothing of the old one counts as logged.
            self.state.update(run_id=None, steps=[], training={}, config=None)
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _start(self, run_name: str, artifacts: str | None) -> str:
        experiment = self.client.get_experiment_by_name(run_name)
        if experiment is None:
            experiment_id = self.client.create_experiment(run_name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(
            experiment_id,
            run_name=run_name,
            tags={"selfmoa.run_root": str(self.run_root.resolve())},
        )
        self.state.update(experiment_id=experiment_id, run_id=run.info.run_id, steps=[])
        self.state.update(training={}, config=None)
        self.save()
        return run.info.run_id

    def log_config(self, config: Config) -> None:
        """Params (:func:`flat_config`) the run lacks, tags ``selfmoa.config_fingerprint`` and
        ``selfmoa.recipe``, and ``config.yaml``. A param already logged with another value keeps
        it (MLflow refuses the change): a warning and the tag ``selfmoa.params_changed`` say so."""
        from mlflow.entities import Param, RunTag
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = flat_config(config.to_dict(), MAX_PARAM_VAL_LENGTH)
        logged = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, v) for k, v in params.items() if k not in logged]
        tags = [
            RunTag("selfmoa.config_fingerprint", config.fingerprint()),
            RunTag("selfmoa.recipe", config.run.recipe),
        ]
        changed = [k for k, v in params.items() if k in logged and logged[k] != v]
        if changed:
            log.warning(
                "MLflow run %s keeps the first value of params %s (MLflow cannot change a "
                "logged param); its config.yaml artifact is the config now", self.run_id, changed,
            )  # fmt: skip
            tags.append(RunTag("selfmoa.params_changed", " ".join(changed)[:5000]))
        self.client.log_batch(self.run_id, tags=tags)
        for start in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
            batch = fresh[start : start + MAX_PARAMS_TAGS_PER_BATCH]
            self.client.log_batch(self.run_id, params=batch)
        with tempfile.TemporaryDirectory(prefix="selfmoa-config-") as folder:
            path = Path(folder) / "config.yaml"
            path.write_text(config.to_yaml(), encoding="utf-8")
            self._artifact(path)
        self.state["config"] = config.fingerprint()
        self.save()

    def log_report(self, root: Path) -> None:
        """``report.html``, ``metrics.json``, ``metrics.csv`` and ``plots/`` (as they are now:
        a second call replaces them)."""
        root = Path(root)
        for name in REPORT_FILES:
            if (root / name).is_file():
                self._artifact(root / name)
        if (root / "plots").is_dir():
            self._artifact(root / "plots", "plots")

    def _artifact(self, path: Path, under: str | None = None) -> None:
        from mlflow.exceptions import MlflowException

        try:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), under)
            else:
                self.client.log_artifact(self.run_id, str(path), under)
        except (MlflowException, OSError) as err:
            raise TrackingError(
                f"could not log {path} to MLflow run {self.run_id} ({self.tracking_uri}): {err}; "
                "the file itself is intact"
            ) from err

    def _log(self, points: Points) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for step, metrics in points for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow's per-request metric limit
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def _close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class TensorboardTracker(_LedgerTracker):
    """Scalars under ``<run>/tensorboard`` (or ``uri``); a resumed run adds a new event file."""

    backend = "tensorboard"

    def __init__(self, run_root: Path, uri: str | None = None):
        writer_cls = _summary_writer()
        self.log_dir = (Path(uri) if uri else Path(run_root) / "tensorboard").resolve()
        super().__init__(run_root, {"backend": "tensorboard", "log_dir": str(self.log_dir)})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = writer_cls(log_dir=str(self.log_dir))

    def log_config(self, config: Config) -> None:
        """The config's YAML as the text entry ``config`` (TEXT tab), once per config."""
        if self.state.get("config") == config.fingerprint():
            return
        self.writer.add_text("config", f"```yaml\n{config.to_yaml()}```", 0)
        self.writer.flush()
        self.state["config"] = config.fingerprint()
        self.save()

    def _log(self, points: Points) -> None:
        for step, metrics in points:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def _close(self, status: str) -> None:
        self.writer.close()


def _summary_writer() -> type:
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter
    except ImportError as torch_err:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise TrackingError(
                f"tracking.backend=tensorboard needs tensorboard ({torch_err}); {INSTALL_HINT}"
            ) from torch_err
        return SummaryWriter


def make_tracker(section: TrackingSection, run_root: Path, run_name: str) -> Tracker:
    """The tracker the ``tracking`` config section asks for."""
    if section.backend == "none":
        return Tracker()
    if section.backend == "mlflow":
        return MlflowTracker(Path(run_root), run_name, section.uri)
    if section.backend == "tensorboard":
        return TensorboardTracker(Path(run_root), section.uri)
    raise TrackingError(f"unknown tracking.backend {section.backend!r}")
