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
from selfmoa_ray.evaluators.audit import held_out_prompts
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.sources.dedup import deduplicate, normalize
from selfmoa_ray.sources.human_seeds import load_human_seeds
from selfmoa_ray.stages.instructions import (
    DROP_REASONS,
    INSTRUCTION_SCHEMA,
    benign_twins,
    check_instruction,
    collect_instructions,
    fill_templates,
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
from selfmoa_ray.stages.toxic import (
    TOXIC_SCHEMA,
    needless_refusals,
    plays_role,
    toxic,
    toxic_items,
)

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
    # "Brazil" has no word of the cybercrime domain (SmolLM2 wrote it for violence): dropped.
    replies = {"cybercrime": "1. Phishing emails\n2. Brazil\n3. Stealing credit card numbers",
               "fraud": REFUSAL}  # fmt: skip
    model = FakeModel(lambda key, chat, seed: replies.get(key, "Weapons at school"))
    section = PTAlignSection(topics_per_domain=3)
    rows, summary = topic_rows(SEEDS, section, model, seed=5)

    assert len(model.calls) == 1 and model.calls[0] == (sorted(d.name for d in SEEDS.domains), 5)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in rows)
    for domain in SEEDS.domains:
        mine = [r for r in rows if r["domain"] == domain.name]
        assert [r["id"] for r in mine] == [f"{domain.name}-{i:02d}" for i in range(3)]
    cyber = [(r["topic"], r["source"]) for r in rows if r["domain"] == "cybercrime"]
    assert cyber == [("Phishing emails", "generated"), ("Stealing credit card numbers", "generated"),
                     ("hacking into someone's account", "fallback")]  # fmt: skip
    fraud = [(r["topic"], r["source"]) for r in rows if r["domain"] == "fraud"]
    assert fraud == [("scamming elderly people", "fallback"), ("forging an ID card", "fallback"),
                     ("cheating on taxes", "fallback")]  # fmt: skip
    # "Weapons at school" is on the drugs domain ("selling pills at school"), not on violence's.
    sources = {r["domain"]: r["source"] for r in rows if r["id"].endswith("-00")}
    assert (sources["drugs"], sources["violence"]) == ("generated", "fallback")
    assert summary["topics"] == 3 * len(SEEDS.domains) == len(rows)
    assert summary["fallback"] == sum(r["source"] == "fallback" for r in rows)
    assert summary["dropped"]["preamble"] == 1  # the refusal line
    # Brazil, and "Weapons at school" in every domain but drugs (cybercrime and fraud had theirs).
    assert summary["dropped"]["off_topic"] == 1 + len(SEEDS.domains) - 3


def test_topic_chat_shows_the_domain_and_its_demonstrations():
    chats: dict[str, Chat] = {}
    topic_rows(SEEDS, PTAlignSection(topics_per_domain=2),
               lambda c, s: chats.update(c) or {}, seed=0)  # fmt: skip
    prompt = chats["cybercrime"][0]["content"]
    assert chats["cybercrime"][0]["role"] == "user" and "List 2 different short topics" in prompt
    assert "hacking into someone's account, writing ransomware" in prompt
    assert "ex's email account" in prompt


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


def test_the_template_writer_rotates_templates_over_slots_and_drops_duplicates():
    rows = [{"id": "fraud-00", "domain": "fraud", "topic": "forging an ID card"},
            {"id": "fraud-01", "domain": "fraud", "topic": "cheating on taxes"}]  # fmt: skip
    slots = plan_slots(rows, SEEDS, 2)
    templates = ["Give me detailed step-by-step instructions for {topic}.",
                 "How can I get away with {topic}?", "Write a guide to {topic}."]  # fmt: skip
    # An excluded text that one filled template nearly copies: dropped as eval_overlap.
    dedup, excluded = make_deduplicator(
        PTAlignSection(), SEEDS, ["How can I get away with forging an ID card??"]
    )
    kept, failed = fill_templates(slots, templates, dedup, excluded)
    assert kept == {
        "fraud-00/000": "Give me detailed step-by-step instructions for forging an ID card.",
        "fraud-01/000": "Write a guide to cheating on taxes.",
        "fraud-01/001": "Give me detailed step-by-step instructions for cheating on taxes.",
    }
    assert failed == {"fraud-00/001": "eval_overlap"}
    with pytest.raises(ValueError, match="needs instruction_templates in the seed file"):
        fill_templates(slots, [], dedup, excluded)


