"""Stage ``judge``: every (prompt, response) gets safety, refusal and helpfulness (2.1 step 3).

responses.parquet -> scored.parquet through an actor pool of composite judges (each actor loads
its evaluator models once).
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq
import ray.data
from ray.data import ActorPoolStrategy

from selfmoa_ray.config import JudgeSection
from selfmoa_ray.evaluators.composite import CompositeJudge
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.stages.sample import read_dataset, write_dataset


def judge_dataset(
    ds: ray.data.Dataset, judge: JudgeSection, dtype: str = "float32", prefix: str | None = None
) -> ray.data.Dataset:
    """Add the judges' columns to rows holding ``text`` and ``response`` (only the final
    verdicts, prefixed, with ``prefix``: CompositeJudge)."""
    return ds.map_batches(
        CompositeJudge,
        fn_constructor_args=([e.model_dump() for e in judge.evaluators],),
        fn_constructor_kwargs={"dtype": dtype, "prefix": prefix},
        batch_size=judge.batch_size,
        compute=ActorPoolStrategy(size=judge.num_actors),
        num_cpus=judge.num_cpus_per_actor,
        num_gpus=judge.num_gpus_per_actor or None,
    )


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
        write_dataset(judge_dataset(ds, config, dtype), run, out, total=ds.count(), label=stage)
        table = pq.read_table(run.path(out), columns=["safety", "refusal"])
        safety = table.column("safety").to_pylist()
        return {
            "rows": table.num_rows,
            "unsafe": sum(s < config.unsafe_threshold for s in safety),
            "refusals": sum(table.column("refusal").to_pylist()),
        }

    return run.run_stage(stage, [out], work)
