"""Ray Data passes through pools of judge actors: each actor loads its evaluator models once.

The judge stage, the held-out evaluation, the calibration and PT-ALIGN's filter all score rows
this way (engines/pool.py is the same for generation).

With ``judge.combine: label_model`` the final ``safety`` comes from a Dawid-Skene label model
(evaluators/label_model.py) fitted in the driver, once over all the rows being judged: the
actors add each row's votes, the driver collects only those, fits, and a cheap second pass writes
each row's posterior (why not per batch: stages/judge.py).
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import ray.data
from ray.data import ActorPoolStrategy

from selfmoa_ray.config import JudgeSection
from selfmoa_ray.evaluators.composite import (
    VOTE_PREFIX,
    CompositeJudge,
    JudgePanel,
    check_endpoints,
    check_labelers,
    safety_labelers,
)
from selfmoa_ray.evaluators.label_model import LabelModel, fit_label_model


def judge_dataset(
    ds: ray.data.Dataset, judge: JudgeSection, dtype: str = "float32", prefix: str | None = None
) -> ray.data.Dataset:
    """Add the judges' columns to rows holding ``text`` and ``response`` (only the final
    verdicts, prefixed, with ``prefix``: CompositeJudge)."""
    return judge_dataset_fitted(ds, judge, dtype, prefix)[0]


def judge_panel_dataset(
    ds: ray.data.Dataset, judges: list[tuple[JudgeSection, str | None]], dtype: str = "float32"
) -> ray.data.Dataset:
    """Several judges' columns on the same rows (``(judge, prefix)`` in order, as
    :func:`judge_dataset` would add them one after the other), in one actor pool
    (evaluators/composite.py ``JudgePanel``) when they can share it: weighted-mean judges asking
    for the same actor resources. Otherwise one pool each."""
    first = judges[0][0]
    shared = all(
        judge.combine == "weighted_mean" and _resources(judge) == _resources(first)
        for judge, _ in judges
    )
    if not shared:
        for judge, prefix in judges:
            ds = judge_dataset(ds, judge, dtype, prefix)
        return ds
    panel = [
        {
            "specs": [e.model_dump() for e in judge.evaluators],
            "prefix": prefix,
            "api_keys": check_endpoints(judge.evaluators),
        }
        for judge, prefix in judges
    ]
    return ds.map_batches(
        JudgePanel,
        fn_constructor_args=(panel,),
        fn_constructor_kwargs={"dtype": dtype},
        batch_size=first.batch_size,
        compute=ActorPoolStrategy(size=first.num_actors),
        num_cpus=first.num_cpus_per_actor,
        num_gpus=first.num_gpus_per_actor or None,
    )


def _resources(judge: JudgeSection) -> tuple[int, int, float, float]:
    return judge.batch_size, judge.num_actors, judge.num_cpus_per_actor, judge.num_gpus_per_actor


def judge_dataset_fitted(
    ds: ray.data.Dataset, judge: JudgeSection, dtype: str = "float32", prefix: str | None = None
) -> tuple[ray.data.Dataset, LabelModel | None]:
    """``judge_dataset``, and the label model fitted on the rows (None for a weighted mean)."""
    if judge.combine == "label_model":  # fail before any model loads
        check_labelers(safety_labelers(judge.evaluators), judge.evaluators)
    api_keys = check_endpoints(judge.evaluators)  # in the driver: fail before any actor starts
    judged = ds.map_batches(
        CompositeJudge,
        fn_constructor_args=([e.model_dump() for e in judge.evaluators],),
        fn_constructor_kwargs={
            "dtype": dtype,
            "prefix": prefix,
            "combine": judge.combine,
            "api_keys": api_keys,
        },
        batch_size=judge.batch_size,
        compute=ActorPoolStrategy(size=judge.num_actors),
        num_cpus=judge.num_cpus_per_actor,
        num_gpus=judge.num_gpus_per_actor or None,
    )
    if judge.combine == "weighted_mean":
        return judged, None
    return _label_model_safety(judged.materialize(), judge, prefix or "")


def _label_model_safety(
    judged: ray.data.Dataset, judge: JudgeSection, prefix: str
) -> tuple[ray.data.Dataset, LabelModel | None]:
    """Fit the label model on every row's votes; replace ``<prefix>safety`` by its posterior
    and drop the vote columns."""
    names = [labeler.name for labeler in safety_labelers(judge.evaluators)]
    columns = [f"{prefix}{VOTE_PREFIX}{name}" for name in names]
    parts = [
        np.column_stack([batch[c] for c in columns])
        for batch in judged.select_columns(columns).iter_batches(
            batch_format="numpy", batch_size=None
        )
    ]
    if not parts:  # no rows: nothing to fit, nothing to rewrite
        return judged, None
    model = fit_label_model(np.concatenate(parts), names)
    print(f"[judge] label model: {model.summary()}", file=sys.stderr, flush=True)
    return (
        judged.map_batches(
            _posterior_safety,
            fn_kwargs={"model": model, "columns": columns, "out": f"{prefix}safety"},
            batch_format="pyarrow",
        ),
        model,
    )


def _posterior_safety(batch: pa.Table, model: LabelModel, columns: list[str], out: str) -> pa.Table:
    votes = np.column_stack([batch.column(c).to_numpy(zero_copy_only=False) for c in columns])
    batch = batch.drop_columns(columns)
    posterior = pa.array(model.posterior(votes).astype(np.float32))
    return batch.set_column(batch.schema.get_field_index(out), out, posterior)