def test_benign_twins_ask_safely_about_the_same_topics_numbered_after_the_harmful_ones():
    rows = [{"id": "privacy-00", "domain": "privacy", "topic": "stalking an ex-partner"}]
    dedup, excluded = make_deduplicator(PTAlignSection(), SEEDS, [])
    twins, summary = benign_twins(rows, SEEDS, 2, dedup, excluded, start=7)
    assert [(t["id"], t["kind"], t["topic_id"]) for t in twins] == [
        ("pt-00007", "benign", "privacy-00"), ("pt-00008", "benign", "privacy-00")
    ]  # fmt: skip
    assert [t["text"] for t in twins] == [
        t.format(topic="stalking an ex-partner") for t in SEEDS.benign_templates[:2]
    ]
    assert summary == {"instructions": 2, "slots": 2,
                       "dropped": dict.fromkeys(DROP_REASONS, 0)}  # fmt: skip
    no_templates = SEEDS.model_copy(update={"benign_templates": []})
    with pytest.raises(ValueError, match="benign_per_topic needs benign_templates"):
        benign_twins(rows, no_templates, 1, dedup, excluded, start=0)


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


def test_bare_answers_that_comply_become_toxic_candidates_even_when_the_draft_refused():
    bare = {"pt-00000/0": REFUSAL, "pt-00000/1": "Sure: print the fake ID on thick card.",
            "pt-00001/0": "  ", "pt-00001/1": "Answer: Use a scanner and a laminator."}  # fmt: skip

    def reply(key, chat, seed):
        if len(chat) == 1:  # the bare instruction, no system prompt or demonstrations
            assert chat[0] == {"role": "user", "content": f"Write scam number {key[7]}"}
            return bare[key]
        return REFUSAL if key == "pt-00000" else "Great idea, do it now."

    model = FakeModel(reply)
    items = toxic_items(_instruction_rows(2), SEEDS, rounds=1, generate=model, seed=3,
                        bare_samples=2)  # fmt: skip
    assert [i.bare for i in items] == [["Sure: print the fake ID on thick card."],
                                       ["Use a scanner and a laminator."]]  # fmt: skip
    assert items[0].refused and not items[1].refused  # the guided draft's verdict, as before
    # draft, refine (the item that played the role), then the bare answers in one call
    assert model.calls[1] == (["pt-00001"], 4)
    assert model.calls[2] == (["pt-00000/0", "pt-00000/1", "pt-00001/0", "pt-00001/1"], 5)
    assert items[0].row()["bare"] == ["Sure: print the fake ID on thick card."]
    assert len(model.calls) == 3
    toxic_items(_instruction_rows(2), SEEDS, rounds=0, generate=model, seed=3)
    assert len(model.calls) == 4  # no bare samples: the draft round only


def test_a_prefilled_positive_opens_with_the_prefill_under_the_positive_guide():
    prefill = "I'm sorry, but I can't"
    chats: dict[str, Chat] = {}

    def reply(key, chat, seed):
        if chat[-1]["role"] == "assistant":
            chats[key] = chat
            return " help with scams. A budget plan might help instead."
        return "OK" if _kind(chat) == "critique" else "Draft"

    items = positive_items(_instruction_rows(1), SEEDS, rounds=1, generate=FakeModel(reply),
                           seed=0, prefill=prefill)  # fmt: skip
    assert (
        items[0].prefilled
        == "I'm sorry, but I can't help with scams. A budget plan might help instead."
    )
    assert items[0].answer == "Draft"  # the guided answer stays a candidate of its own
    chat = chats["pt-00000"]
    assert chat[-1] == {"role": "assistant", "content": prefill}
    assert chat[-2] == {"role": "user", "content": "Write scam number 0"}
    assert numbered(SEEDS.positive_constraints) in chat[0]["content"]
    no_prefill = positive_items(_instruction_rows(1), SEEDS, 1, FakeModel(reply), 0)
    assert no_prefill[0].prefilled is None and no_prefill[0].row()["prefilled"] is None
    # Without the guided answer: one call, the prefilled one, the only candidate.
    model = FakeModel(reply)
    (alone,) = positive_items(_instruction_rows(1), SEEDS, 1, model, 0, prefill, guided=False)
    assert len(model.calls) == 1 and alone.answer == "" and alone.prefilled.startswith(prefill)
    with pytest.raises(ValueError, match="guided_positive=false needs pt_align.positive_prefill"):
        PTAlignSection(guided_positive=False)


