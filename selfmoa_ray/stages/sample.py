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

A *prefill* (``sampling.prefill``, e.g. "I'm sorry, but I can't") opens each guided answer: the
model writes the rest after it, and the stored response is the prefill plus what the model wrote.
Every prompt then has answers that refuse in the policy's own words, which the pairs prefer on an
attack and reject on a benign prompt (stages/pairs.py, ``intent`` mode): the policy learns *when*
to refuse, not only to refuse more. The local engines continue a chat whose last turn is the
assistant's (engines/base.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.console import row_progress
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.pool import as_dataset, generate
from selfmoa_ray.rundir import RunDir, atomic_path

GUIDED = "guided"


def read_dataset(run: RunDir, path: str, *, rows_per_block: int | None = None) -> ray.data.Dataset:
    """A stage's input (a Parquet file or folder in the run) as a dataset, read on the driver.

    Stage inputs are small (prompts, answers, pairs: kilobytes to a few megabytes), and Ray
    Data's ``read_parquet`` costs 4-13 s per call on 2 cores (file listing and read tasks), more
    than some stages' whole work; an in-memory table costs a tenth of a second. Blocks of
    ``rows_per_block`` rows keep every actor of a pool busy (a pool hands out whole blocks).
    """
    return as_dataset(pq.read_table(run.path(path)), rows_per_block)


def write_dataset(
    ds: ray.data.Dataset,
    run: RunDir,
    out: str,
    *,
    total: int | None = None,
    label: str | None = None,
    tokens: bool = False,
) -> None:
    """Write a dataset as a Parquet folder (one part file per block), published only once complete.

    The blocks stream through the driver as they are produced, so the console's progress bar
    (``label``, default ``out``; ``total`` rows expected, for its ETA; ``tokens``: generated
    tokens/s from ``response_tokens``) shows the running stage. Part files whose schemas differ
    (a block whose column is all null) are rewritten to the unified schema, so any reader of the
    folder sees one schema.
    """
    with atomic_path(run.path(out)) as tmp, row_progress(label or out, total, tokens=tokens) as bar:
        tmp.mkdir()
        parts: list[tuple[Path, pa.Schema]] = []
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if block.num_rows or not parts:  # one empty part keeps the schema of an empty result
                part = tmp / f"part-{len(parts):05d}.parquet"
                pq.write_table(block, part)
                parts.append((part, block.schema))
            bar(block)
        if not parts:  # no block at all: an empty table of the dataset's schema
            schema = ds.schema()
            empty = pa.schema(schema.base_schema) if schema is not None else pa.schema([])
            pq.write_table(empty.empty_table(), tmp / "part-00000.parquet")
        _unify_parts(parts)


def _unify_parts(parts: list[tuple[Path, pa.Schema]]) -> None:
    schemas = [schema for _, schema in parts]
    if all(schema.equals(schemas[0]) for schema in schemas[1:]):
        return
    unified = pa.unify_schemas(schemas, promote_options="permissive")
    for part, schema in parts:
        if not schema.equals(unified):
            table = pq.read_table(part)
            pq.write_table(table.select(unified.names).cast(unified), part)


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


def join_prefill(prefill: str, continuation: str) -> str:
    """The whole answer: the engines strip what they return, so the space the model wrote between
    the prefill and its next word ("I can't" + " help") is put back."""
    space = continuation[:1].isalnum() and not prefill[-1:].isspace()
    return prefill + (" " if space else "") + continuation


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
