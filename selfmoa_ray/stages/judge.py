"""Stage ``judge``: every (prompt, response) gets safety, refusal and helpfulness (2.1 step 3).

responses.parquet -> scored.parquet through an actor pool of composite judges (each actor loads
its evaluator models once).

With ``judge.combine: label_model`` the final ``safety`` comes from a Dawid-Skene label model
(evaluators/label_model.py) fitted here, in the driver, once over all the rows being judged:
the actors add each row's votes, the driver collects only those (a few floats a row), fits,
and a cheap second pass writes each row's posterior. Fitting per Ray Data batch instead would
give every batch of 32 rows its own estimate of each labeler's accuracy, noisy and different
from one batch to the next; a fixed unlabelled set would not follow the policy's answers as
they change over iterations. The cost: the judged rows are materialised before the fit.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from selfmoa_ray.config import JudgeSection
from selfmoa_ray.evaluators.pool import judge_dataset_fitted
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.stage_io import read_dataset, write_dataset


def judge(
    run: RunDir,
    *,
    stage: str,
    responses: str,
    out: str,
    config: JudgeSection,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run (or skip, if done) judging of ``responses`` into ``out``; paths are run-relative.

    ``dtype``: the model judges' weights (bf16 halves an 8B guard's 32 GB on GPUs)."""

    def work() -> dict[str, Any]:
        ds = read_dataset(run, responses, rows_per_block=config.batch_size)
        judged, model = judge_dataset_fitted(ds, config, dtype)
        write_dataset(judged, run, out, total=ds.count(), label=stage)
        table = pq.read_table(run.path(out), columns=["safety", "refusal"])
        safety = table.column("safety").to_pylist()
        return {
            "rows": table.num_rows,
            "unsafe": sum(s < config.unsafe_threshold for s in safety),
            "refusals": sum(table.column("refusal").to_pylist()),
        } | ({"label_model": model.summary()} if model is not None else {})

    return run.run_stage(stage, [out], work)