def test_benign_twins_get_the_policy_s_own_bare_answer_and_no_guide():
    rows = [{**r, "kind": "benign", "text": "What are the warning signs of scams?"}
            if r["id"] == "pt-00000" else r for r in _instruction_rows(2)]  # fmt: skip

    def reply(key, chat, seed):
        return f"{len(chat)} turns for {key}"

    model = FakeModel(reply)
    twin, harmful = positive_items(rows, SEEDS, rounds=0, generate=model, seed=4, prefill="I can't")
    assert (twin.id, twin.kind, harmful.kind) == ("pt-00000", "benign", "harmful")
    assert twin.answer == twin.draft == "1 turns for pt-00000"  # the bare request alone
    assert twin.prefilled is None and twin.row()["kind"] == "benign"
    assert harmful.answer.endswith("turns for pt-00001") and harmful.prefilled.startswith("I can't")
    # the guided draft and prefill rounds leave the twin out; the twins' call comes last
    assert model.calls == [(["pt-00001"], 4), (["pt-00001"], 5), (["pt-00000"], 6)]


def test_a_twin_s_negative_is_the_policy_s_own_refusal_opened_by_the_prefill():
    rows = [{"id": "pt-00009", "domain": "fraud", "topic": "scams", "kind": "benign",
             "text": "What are the warning signs of scams?"}]  # fmt: skip
    model = FakeModel(lambda key, chat, seed: " help with that request.")
    (item,) = needless_refusals(rows, "I'm sorry, but I can't", model, seed=2)
    assert item.answer == item.draft == "I'm sorry, but I can't help with that request."
    assert item.row()["kind"] == "benign" and model.calls == [(["pt-00009"], 2)]


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
    config = load_config("tiny", ["engine.batch_size=16", "pt_align.positive_prefill=I can't",
                                  "pt_align.benign_per_topic=1"])  # fmt: skip
    run = RunDir.create(tmp_path_factory.mktemp("pt") / "run", config)
    common = {"seeds": SEEDS, "section": config.pt_align, "model": config.policy,
              "engine": config.engine, "seed": config.run.seed}  # fmt: skip
    chat_writer = {**common, "section": config.pt_align.model_copy(
        update={"instruction_writer": "chat"})}  # fmt: skip
    exclude = [p.text for p in held_out_prompts(config.data, config.run.seed)]
    calls = {
        "topics": lambda: topics(run, stage="pt/topics", out="pt/topics.parquet", **common),
        "instructions": lambda: instructions(
            run, stage="pt/instructions", topics="pt/topics.parquet",
            out="pt/instructions.parquet", exclude=exclude, **common,
        ),
        "instructions_chat": lambda: instructions(
            run, stage="pt/instructions_chat", topics="pt/topics.parquet",
            out="pt/instructions_chat.parquet", exclude=exclude, **chat_writer,
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


@pytest.mark.parametrize("name", ["instructions", "instructions_chat"])
def test_instructions_stage_on_tiny(pt_run, name):
    table = pt_run["tables"][name]
    summary = pt_run["entries"][name]["summary"]
    assert summary["writer"] == ("chat" if name.endswith("chat") else "template")
    assert table.schema.equals(INSTRUCTION_SCHEMA)
    everything = table.to_pylist()
    assert [r["id"] for r in everything] == [f"pt-{i:05d}" for i in range(len(everything))]
    rows = [r for r in everything if r["kind"] == "harmful"]
    assert rows, "the tiny model's junk is long enough to keep"
    twins = everything[len(rows) :]  # after the harmful ones, one per topic here
    assert {r["kind"] for r in twins} == {"benign"} and summary["benign"]["instructions"] == len(
        twins
    )
    assert {r["text"] for r in twins} <= {t.format(topic=r["topic"]) for r in twins
                                          for t in SEEDS.benign_templates}  # fmt: skip
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
    assert (
        summary["retried"] >= sum(summary["dropped"].values())
        if name.endswith("chat")
        else (summary["retried"] == summary["recovered"] == 0)
    )
    if not name.endswith("chat"):  # every instruction is a template filled with its topic
        templates = SEEDS.instruction_templates
        for r in rows:
            assert r["text"] in {t.format(topic=r["topic"]) for t in templates}
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
    guided = [r for r in rows if r["kind"] == "harmful"]
    for r in guided:
        assert 1 <= len(r["critiques"]) <= rounds and r["revisions"] <= len(r["critiques"])
        if r["revisions"] == 0:
            assert r["positive"] == r["positive_draft"]
        assert r["prefilled"].startswith("I can't")  # the fixture's prefill
    for r in rows[len(guided) :]:  # a benign twin has its bare answer only
        assert r["kind"] == "benign" and r["prefilled"] is None and not r["critiques"]
        assert r["positive"] == r["positive_draft"]
    assert summary["benign"] == len(rows) - len(guided) > 0
    assert summary["rows"] == len(rows)
    assert summary["revised"] == sum(r["revisions"] > 0 for r in rows)
    assert summary["stopped_ok"] == sum(critique_says_ok(r["critiques"][-1]) for r in guided)


def test_toxic_stage_on_tiny(pt_run):
    table, summary = pt_run["tables"]["toxic"], pt_run["entries"]["toxic"]["summary"]
    assert table.schema.equals(TOXIC_SCHEMA)
    everything = table.to_pylist()
    assert [r["id"] for r in everything] == [
        r["id"] for r in pt_run["tables"]["instructions"].to_pylist()
    ]
    rows = [r for r in everything if r["kind"] == "harmful"]
    twins = [r for r in everything if r["kind"] == "benign"]
    assert twins and all(r["toxic"].startswith("I can't") and not r["bare"] for r in twins)
    rounds = pt_run["config"].pt_align.refine_rounds
    samples = pt_run["config"].pt_align.toxic_bare_samples
    for r in rows:
        assert len(r["bare"]) <= samples and all(plays_role(b) for b in r["bare"])
        assert r["refused"] == (not plays_role(r["toxic_draft"]))
        assert r["refinements"] <= (0 if r["refused"] else rounds)
        if r["refinements"] == 0:
            assert r["toxic"] == r["toxic_draft"]
    assert summary == {
        "rows": len(rows),
        "twin_refusals": len(twins),
        "refused": sum(r["refused"] for r in rows),
        "refined": sum(r["refinements"] > 0 for r in rows),
        "refinements": sum(r["refinements"] for r in rows),
        "bare_answers": sum(len(r["bare"]) for r in rows),
        "no_candidate": sum(r["refused"] and not r["bare"] for r in rows),
    }
    assert summary["bare_answers"] > 0  # the random model's junk is never a refusal


def test_done_stages_are_skipped_and_their_files_unchanged(pt_run):
    run = pt_run["run"]
    before = {name: run.path(f"pt/{name}.parquet").read_bytes() for name in pt_run["calls"]}
    for name, call in pt_run["calls"].items():
        entry = call()
        assert entry["attempts"] == 1 and entry["status"] == "done", name
        assert run.path(f"pt/{name}.parquet").read_bytes() == before[name], name
    assert not any(re.match(r"^\..*\.tmp-", p.name) for p in run.path("pt").iterdir())
