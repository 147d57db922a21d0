"""Stage ``sample``: the policy answers every prompt k times (docs/design.md 2.1 step 2).

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

A *prefill* (``sampling.prefill``, e.g. "I'm sorry, but I can't") opens each guided answer: the
model writes the rest after it, and the stored response is the prefill plus what the model wrote.
Every prompt then has answers that refuse in the policy's own words, which the pairs prefer on an
attack and reject on a benign prompt (stages/pairs.py, ``intent`` mode): the policy learns *when*
to refuse, not only to refuse more. The local engines continue a chat whose last turn is the
assistant's (engines/base.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.engines.base import SamplingParams, join_prefill
from selfmoa_ray.engines.pool import generate
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.schema import GUIDED
from selfmoa_ray.stage_io import read_dataset, write_dataset


def with_chat(guide: Sequence[dict[str, str]] | None, prefill: str | None = None):
    """A ``map_batches`` function giving each prompt row its chat: the user turn, after the
    ``guide`` chat prefix when given, followed by the opened assistant turn ``prefill`` when
    given, and the ``guided`` flag (either of them)."""
    prefix = [dict(m) for m in guide or []]
    opening = [{"role": "assistant", "content": prefill}] if prefill else []

    def add(batch: pa.Table) -> pa.Table:
        chats = [
            [*prefix, {"role": "user", "content": t}, *opening] for t in batch["text"].to_pylist()
        ]
        batch = batch.append_column("messages", pa.array(chats))
        return batch.append_column(GUIDED, pa.array([bool(guide or prefill)] * batch.num_rows))

    return add


def drop_chat(n: int, prefill: str | None = None):
    """A ``map_batches`` function that numbers guided samples after the bare ones (k..2k-1), puts
    the ``prefill`` back in front of the guided responses, and drops the chat column: downstream
    stages read the bare prompt in ``text``."""

    def drop(batch: pa.Table) -> pa.Table:
        index = batch["sample_index"].to_pylist()
        guided = batch[GUIDED].to_pylist()
        shifted = pa.array([i + n * g for i, g in zip(index, guided, strict=True)], pa.int64())
        batch = batch.set_column(batch.schema.get_field_index("sample_index"), "sample_index",
                                 shifted)  # fmt: skip
        if prefill:
            responses = [
                join_prefill(prefill, r) if g else r
                for r, g in zip(batch["response"].to_pylist(), guided, strict=True)
            ]
            batch = batch.set_column(batch.schema.get_field_index("response"), "response",
                                     pa.array(responses, pa.string()))  # fmt: skip
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
    prefill: str | None = None,
) -> dict[str, Any]:
    """Run (or skip, if done) sampling of ``prompts`` into ``out``; paths are run-relative.

    ``guide``: a chat prefix, and ``prefill``: an opening of the answer, under which every
    prompt is answered another ``sampling.n`` times (module docstring); with neither, the bare
    prompts only.
    """
    guided = bool(guide or prefill)

    def work() -> dict[str, Any]:
        ds = read_dataset(run, prompts)
        chats = ds.map_batches(with_chat(None), batch_format="pyarrow")
        if guided:
            chats = chats.union(ds.map_batches(with_chat(guide, prefill), batch_format="pyarrow"))
        answers = generate(chats, model, engine, sampling)
        expected = ds.count() * sampling.n * (2 if guided else 1)  # rows held on the driver
        write_dataset(answers.map_batches(drop_chat(sampling.n, prefill), batch_format="pyarrow"),
                      run, out, total=expected, label=stage, tokens=True)  # fmt: skip
        table = pq.read_table(run.path(out), columns=["response_tokens", GUIDED])
        return {
            "model": model.label,
            "responses": table.num_rows,
            "guided_responses": sum(table.column(GUIDED).to_pylist()),
            "response_tokens": int(sum(table.column("response_tokens").to_pylist())),
        }

    return run.run_stage(stage, [out], work)
