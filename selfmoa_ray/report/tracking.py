"""Per-iteration metrics to an experiment tracker: MLflow, TensorBoard, or nothing.

The loop driver calls ``tracker.log_iteration(t, flat_metrics(policy))`` after each evaluation
(step 0 is the baseline) and ``tracker.close()`` at the end. Configured by the ``tracking``
section: ``backend`` ``none`` | ``mlflow`` | ``tensorboard``, and ``uri``.

* ``mlflow``: with ``uri`` unset, a local SQLite store in ``<run>/mlflow/mlflow.db`` (artifacts
  in ``<run>/mlflow/artifacts``); otherwise the given tracking URI (a server, ``databricks``,
  another ``sqlite:///`` file). Experiment = the run name. The MLflow run id is kept in
  ``<run>/tracking.json``, so a resumed run keeps logging into the same MLflow run. Why SQLite:
  MLflow 3.x keeps the ``./mlruns`` file store in maintenance mode and refuses to open it unless
  ``MLFLOW_ALLOW_FILE_STORE=true`` is set; SQLite is its recommended local backend and works
  offline (it needs ``sqlalchemy`` and ``alembic``, which ``mlflow-skinny`` leaves out, so the
  ``tracking`` extra adds them).
* ``tensorboard``: ``torch.utils.tensorboard.SummaryWriter`` (``tensorboardX`` if that is what is
  installed) writing to ``<run>/tensorboard`` by default, or to ``uri``.

``<run>/tracking.json`` also lists the steps already logged: a resumed loop may call
``log_iteration`` again for the policies it evaluated before the restart, and those calls are
skipped, so no metric gets two points at one step. MLflow itself sends anonymous usage telemetry
unless ``MLFLOW_DISABLE_TELEMETRY=true`` or ``DO_NOT_TRACK=true`` is set (off under pytest/CI).

Ray ships MLflow integrations (``ray.air.integrations.mlflow.setup_mlflow`` and
``MLflowLoggerCallback``), but they are built around Ray Tune trials and Ray Train workers
(``setup_mlflow`` opens a session inside a trainable, ``MLflowLoggerCallback`` is a Tune logger
callback). Our per-iteration metrics are computed in the loop's driver process, outside any Tune
trial or Train worker, so the plain MLflow and TensorBoard clients are used directly here.

mlflow and tensorboard are optional: ``pip install 'selfmoa-ray[tracking]'``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from selfmoa_ray.config import TrackingSection
from selfmoa_ray.rundir import read_json, write_json

TRACKING_FILE = "tracking.json"
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


# --------------------------------------------------------------------------- trackers


class Tracker:
    """Logs one dict of floats per loop iteration. The base class is the no-op tracker."""

    backend = "none"

    def log_iteration(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` at ``step`` (0 = baseline, t = after iteration t)."""

    def close(self) -> None:
        """Flush and release the tracker; safe to call twice."""

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _clean(metrics: dict[str, float]) -> dict[str, float]:
    return {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class _LedgerTracker(Tracker):
    """A tracker whose state lives in ``<run>/tracking.json`` (written atomically).

    The file names the backend and its target, and the steps already logged: a resumed run
    replays the loop from the start, and a step that is in the ledger is not logged twice.
    """

    def __init__(self, run_root: Path, target: dict[str, Any]):
        self.path = Path(run_root) / TRACKING_FILE
        stored = read_json(self.path) if self.path.exists() else {}
        same = all(stored.get(k) == v for k, v in target.items())
        self.state: dict[str, Any] = stored if same else dict(target, steps=[])
        self.state.setdefault("steps", [])
        self._closed = False

    def log_iteration(self, step: int, metrics: dict[str, float]) -> None:
        if int(step) in self.state["steps"]:
            return
        self._log(int(step), _clean(metrics))
        self.state["steps"] = sorted({*self.state["steps"], int(step)})
        self.save()

    def save(self) -> None:
        write_json(self.path, self.state)

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._close()

    def _close(self) -> None:
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
            self.state.update(run_id=None, steps=[])  # start a fresh MLflow run
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
        self.save()
        return run.info.run_id

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow's per-request metric limit
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def _close(self) -> None:
        self.client.set_terminated(self.run_id)


class TensorboardTracker(_LedgerTracker):
    """Scalars under ``<run>/tensorboard`` (or ``uri``); a resumed run adds a new event file."""

    backend = "tensorboard"

    def __init__(self, run_root: Path, uri: str | None = None):
        writer_cls = _summary_writer()
        self.log_dir = (Path(uri) if uri else Path(run_root) / "tensorboard").resolve()
        super().__init__(run_root, {"backend": "tensorboard", "log_dir": str(self.log_dir)})
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = writer_cls(log_dir=str(self.log_dir))

    def _log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def _close(self) -> None:
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
