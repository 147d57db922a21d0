"""Prompts sorted by length before the transformers engine batches them (engines/pool.py)."""

from __future__ import annotations

import random

import pyarrow as pa
import pytest
import ray.data
from ray.data import ActorPoolStrategy

from selfmoa_ray.config import EngineSection
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.pool import (
    balanced,
    by_prompt_length,
    longest_first,
    prompt_chars,
    rows_per_batch,
)


def test_longest_first_orders_rows_by_their_chat():
    block = pa.table(
        {
            "id": ["d", "b", "c", "a", "e", "a"],
            "text": ["xx", "x", "xxxx", "yy", None, "xy"],
            "messages": [None, [{"role": "user", "content": "z" * 9}], None, None, [], None],
        }
    )
    assert prompt_chars(block) == [2, 9, 4, 2, 0, 2]  # messages win over text; malformed: 0
    out = longest_first(block)
    # ties go by id, then by the chat: whichever order the rows came in
    assert out.column("text").to_pylist() == ["x", "xxxx", "xy", "yy", "xx", None]
    assert out.schema == block.schema
    assert longest_first(block.take([5, 4, 3, 2, 1, 0])).equals(out)


def _rows() -> list[dict]:
    rng = random.Random(0)
    rows = [{"id": f"p{i}", "text": "x" * rng.randint(1, 400)} for i in range(50)]
    return rows + [{"id": "m", "messages": [{"role": "user", "content": "y" * 1000}]}]


def test_sorted_rows_come_in_blocks_of_one_batch(ray_local):
    """Rows spread over several blocks come out sorted in blocks of ``batch_size`` rows: an
    actor pool hands each block to one actor, so every actor of the pool gets batches."""
    rows = _rows()
    ds, size = by_prompt_length(ray.data.from_items(rows, override_num_blocks=5), 8)
    blocks = [
        block.column("id").to_pylist()
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow")  # one per block
    ]
    assert size == 8 and [len(b) for b in blocks] == [8] * 6 + [3]
    chars = {r["id"]: len(r.get("text") or r["messages"][0]["content"]) for r in rows}
    ids = [i for block in blocks for i in block]
    assert sorted(ids) == sorted(chars) and ids[0] == "m"
    assert [chars[i] for i in ids] == sorted(chars.values(), reverse=True)


def test_the_engine_gets_full_batches_of_similar_lengths(ray_local):
    class Batches:
        def __call__(self, batch: pa.Table) -> pa.Table:
            chars = prompt_chars(batch)
            return pa.table({"n": [batch.num_rows], "lo": [min(chars)], "hi": [max(chars)]})

    ds, size = by_prompt_length(ray.data.from_items(_rows(), override_num_blocks=5), 8)
    batches = ds.map_batches(
        Batches, batch_size=size, batch_format="pyarrow", compute=ActorPoolStrategy(size=2),
        num_cpus=0.5,
    ).take_all()  # fmt: skip
    assert sorted(b["n"] for b in batches) == [3] + [8] * 6  # 51 rows: one part batch
    batches.sort(key=lambda b: -b["hi"])
    for longer, shorter in zip(batches, batches[1:], strict=False):
        assert longer["lo"] >= shorter["hi"]  # the batches hold disjoint length ranges


def test_an_empty_dataset_stays_empty(ray_local):
    ds = ray.data.from_items([{"id": "x", "text": "y"}]).limit(0)
    assert by_prompt_length(ds, 4)[0].take_all() == []


def test_batches_are_balanced_and_count_sequences():
    assert balanced(80, 72) == 40 and balanced(72, 72) == 72 and balanced(73, 72) == 37
    assert balanced(51, 8) == 8 and balanced(3, 8) == 3 and balanced(0, 8) == 8
    sampled = SamplingParams(n=3, temperature=0.8)
    assert rows_per_batch(EngineSection(batch_size=96), sampled) == 32  # 32 prompts x 3 samples
    assert rows_per_batch(EngineSection(batch_size=96), SamplingParams(n=3)) == 96  # greedy: 1
    assert rows_per_batch(EngineSection(batch_size=2), sampled) == 1


@pytest.mark.timeout(120)
def test_the_pool_runs_when_its_actors_hold_every_cpu(ray_local):
    """The sorted blocks need no Ray task once the pool starts: on a cluster whose CPUs its
    actors hold (a node lost mid-run), a task between the rows and the actors never starts."""
    cpus = ray_local.cluster_resources()["CPU"]

    class Count:
        def __call__(self, batch: pa.Table) -> pa.Table:
            return pa.table({"n": [batch.num_rows]})

    ds, size = by_prompt_length(ray.data.from_items(_rows(), override_num_blocks=5), 8)
    batches = ds.map_batches(
        Count, batch_size=size, batch_format="pyarrow", compute=ActorPoolStrategy(size=2),
        num_cpus=cpus / 2,
    ).take_all()  # fmt: skip
    assert sum(b["n"] for b in batches) == 51
