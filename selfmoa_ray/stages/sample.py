"""Stage ``sample``: the policy answers every prompt k times (design.md 2.1 step 2).

prompts.parquet -> responses.parquet, streamed through the engine actor pool; the output folder is
published atomically, so it exists only when every row was written.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq
import ray.data

from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.pool import generate
from selfmoa_ray.rundir import RunDir, atomic_path


def write_dataset(ds: ray.data.Dataset, run: RunDir, out: str) -> None:
    """Write a dataset as a Parquet folder, published only once complete."""
    with atomic_path(run.path(out)) as tmp:
        ds.write_parquet(str(tmp))


def sample(
    run: RunDir,
    *,
    stage: str,
    prompts: str,
    out: str,
    model: ModelSection,
    engine: EngineSection,
    sampling: SamplingParams,
) -> dict[str, Any]:
    """Run (or skip, if done) sampling of ``prompts`` into ``out``; paths are run-relative."""

    def work() -> dict[str, Any]:
        ds = ray.data.read_parquet(str(run.path(prompts)))
        write_dataset(generate(ds, model, engine, sampling), run, out)
        table = pq.read_table(run.path(out), columns=["response_tokens"])
        return {
            "model": model.source,
            "responses": table.num_rows,
            "response_tokens": int(sum(table.column("response_tokens").to_pylist())),
        }

    return run.run_stage(stage, [out], work)
