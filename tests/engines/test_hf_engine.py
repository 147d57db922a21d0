"""What is specific to the transformers engine, and the Ray Data actor-pool wiring.

The row contract shared with vLLM (schema, n samples, greedy and seeded determinism, token
budgets, chat templates, ``messages``, malformed rows) is in test_engine_contract.py.
"""

import numpy as np
import pytest
import ray.data
import torch

from selfmoa_ray.config import EngineSection, ModelSection
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.engines.hf import HFChatEngine
from selfmoa_ray.engines.pool import engine_class_and_kwargs, generate


@pytest.fixture(scope="module")
def greedy():
    return HFChatEngine("tiny-random", SamplingParams(n=1, temperature=0.0, max_new_tokens=4))


def test_left_padding_does_not_leak_into_rows(greedy):
    """A batch of prompts of different lengths gives each row what it gets alone."""
    texts = ["Hi", "Please write a much longer question than the first one, with detail."]
    batch = greedy({"id": np.array(["s", "l"]), "text": np.array(texts)})
    assert greedy.tokenizer.padding_side == "left"
    for i, text in enumerate(texts):
        alone = greedy({"id": np.array(["x"]), "text": np.array([text])})
        for key in ("prompt_tokens", "response_tokens", "response", "finish_reason"):
            assert batch[key][i] == alone[key][0], key
    assert batch["prompt_tokens"][1] > batch["prompt_tokens"][0] + 10  # really padded


def test_batches_of_one_call_get_their_own_random_draws():
    """The same chat at the same position of two different batches is sampled independently,
    and a batch samples the same way again (the seed comes from its content)."""
    engine = HFChatEngine("tiny-random", SamplingParams(n=1, temperature=1.0, max_new_tokens=8))
    first = engine({"id": np.array(["a", "b"]), "text": np.array(["Hello there", "One"])})
    second = engine({"id": np.array(["a", "c"]), "text": np.array(["Hello there", "Two"])})
    again = engine({"id": np.array(["a", "b"]), "text": np.array(["Hello there", "One"])})
    assert first["response"][0] != second["response"][0]
    assert list(again["response"]) == list(first["response"])


def test_answers_are_cut_at_the_first_eos_and_lose_their_pads(greedy):
    core, eos = greedy.core, greedy.tokenizer.eos_token_id
    assert greedy.tokenizer.pad_token_id == eos  # the tiny model pads with its EOS
    stopped = core.answer([5, 6, eos, 7], eos_ids={eos})
    assert (stopped.ids, stopped.eos, stopped.tokens) == ([5, 6], True, 3)  # the EOS is counted
    assert core.answer([5, 9, 6], eos_ids={eos, 9}).ids == [5]  # any of the EOS ids ends it
    cut = core.answer([5, eos, 6], eos_ids=())
    assert (cut.ids, cut.eos, cut.tokens) == ([5, 6], False, 2)
    assert cut.text == greedy.tokenizer.decode([5, 6], skip_special_tokens=True)


def test_the_policy_app_answers_as_the_engine_does():
    """Both run on engines/hf_core.py: the same chat, greedily, gives the same tokens (weights x10
    for answers that depend on every token; the engine strips its text, the app does not)."""
    from serve_apps.policy import HFGenerator, _Job

    engine = HFChatEngine("tiny-random", SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
    app = HFGenerator("tiny-random", dtype="float32", trust_remote_code=False, num_threads=None)
    with torch.no_grad():
        for model in (engine.model, app.core.model):
            for name, param in model.named_parameters():
                if "norm" not in name:
                    param.mul_(10.0)
    chat = [{"role": "user", "content": "Name a fruit."}]
    job = _Job(app.encode(chat), max_tokens=8, temperature=0.0, top_p=1.0, n=2, seed=None, stop=[])
    samples = app.complete(job)
    messages = np.empty(1, dtype=object)
    messages[0] = chat
    rows = engine({"id": np.array(["q"]), "messages": messages})
    assert [s.text.strip() for s in samples] == list(rows["response"])
    assert [s.tokens for s in samples] == list(rows["response_tokens"])
    assert [s.finish_reason for s in samples] == list(rows["finish_reason"])
    assert job.prompt_tokens == rows["prompt_tokens"][0]
    assert rows["response"][0]  # a real answer, not the untrained model's newline


def test_pool_picks_the_backend_class_and_its_settings():
    model = ModelSection(source="tiny-random", dtype="bfloat16")
    cls, kwargs = engine_class_and_kwargs(model, EngineSection(num_cpus_per_actor=2))
    assert cls is HFChatEngine
    assert kwargs == {"dtype": "bfloat16", "trust_remote_code": False, "num_threads": 2}
    # vLLM resolves lazily: importing its engine module needs no vLLM in this venv
    cls, kwargs = engine_class_and_kwargs(
        model, EngineSection(backend="vllm", num_gpus_per_actor=2, max_model_len=1024)
    )
    assert cls.__name__ == "VLLMChatEngine"
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["max_model_len"] == 1024
    assert kwargs["gpu_memory_utilization"] == EngineSection().gpu_memory_utilization


def test_actor_pool_streams_rows(ray_local):
    rows = [{"id": f"p{i}", "text": f"Question {i}?"} for i in range(10)]
    ds = generate(
        ray.data.from_items(rows),
        ModelSection(source="tiny-random"),
        EngineSection(batch_size=4, num_cpus_per_actor=0.5),
        SamplingParams(n=2, temperature=0.7, max_new_tokens=4),
    )
    out = ds.take_all()
    assert len(out) == 20
    assert sorted({r["id"] for r in out}) == sorted(r["id"] for r in rows)
    assert all(isinstance(r["response"], str) for r in out)


def test_pipeline_with_two_actors_keeps_every_row(ray_local, tmp_path):
    """Two engine actors share the stream: rows out = rows in x n, each id exactly n times."""
    n = 3
    rows = [
        {"id": f"q{i}", "text": f"Question number {i}?", "source": "advbench" if i % 2 else "airt"}
        for i in range(12)
    ]
    before = _engine_actors()
    ds = generate(
        ray.data.from_items(rows),
        ModelSection(source="tiny-random"),
        EngineSection(batch_size=2, num_actors=2, num_cpus_per_actor=0.5),
        SamplingParams(n=n, temperature=1.0, max_new_tokens=3),
    )
    ds.write_parquet(str(tmp_path / "responses"))  # the stage's path: stream through to files
    out = ray.data.read_parquet(str(tmp_path / "responses")).take_all()
    assert len(out) == len(rows) * n
    counts: dict[str, list[int]] = {}
    for r in out:
        counts.setdefault(r["id"], []).append(r["sample_index"])
    assert counts.keys() == {r["id"] for r in rows}
    assert all(sorted(indices) == list(range(n)) for indices in counts.values())
    by_id = {r["id"]: r for r in rows}
    assert all(r["text"] == by_id[r["id"]]["text"] for r in out)
    assert all(r["source"] == by_id[r["id"]]["source"] for r in out)

    assert _engine_actors() >= before + 2  # this pool really started two engine actors


def _engine_actors() -> int:
    """HF engine actors Ray has started so far (the GCS table; the state API needs a dashboard)."""
    from ray._private.state import actors

    return sum("HFChatEngine" in a["ActorClassName"] for a in actors().values())
