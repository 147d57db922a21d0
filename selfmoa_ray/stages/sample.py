"""Stage ``sample``: the policy answers every prompt k times (design.md 2.1 step 2).

prompts.parquet -> responses.parquet, streamed through the engine actor pool; the output folder is
published atomically, so it exists only when every row was written.

With a *guide* (``sampling.guide``: a chat prefix such as a safety system prompt and example
turns), every prompt is also answered k times under that prefix: safety context distillation
(Askell et al. 2021; Llama 2, Touvron et al. 2023, section 4.2.4). A small policy rarely refuses on
its own (SmolLM2-135M: ~10% of answers to attacks), so its k bare answers seldom hold a refusal
for a pair to prefer; under a guide it refuses up to 2.5 times as often. The guided rows keep the
bare prompt in ``text`` (the judge and the pairs read it, not the guide), get ``sample_index``
k..2k-1 and ``guided = true``, so the trained policy learns to answer the bare prompt the way the
guide made it answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.pool import generate
from selfmoa_ray.rundir import RunDir, atomic_path

GUIDED = "guided"


def write_dataset(ds: ray.data.Dataset, run: RunDir, out: str) -> None:
    """Write a dataset as a Parquet folder, published only once complete."""
    with atomic_path(run.path(out)) as tmp:
        ds.write_parquet(str(tmp))


def with_chat(guide: Sequence[dict[str, str]] | None):
    """A ``map_batches`` function giving each prompt row its chat: the user turn, after the
    ``guide`` chat prefix when given, and the ``guided`` flag."""
    prefix = [dict(m) for m in guide or []]

    def add(batch: pa.Table) -> pa.Table:
        chats = [[*prefix, {"role": "user", "content": t}] for t in batch["text"].to_pylist()]
        batch = batch.append_column("messages", pa.array(chats))
        return batch.append_column(GUIDED, pa.array([bool(guide)] * batch.num_rows))

    return add


def drop_chat(n: int):
    """A ``map_batches`` function that numbers guided samples after the bare ones (k..2k-1) and
    drops the chat column: downstream stages read the bare prompt in ``text``."""

    def drop(batch: pa.Table) -> pa.Table:
        index = batch["sample_index"].to_pylist()
        guided = batch[GUIDED].to_pylist()
        shifted = pa.array([i + n * g for i, g in zip(index, guided, strict=True)], pa.int64())
        batch = batch.set_column(batch.schema.get_field_index("sample_index"), "sample_index",
                                 shifted)  # fmt: skip
        return batch.drop_columns(["messages"])

    return drop


def sample(
    run: RunDir,
    *,
    stage: str,
    prompts: str,
    out: str,
    model: ModelSection,
    engine: EngineSection,
    sampling: SamplingParams,
    guide: Sequence[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Run (or skip, if done) sampling of ``prompts`` into ``out``; paths are run-relative.

    ``guide``: a chat prefix under which every prompt is answered another ``sampling.n`` times
    (module docstring); None samples the bare prompts only.
    """

    def work() -> dict[str, Any]:
        ds = ray.data.read_parquet(str(run.path(prompts)))
        chats = ds.map_batches(with_chat(None), batch_format="pyarrow")
        if guide:
            chats = chats.union(ds.map_batches(with_chat(guide), batch_format="pyarrow"))
        answers = generate(chats, model, engine, sampling)
        write_dataset(answers.map_batches(drop_chat(sampling.n), batch_format="pyarrow"), run, out)
        table = pq.read_table(run.path(out), columns=["response_tokens", GUIDED])
        return {
            "model": model.label,
            "responses": table.num_rows,
            "guided_responses": sum(table.column(GUIDED).to_pylist()),
            "response_tokens": int(sum(table.column("response_tokens").to_pylist())),
        }

    return run.run_stage(stage, [out], work)
