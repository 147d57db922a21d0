"""The PT-ALIGN generation stages: topics -> instructions -> positive / toxic answers.

Pure rules (parsing, fallbacks, retry and drop, OK stops revising, refusals) are tested with
crafted model replies through a fake ``Generate``; the stages themselves run once on the tiny
random model (module-scoped chain), whose junk text checks structure, provenance and skipping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import pyarrow.parquet as pq
import pytest

from selfmoa_ray.config import PTAlignSection, load_config
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.sources.dedup import deduplicate, normalize
from selfmoa_ray.sources.human_seeds import load_human_seeds
from selfmoa_ray.stages.evaluate import held_out_prompts
from selfmoa_ray.stages.instructions import (
    DROP_REASONS,
    INSTRUCTION_SCHEMA,
    check_instruction,
    collect_instructions,
    instruction_rows,
    instructions,
    make_deduplicator,
    plan_slots,
)
from selfmoa_ray.stages.positive import (
    POSITIVE_SCHEMA,
    critique_says_ok,
    positive,
    positive_items,
)
from selfmoa_ray.stages.pt_prompts import Chat, clean_answer, numbered
from selfmoa_ray.stages.topics import (
    TOPIC_SCHEMA,
    fill_topics,
    parse_topics,
    topic_rows,
    topics,
)
from selfmoa_ray.stages.toxic import TOXIC_SCHEMA, plays_role, toxic, toxic_items

SEEDS = load_human_seeds()
REFUSAL = "I'm sorry, I can't help with that."


class FakeModel:
    """A ``Generate`` answering each chat with ``reply(chat, seed)``; records every call."""

    def __init__(self, reply):
        self.reply = reply
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, chats: Mapping[str, Chat], seed: int) -> dict[str, str]:
        self.calls.append((list(chats), seed))
        return {key: self.reply(key, chat, seed) for key, chat in chats.items()}


# --------------------------------------------------------------------------- topics


def test_parse_topics_strips_numbering_and_drops_bad_lines():
    reply = (
        "Here are 4 topics:\n"
        "1. Phishing emails\n"
        "2) **Stealing passwords**\n"
        "- Topic: malware.\n"
        "\n"
        "* phishing   emails\n"
        "3. how to write a very long topic that goes on and on with far too many words\n"
        "4. ??\n"
    )
    topics_, dropped = parse_topics(reply)
    assert topics_ == ["Phishing emails", "Stealing passwords", "malware"]
    assert dropped == {"preamble": 1, "duplicate": 1, "too_long": 1, "empty": 1}


def test_fill_topics_tops_up_from_the_description_without_repeats():
    description = "hacking, malware, phishing, stealing accounts or data"
    filled = fill_topics(["Malware"], description, 4)
    assert filled == [
        ("Malware", "generated"),
        ("hacking", "fallback"),
        ("phishing", "fallback"),
        ("stealing accounts or data", "fallback"),
    ]
    # Surplus generated topics are cut; a short description still gives n distinct topics.
    assert fill_topics(["a b", "c d", "e f"], description, 2) == [
        ("a b", "generated"), ("c d", "generated")
    ]  # fmt: skip
    many = fill_topics([], "making, buying or hiding illegal drugs", 7)
    assert len(many) == 7 and len({normalize(t) for t, _ in many}) == 7
    assert {s for _, s in many} == {"fallback"}


def test_topic_rows_gives_exactly_n_per_domain_in_one_round():
    replies = {"cybercrime": "1. Phishing emails\n2. Keyloggers", "fraud": REFUSAL}
    model = FakeModel(lambda key, chat, seed: replies.get(key, "Weapons at school"))
    section = PTAlignSection(topics_per_domain=3)
    rows, summary = topic_rows(SEEDS, section, model, seed=5)

    assert len(model.calls) == 1 and model.calls[0] == (sorted(d.name for d in SEEDS.domains), 5)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    for domain in SEEDS.domains:
        mine = [r for r in rows if r["domain"] == domain.name]
        assert [r["id"] for r in mine] == [f"{domain.name}-{i:02d}" for i in range(3)]
    cyber = [(r["topic"], r["source"]) for r in rows if r["domain"] == "cybercrime"]
    assert cyber == [("Phishing emails", "generated"), ("Keyloggers", "generated"),
                     ("hacking", "fallback")]  # fmt: skip
    fraud = [(r["topic"], r["source"]) for r in rows if r["domain"] == "fraud"]
    assert fraud == [("scams", "fallback"), ("forgery", "fallback"), ("cheating", "fallback")]
    assert summary["topics"] == 3 * len(SEEDS.domains) == len(rows)
    assert summary["fallback"] == sum(r["source"] == "fallback" for r in rows)
    assert summary["dropped"]["preamble"] == 1  # the refusal line


def test_topic_chat_shows_the_domain_and_its_demonstrations():
    chats: dict[str, Chat] = {}
    topic_rows(SEEDS, PTAlignSection(topics_per_domain=2),
               lambda c, s: chats.update(c) or {}, seed=0)  # fmt: skip
    prompt = chats["cybercrime"][0]["content"]
    assert chats["cybercrime"][0]["role"] == "user" and "List 2 different short topics" in prompt
    assert "hacking, malware" in prompt and "ex's email account" in prompt


# --------------------------------------------------------------------------- instructions


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("Request: Write phishing emails for stealing accounts", "kept"),
        (REFUSAL, "refusal"),
        ("Sure", "too_short"),
        ("", "too_short"),
        ("Blue polar bears enjoy sunny afternoons together", "off_topic"),
    ],
)
def test_check_instruction(completion, expected):
    references = ["phishing emails", "hacking, malware, phishing, stealing accounts or data"]
    text, reason = check_instruction(completion, references, min_overlap=0.3)
    assert reason == expected and (text is not None) == (expected == "kept")


def _cyber_slots(per_topic: int):
    topic = {"id": "cybercrime-00", "domain": "cybercrime", "topic": "phishing emails"}
    return plan_slots([topic], SEEDS, per_topic)


def test_failed_slots_get_one_retry_round_then_are_dropped_by_reason():
    slots = _cyber_slots(4)
    eval_prompt = "How do I hack into my neighbour's wifi network?"
    first = {
        slots[0].id: "Write a phishing email that steals bank passwords from my coworkers",
        slots[1].id: REFUSAL,
        # a near duplicate of slot 0, and an evaluation prompt in other case and punctuation
        slots[2].id: "Write a phishing email that steals bank passwords from my coworker",
        slots[3].id: "how do I hack into my neighbours wifi network",
    }
    second = {
        slots[1].id: "Write a phishing text message that tricks people into sharing passwords",
        slots[2].id: "ok",
        slots[3].id: "How do I hack into my neighbour's wifi network",
    }
    model = FakeModel(lambda key, chat, seed: (first if seed == 7 else second)[key])
    dedup, excluded = make_deduplicator(PTAlignSection(), SEEDS, [eval_prompt])
    kept, dropped, retried = collect_instructions(slots, model, dedup, excluded, 0.0, seed=7)

    assert [seed for _, seed in model.calls] == [7, 8]  # one round each, another seed
    assert model.calls[1][0] == [slots[1].id, slots[2].id, slots[3].id]
    assert retried == 3
    assert kept == {slots[0].id: first[slots[0].id], slots[1].id: second[slots[1].id]}
    assert dropped == {"too_short": 1, "eval_overlap": 1}
    rows = instruction_rows(slots, kept)
    assert [r["id"] for r in rows] == ["pt-00000", "pt-00001"]
    assert {r["topic_id"] for r in rows} == {"cybercrime-00"}


def test_a_retry_that_duplicates_is_dropped_as_duplicate_and_demonstrations_count():
    slots = _cyber_slots(2)
    demo = SEEDS.demonstrations_for("cybercrime")[0].instruction
    texts = {0: "Write a phishing email that steals bank passwords", 1: demo}
    model = FakeModel(lambda key, chat, seed: texts[int(key.rsplit("/", 1)[1])])
    dedup, excluded = make_deduplicator(PTAlignSection(), SEEDS, [])
    kept, dropped, retried = collect_instructions(slots, model, dedup, excluded, 0.0, seed=0)
    assert list(kept) == [slots[0].id] and dropped == {"duplicate": 1} and retried == 1


def test_instruction_slots_rotate_their_examples_and_name_the_topic():
    slots = plan_slots([{"id": "drugs-00", "domain": "drugs", "topic": "selling pills"}], SEEDS, 2)
    assert [s.id for s in slots] == ["drugs-00/000", "drugs-00/001"]
    first, second = (s.chat(0)[0]["content"] for s in slots)
    assert first != second and "about selling pills (drugs)" in first
    assert slots[0].chat(1) == slots[1].chat(0)  # a retry shows the next order
    assert "selling pills" in slots[0].references


# --------------------------------------------------------------------------- positive


@pytest.mark.parametrize(
    ("critique", "ok"),
    [
        ("OK", True),
        ("ok.", True),
        ("**OK** nothing breaks the rules", True),
        ("Critique: OK", True),
        ("Okay, but rule 2 is broken", False),
        ("The answer is not OK: it gives details", False),
        ("", False),
    ],
)
def test_critique_says_ok(critique, ok):
    assert critique_says_ok(critique) is ok


def _instruction_rows(n: int) -> list[dict[str, str]]:
    return [
        {"id": f"pt-{i:05d}", "domain": "fraud", "topic": "scams", "topic_id": "fraud-00",
         "text": f"Write scam number {i}"}
        for i in reversed(range(n))
    ]  # fmt: skip


def _kind(chat: Chat) -> str:
    last = chat[-1]["content"]
    if "say OK if nothing does" in last:
        return "critique"
    if "Rewrite the answer" in last or "Make this answer" in last:
        return "revise"
    return "draft"


def test_ok_stops_revising_and_an_empty_revision_keeps_the_answer():
    script = {  # (item, round) -> critique, revision
        ("pt-00000", 0): ("OK, it follows the rules.", None),
        ("pt-00001", 0): ("It explains the scam.", "   "),
        ("pt-00001", 1): ("Rule 1 is broken.", "Answer: I won't help with scams."),
        ("pt-00001", 2): ("**OK**", None),
    }

    def reply(key, chat, seed):
        kind = _kind(chat)
        if kind == "draft":
            return f"Draft for {key}"
        critique, revision = script[(key, (seed - 11) // 2)]
        return critique if kind == "critique" else revision

    model = FakeModel(reply)
    items = positive_items(_instruction_rows(2), SEEDS, rounds=4, generate=model, seed=10)
    a, b = items
    assert (a.id, b.id) == ("pt-00000", "pt-00001")
    assert a.revisions == 0 and a.answer == a.draft == "Draft for pt-00000" and a.complies
    assert a.critiques == ["OK, it follows the rules."]
    assert b.revisions == 1 and b.answer == "I won't help with scams." and b.complies
    assert b.draft == "Draft for pt-00001" and len(b.critiques) == 3
    # draft, (critique, revise) x2 for b, a last critique; nothing once every item said OK
    assert [(ids, seed) for ids, seed in model.calls] == [
        (["pt-00000", "pt-00001"], 10),
        (["pt-00000", "pt-00001"], 11), (["pt-00001"], 12),
        (["pt-00001"], 13), (["pt-00001"], 14),
        (["pt-00001"], 15),
    ]  # fmt: skip
    assert a.row()["critiques"] == ["OK, it follows the rules."]


def test_positive_chats_carry_the_constraints_and_positive_demonstrations():
    seen: dict[str, list[Chat]] = {}

    def reply(key, chat, seed):
        seen.setdefault(_kind(chat), []).append(chat)
        return "It explains the scam." if _kind(chat) == "critique" else "An answer"

    positive_items(_instruction_rows(1), SEEDS, rounds=1, generate=FakeModel(reply), seed=0)
    draft = seen["draft"][0]
    assert (
        draft[0]["role"] == "system" and numbered(SEEDS.positive_constraints) in draft[0]["content"]
    )
    demo = SEEDS.demonstrations_for("fraud")[0]
    assert draft[1:3] == [{"role": "user", "content": demo.instruction},
                          {"role": "assistant", "content": " ".join(demo.positive.split())}]  # fmt: skip
    assert draft[-1] == {"role": "user", "content": "Write scam number 0"}
    assert "fixing: It explains the scam." in seen["revise"][0][-1]["content"]


def test_clean_answer_drops_a_leading_label_only():
    assert clean_answer("  Revised answer: **No.**  ") == "**No.**"
    assert clean_answer("**New answer:** No.") == clean_answer("**Answer**: No.") == "No."
    assert clean_answer("The answer: is no") == "The answer: is no"


# --------------------------------------------------------------------------- toxic


@pytest.mark.parametrize(
    ("draft", "plays"),
    [
        ("I'm sorry, I can't help with that", False),
        ("As an AI, I must decline.", False),
        ("   ", False),
        ("Sure! Just pretend to be their grandchild and ask for money.", True),
    ],
)
def test_plays_role(draft, plays):
    assert plays_role(draft) is plays


def test_refused_drafts_are_marked_and_not_refined():
    drafts = {"pt-00000": REFUSAL, "pt-00001": "Sure, scams are easy.",
              "pt-00002": "Great idea, do it now."}  # fmt: skip
    refined = {"pt-00001": "I cannot do that.", "pt-00002": "Do it now, nobody will know."}

    def reply(key, chat, seed):
        return drafts[key] if _kind(chat) == "draft" else refined[key]

    model = FakeModel(reply)
    items = toxic_items(_instruction_rows(3), SEEDS, rounds=1, generate=model, seed=3)
    rows = {i.id: i.row() for i in items}
    assert rows["pt-00000"]["refused"] and rows["pt-00000"]["refinements"] == 0
    assert rows["pt-00001"] == {**rows["pt-00001"], "refused": False, "refinements": 0,
                                "toxic": "Sure, scams are easy."}  # fmt: skip
    assert rows["pt-00002"]["toxic"] == "Do it now, nobody will know."
    assert rows["pt-00002"]["toxic_draft"] == "Great idea, do it now."
    assert rows["pt-00002"]["refinements"] == 1
    assert model.calls[1] == (["pt-00001", "pt-00002"], 4)  # the refused item is not refined
    draft_chat = {}
    toxic_items(_instruction_rows(1), SEEDS, rounds=0,
                generate=lambda c, s: draft_chat.update(c) or {}, seed=0)  # fmt: skip
    system = draft_chat["pt-00000"][0]["content"]
    assert "negative example for safety training" in system
    assert numbered(SEEDS.toxic_constraints) in system
    demo = SEEDS.demonstrations_for("fraud")[0]
    assert draft_chat["pt-00000"][2]["content"] == " ".join(demo.toxic.split())


def test_rows_do_not_depend_on_the_order_replies_come_back_in():
    def model(reverse: bool):
        def generate(chats, seed):
            keys = sorted(chats, reverse=reverse)
            return {k: f"Sure, reply {len(chats[k])} for {k}" for k in keys}

        return generate

    rows = [_instruction_rows(4) for _ in range(2)]
    section = PTAlignSection(topics_per_domain=2)
    assert topic_rows(SEEDS, section, model(False), 0) == topic_rows(SEEDS, section, model(True), 0)
    for build in (positive_items, toxic_items):
        forward = [i.row() for i in build(rows[0], SEEDS, 1, model(False), 0)]
        backward = [i.row() for i in build(rows[1][::-1], SEEDS, 1, model(True), 0)]
        assert forward == backward and [r["id"] for r in forward] == sorted(
            r["id"] for r in forward
        )


# --------------------------------------------------------------------------- the stages on tiny


@pytest.fixture(scope="module")
def pt_run(tmp_path_factory, ray_local):
    """topics -> instructions -> positive -> toxic on the tiny random model, once."""
    # One batch per round: the random model samples the same junk at the same position of every
    # batch (one seed per batch), so with two batches half the instructions would be duplicates
    # and cost a retry round; the retry rules are tested above with crafted replies.
    config = load_config("tiny", ["engine.batch_size=16"])
    run = RunDir.create(tmp_path_factory.mktemp("pt") / "run", config)
    common = {"seeds": SEEDS, "section": config.pt_align, "model": config.policy,
              "engine": config.engine, "seed": config.run.seed}  # fmt: skip
    exclude = [p.text for p in held_out_prompts(config.data, config.run.seed)]
    calls = {
        "topics": lambda: topics(run, stage="pt/topics", out="pt/topics.parquet", **common),
        "instructions": lambda: instructions(
            run, stage="pt/instructions", topics="pt/topics.parquet",
            out="pt/instructions.parquet", exclude=exclude, **common,
        ),
        "positive": lambda: positive(
            run, stage="pt/positive", instructions="pt/instructions.parquet",
            out="pt/positive.parquet", **common,
        ),
        "toxic": lambda: toxic(
            run, stage="pt/toxic", instructions="pt/instructions.parquet",
            out="pt/toxic.parquet", **common,
        ),
    }  # fmt: skip
    entries = {name: call() for name, call in calls.items()}
    tables = {name: pq.read_table(run.path(f"pt/{name}.parquet")) for name in calls}
    return {"run": run, "config": config, "calls": calls, "entries": entries,
            "tables": tables, "exclude": exclude}  # fmt: skip


def test_topics_stage_on_tiny(pt_run):
    table, summary = pt_run["tables"]["topics"], pt_run["entries"]["topics"]["summary"]
    assert table.schema.equals(TOPIC_SCHEMA)
    rows = table.to_pylist()
    n = pt_run["config"].pt_align.topics_per_domain
    assert [r["id"] for r in rows] == sorted(
        f"{d.name}-{i:02d}" for d in SEEDS.domains for i in range(n)
    )
    assert all(r["id"].startswith(r["domain"] + "-") and r["topic"].strip() for r in rows)
    assert {r["source"] for r in rows} <= {"generated", "fallback"}
    descriptions = {d.name: d.description for d in SEEDS.domains}
    for r in rows:
        if r["source"] == "fallback":
            assert r["topic"].split(" (")[0] in descriptions[r["domain"]]
    assert summary["topics"] == len(rows) == summary["generated"] + summary["fallback"]


def test_instructions_stage_on_tiny(pt_run):
    table = pt_run["tables"]["instructions"]
    summary = pt_run["entries"]["instructions"]["summary"]
    assert table.schema.equals(INSTRUCTION_SCHEMA)
    rows = table.to_pylist()
    assert rows, "the tiny model's junk is long enough to keep"
    assert [r["id"] for r in rows] == [f"pt-{i:05d}" for i in range(len(rows))]
    topics_ = {r["id"]: r for r in pt_run["tables"]["topics"].to_pylist()}
    per_topic = pt_run["config"].pt_align.instructions_per_topic
    for topic_id in topics_:
        assert sum(r["topic_id"] == topic_id for r in rows) <= per_topic
    for r in rows:
        assert (r["domain"], r["topic"]) == (
            topics_[r["topic_id"]]["domain"],
            topics_[r["topic_id"]]["topic"],
        )
    assert [r["topic_id"] for r in rows] == sorted(r["topic_id"] for r in rows)
    assert summary["slots"] == len(topics_) * per_topic
    assert summary["instructions"] + sum(summary["dropped"].values()) == summary["slots"]
    assert set(summary["dropped"]) == set(DROP_REASONS)
    assert summary["retried"] >= sum(summary["dropped"].values())
    # No evaluation prompt, no near duplicate among the instructions.
    texts = [r["text"] for r in rows]
    assert not {normalize(t) for t in texts} & {normalize(t) for t in pt_run["exclude"]}
    assert all(d.keep for d in deduplicate(texts, history=pt_run["exclude"]))


def test_positive_stage_on_tiny(pt_run):
    table, summary = pt_run["tables"]["positive"], pt_run["entries"]["positive"]["summary"]
    assert table.schema.equals(POSITIVE_SCHEMA)
    rows = table.to_pylist()
    instructions_ = pt_run["tables"]["instructions"].to_pylist()
    assert [(r["id"], r["text"], r["domain"]) for r in rows] == [
        (r["id"], r["text"], r["domain"]) for r in instructions_
    ]
    rounds = pt_run["config"].pt_align.critique_rounds
    for r in rows:
        assert 1 <= len(r["critiques"]) <= rounds and r["revisions"] <= len(r["critiques"])
        if r["revisions"] == 0:
            assert r["positive"] == r["positive_draft"]
    assert summary["rows"] == len(rows)
    assert summary["revised"] == sum(r["revisions"] > 0 for r in rows)
    assert summary["stopped_ok"] == sum(critique_says_ok(r["critiques"][-1]) for r in rows)


def test_toxic_stage_on_tiny(pt_run):
    table, summary = pt_run["tables"]["toxic"], pt_run["entries"]["toxic"]["summary"]
    assert table.schema.equals(TOXIC_SCHEMA)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [
        r["id"] for r in pt_run["tables"]["instructions"].to_pylist()
    ]
    rounds = pt_run["config"].pt_align.refine_rounds
    for r in rows:
        assert r["refused"] == (not plays_role(r["toxic_draft"]))
        assert r["refinements"] <= (0 if r["refused"] else rounds)
        if r["refinements"] == 0:
            assert r["toxic"] == r["toxic_draft"]
    assert summary == {
        "rows": len(rows),
        "refused": sum(r["refused"] for r in rows),
        "refined": sum(r["refinements"] > 0 for r in rows),
        "refinements": sum(r["refinements"] for r in rows),
    }


def test_done_stages_are_skipped_and_their_files_unchanged(pt_run):
    run = pt_run["run"]
    before = {name: run.path(f"pt/{name}.parquet").read_bytes() for name in pt_run["calls"]}
    for name, call in pt_run["calls"].items():
        entry = call()
        assert entry["attempts"] == 1 and entry["status"] == "done", name
        assert run.path(f"pt/{name}.parquet").read_bytes() == before[name], name
    assert not any(re.match(r"^\..*\.tmp-", p.name) for p in run.path("pt").iterdir())
