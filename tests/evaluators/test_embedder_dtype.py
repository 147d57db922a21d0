"""MiniLM in the judge's dtype: bf16 encoder, float32 pooling, probe training kept on float32.

Real MiniLM weights in both dtypes. The probe folders here hold untrained (all-zero) heads: these
tests check where the dtype goes, not what the heads learnt (test_probe.py does that, and
benchmarks/precision.py measures how far bf16 moves the trained probe's scores).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfmoa_ray import precision
from selfmoa_ray.config import EvaluatorSection
from selfmoa_ray.evaluators import probe_training as probe_module
from selfmoa_ray.evaluators.composite import CompositeJudge, build_evaluator
from selfmoa_ray.evaluators.embeddings import EMBEDDER_NAME, MiniLMEmbedder
from selfmoa_ray.evaluators.probe_format import FORMAT, FORMAT_VERSION, save_probe
from selfmoa_ray.evaluators.probe_model import (
    FEATURE_DIM,
    FEATURE_RECIPE,
    HEAD_MODELS,
    HEADS,
    OUTPUTS,
    LinearHead,
    Probe,
    ProbeCard,
)
from selfmoa_ray.evaluators.probe_training import ensure_probe, train_probe

TEXTS = [
    "a cat",
    "a kitten",
    "quarterly tax filing",
    "I'm sorry, but I can't help with that request.",
    "Mix flour, water and starter, let it rise overnight, then bake at 230C. " * 20,
]


@pytest.fixture(scope="module")
def fp32() -> MiniLMEmbedder:
    return MiniLMEmbedder(dtype="float32")


@pytest.fixture(scope="module")
def bf16() -> MiniLMEmbedder:
    return MiniLMEmbedder(dtype="bfloat16")


def _untrained_probe(folder) -> str:
    """A loadable probe folder with all-zero heads: objective 0.5, harm 0, so safety 0.75."""
    zeros, ones = np.zeros(FEATURE_DIM), np.ones(FEATURE_DIM)
    heads = {h: LinearHead(HEAD_MODELS[h][0], zeros, 0.0, zeros, ones) for h in HEADS}
    card = ProbeCard(
        format=FORMAT,
        version=FORMAT_VERSION,
        embedder=EMBEDDER_NAME,
        features=FEATURE_RECIPE,
        feature_dim=FEATURE_DIM,
        heads={h: {"cv_grouped": {"accuracy": 0.0}} for h in HEADS},
        twins_heldout={},
        outputs=OUTPUTS,
        training_data={},
        caveats=[],
        created="",
        sklearn_version="",
        seed=0,
        folds=0,
        split="train",
        heldback={},
        prompt_digests=[],
    )
    return str(save_probe(Probe(heads, card), folder))


def test_bf16_encoder_gives_float32_unit_vectors_close_to_float32(fp32, bf16):
    assert fp32.model.dtype == torch.float32 and bf16.model.dtype == torch.bfloat16
    a, b = fp32.embed(TEXTS), bf16.embed(TEXTS)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-6)  # normalised in fp32
    assert np.min(np.sum(a * b, axis=1)) > 0.99  # the same direction, to bf16's precision
    assert not np.array_equal(a, b)  # really computed in another dtype
    sims = b @ b.T
    assert sims[0, 1] > sims[0, 2] + 0.3  # neighbours survive


def test_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch):
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(precision, "bf16_is_fast", lambda device, native=native: native)
        embedder = MiniLMEmbedder()
        assert embedder.dtype == expected
        assert embedder.model.dtype == getattr(torch, expected)


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        MiniLMEmbedder(dtype="float8")


def test_the_judge_dtype_reaches_the_probe_embedder(tmp_path):
    folder = _untrained_probe(tmp_path / "probe")
    judge = CompositeJudge([{"kind": "probe", "model": folder}], dtype="bfloat16")
    (evaluator,) = judge.evaluators
    assert evaluator.embedder.dtype == "bfloat16"
    scores = judge.score(["How do I bake bread?"], ["Mix flour and water, then bake."])
    assert scores["probe_safety"].dtype == np.float32
    assert scores["probe_safety"][0] == pytest.approx(0.75)  # zero heads
    spec = EvaluatorSection(kind="probe", model=folder)
    assert build_evaluator(spec, dtype="float32").embedder.dtype == "float32"


def test_probe_training_refuses_bf16_embeddings(bf16, tmp_path):
    with pytest.raises(ValueError, match="float32 embedder"):
        train_probe(tmp_path / "probe", embedder=bf16)


def test_first_use_training_swaps_a_bf16_embedder_for_float32(bf16, fp32, tmp_path, monkeypatch):
    """ensure_probe trains with the scoring embedder only when it is float32."""
    seen = []

    def fake_train(folder, *, split="train", embedder=None):
        seen.append(embedder)
        _untrained_probe(folder)
        return probe_module.load_probe(folder).card

    monkeypatch.setattr(probe_module, "train_probe", fake_train)
    for i, embedder in enumerate((bf16, fp32)):
        monkeypatch.setenv("SELFMOA_CACHE", str(tmp_path / f"cache{i}"))
        ensure_probe(embedder=embedder)
    assert seen == [None, fp32]
