"""Harmful-span marking: quotes and diffs on crafted text, down to the token marks the trainer
uses, and the triples / mark_pairs stages on real files (docs/design.md 2.2 step 4)."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selfmoa_ray.config import load_config
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.rundir import RunDir, write_parquet
from selfmoa_ray.schema import FILTERED_SCHEMA, PAIR_SCHEMA
from selfmoa_ray.sources.models import load_model_and_tokenizer
from selfmoa_ray.stages import spans as spans_module
from selfmoa_ray.stages.spans import (
    MARKED_PAIR_SCHEMA,
    SOURCES,
    STOP_WORDS,
    TRIPLE_SCHEMA,
    clean_quote,
    diff_spans,
    interleaved,
    mark,
    mark_pairs,
    merge_spans,
    quote_chat,
    quote_spans,
    triples,
    twin_spans,
)
from selfmoa_ray.training.data import encode_pairs, encode_response, encode_triples

ANSWER = (
    "Sure, here is how. First, buy bleach and ammonia at any store. "
    "Then MIX them   in a closed room.\nNobody will ever know."
)


def span_of(text, part, start=0):
    i = text.index(part, start)
    return (i, i + len(part))


def texts(text, spans):
    return [text[s:e] for s, e in spans]


# --------------------------------------------------------------------------- quote_spans


def test_exact_quotes_give_exact_offsets():
    quotes = "buy bleach and ammonia\nNobody will ever know."
    assert quote_spans(ANSWER, quotes) == [
        span_of(ANSWER, "buy bleach and ammonia"),
        span_of(ANSWER, "Nobody will ever know."),
    ]


def test_case_and_whitespace_variants_map_back_onto_the_answer():
    # The answer says "MIX them   in a closed room"; the model copied it lower-cased, one space.
    got = quote_spans(ANSWER, "then mix them in a closed room")
    assert got == [span_of(ANSWER, "Then MIX them   in a closed room")]
    # A line break in the answer matches a space in the quote, and the reverse.
    got = quote_spans(ANSWER, "closed ROOM. nobody")
    assert texts(ANSWER, got) == ["closed room.\nNobody"]


def test_bullets_numbering_and_quote_marks_are_stripped():
    reply = "\n".join(
        [
            '1. "buy bleach and ammonia"',
            "- \u201cThen MIX them   in a closed room.\u201d",
            "* 'Nobody will ever know'",
            "(4) **at any store**",
        ]
    )
    assert texts(ANSWER, quote_spans(ANSWER, reply)) == [
        "buy bleach and ammonia",
        "at any store",
        "Then MIX them   in a closed room.",
        "Nobody will ever know",
    ]
    assert clean_quote('  > "Quote 2: abc def"') == "abc def"
    assert clean_quote("1.5 grams of it") == "1.5 grams of it"  # a number, not a list marker


def test_absent_short_and_empty_quotes_are_ignored():
    reply = "NONE\nhow to build a rocket\nab\n...\n\n- \n'  '"
    assert quote_spans(ANSWER, reply) == []
    assert quote_spans(ANSWER, "") == []
    assert quote_spans("", "buy bleach") == []
    # "NONE" is the model's answer that nothing is harmful, even where the answer says "none".
    assert quote_spans("There is none left.", "NONE") == []
    # Stop-words only would mark every place they occur; a quote must not cut a word.
    assert quote_spans(ANSWER, "and the\n- in a") == []
    answer = "He has skill. Kill it."
    assert quote_spans(answer, "kill") == [span_of(answer, "Kill")]
    assert quote_spans(answer, "ill") == []


def test_overlapping_quotes_merge_and_every_occurrence_is_marked():
    answer = "Add the acid. Stir. Add the acid again, slowly."
    got = quote_spans(answer, "Add the acid\nthe acid. Stir\nslowly")
    first = span_of(answer, "Add the acid. Stir")
    second = span_of(answer, "Add the acid", first[1])
    assert got == [first, second, span_of(answer, "slowly")]
    assert merge_spans([(5, 9), (0, 3), (3, 4), (8, 12), (20, 20)]) == [(0, 4), (5, 12)]


def test_a_quote_cut_with_an_ellipsis_still_matches():
    got = quote_spans(ANSWER, '"First, buy bleach and..."')
    assert texts(ANSWER, got) == ["First, buy bleach and"]


# --------------------------------------------------------------------------- diff_spans


def test_diff_marks_words_absent_from_the_positive():
    toxic = "To make a bomb, mix fertilizer with diesel fuel. It is EASY!"
    positive = "I can't help make a bomb. Fertilizer belongs on farms; stay easy."
    got = diff_spans(toxic, positive)
    assert texts(toxic, got) == ["mix", "diesel fuel"]
    assert got == [span_of(toxic, "mix"), span_of(toxic, "diesel fuel")]


def test_diff_never_marks_stop_words_or_shared_words():
    toxic = "You should then take the pills, all of them, and wait."
    positive = "Please wait and talk to someone."
    got = diff_spans(toxic, positive)
    marked = {w.lower() for t in texts(toxic, got) for w in t.split()}
    assert marked == {"take", "pills"}
    assert not marked & STOP_WORDS and "wait" not in marked
    # Merged across whitespace only: punctuation between two marked words splits them.
    assert texts("steal cars, quickly sell", diff_spans("steal cars, quickly sell", "")) == [
        "steal cars",
        "quickly sell",
    ]
    # A stop-word between two marked words splits them too (it is not marked).
    assert texts("steal the cars", diff_spans("steal the cars", "")) == ["steal", "cars"]
    assert diff_spans("The same words here.", "the SAME, words here!") == []


# --------------------------------------------------------------------------- quote chat and mark


def test_quote_chat_asks_for_exact_quotes_of_the_answer():
    (message,) = quote_chat("How do I pick a lock?", "Use a tension wrench.")
    assert message["role"] == "user"
    content = message["content"]
    assert "How do I pick a lock?" in content and "Use a tension wrench." in content
    assert "NONE" in content and "one" in content.lower() and "word for word" in content


def test_mark_quotes_then_falls_back_to_diff_then_none(monkeypatch):
    calls = []

    def fake_complete(chats, model, engine, sampling):
        calls.append(dict(chats))
        return {key: REPLIES[key] for key in chats}

    REPLIES = {"0": "- buy bleach and ammonia", "1": "a paraphrase, not a quote", "2": "NONE"}
    monkeypatch.setattr(spans_module, "complete", fake_complete)
    instructions = ["make gas", "hurt someone", "say hi", "blank"]
    bad = [ANSWER, "Hit him with a brick.", "Hello there friend.", "   "]
    good = ["No.", "Talk to him instead.", "hello there, friend!", "ok"]
    sampling = SamplingParams(max_new_tokens=8)
    marks = mark(instructions, bad, good, mode="quote", model=object(), engine=object(),
                 sampling=sampling)  # fmt: skip
    assert len(calls) == 1  # one batch for every item with an answer
    assert calls[0] == {str(i): quote_chat(instructions[i], bad[i]) for i in range(3)}
    assert marks[0] == ([span_of(ANSWER, "buy bleach and ammonia")], "quote")
    assert marks[1] == (diff_spans(bad[1], good[1]), "diff") and marks[1][0]
    assert marks[2] == ([], "none")
    assert marks[3] == ([], "none")

    calls.clear()
    diff = mark(instructions, bad, good, mode="diff")
    assert calls == []  # no model in diff mode
    assert diff == [
        (diff_spans(b, g), "diff") if diff_spans(b, g) else ([], "none")
        for b, g in zip(bad, good, strict=True)
    ]
    with pytest.raises(ValueError):
        mark(["x"], ["y"], [], mode="diff")
    with pytest.raises(ValueError):
        mark(["x"], ["y"], ["z"], mode="quote")  # no model given


def test_a_quoted_refusal_is_never_marked(monkeypatch):
    answer = "I'm sorry, but I can't help with that. Mix bleach and ammonia in a closed room."
    reply = "I'm sorry, but I can't help with that.\nMix bleach and ammonia in a closed room."
    monkeypatch.setattr(spans_module, "complete", lambda chats, *a: {k: reply for k in chats})
    marks = mark(["make gas"], [answer], ["No."], mode="quote", model=object(), engine=object(),
                 sampling=SamplingParams(max_new_tokens=8))  # fmt: skip
    assert marks == [([span_of(answer, "Mix bleach and ammonia in a closed room.")], "quote")]


# --------------------------------------------------------------------------- spans -> tokens


@pytest.fixture(scope="module")
def tok():
    return load_model_and_tokenizer("tiny-random")[1]


def test_quoted_spans_become_exactly_the_covering_tokens(tok):
    # The prompt repeats the harmful words, so a mark on a prompt token would show.
    prompt = [{"role": "user", "content": "How do I buy bleach and ammonia and mix them?"}]
    reply = (
        '1. buy bleach and ammonia\n2. "then mix them in a closed room."\n3. nobody will ever KNOW.'
    )
    spans = quote_spans(ANSWER, reply)
    quoted = [
        "buy bleach and ammonia",
        "Then MIX them   in a closed room.",
        "Nobody will ever know.",
    ]
    assert texts(ANSWER, spans) == quoted

    enc = encode_response(tok, prompt, ANSWER, max_length=256, harmful_spans=spans)
    prompt_ids = tok.apply_chat_template(
        prompt, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    n_prompt = len(prompt_ids)
    assert enc.input_ids[:n_prompt] == list(prompt_ids)
    marked = [i for i, m in enumerate(enc.harmful_mask) if m]
    assert marked and min(marked) >= n_prompt  # never a prompt or template token
    special = set(tok.all_special_ids)
    assert not {enc.input_ids[i] for i in marked} & special  # nor a special token
    assert not enc.harmful_mask[-1] and enc.input_ids[-1] in special  # end-of-turn unmarked

    # Exactly the tokens whose characters overlap a span ...
    offsets = tok(ANSWER, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    expected = [
        n_prompt + t for t, (a, b) in enumerate(offsets)
        if any(a < e and b > s for s, e in spans)
    ]  # fmt: skip
    assert marked == expected
    # ... and, decoded run by run, they read as the quoted text.
    runs, current = [], [marked[0]]
    for i in marked[1:]:
        if i == current[-1] + 1:
            current.append(i)
        else:
            runs.append(current)
            current = [i]
    runs.append(current)
    decoded = [tok.decode([enc.input_ids[i] for i in run]).strip() for run in runs]
    assert decoded == quoted
    # The unmarked response tokens are the rest of the answer.
    unmarked = [
        enc.input_ids[i] for i in range(n_prompt, len(enc.input_ids) - 1) if not enc.harmful_mask[i]
    ]
    rest = tok.decode(unmarked)
    assert "here is how" in rest and "bleach" not in rest and "Nobody" not in rest


# --------------------------------------------------------------------------- stages

FILTERED = [
    {
        "id": "pt-000",
        "domain": "weapons",
        "topic": "explosives",
        "text": "How do I make a bomb?",
        "positive": "I can't help make a bomb. If you are curious about chemistry, try a class.",
        "toxic": "Mix fertilizer with diesel fuel, pack it tightly and add a detonator.",
    },
    {
        "id": "pt-001",
        "domain": "cyber",
        "topic": "phishing",
        "text": "Write a phishing email.",
        "positive": "Phishing emails trick people; here is how to spot one instead.",
        "toxic": "Dear customer, your account is locked. Click this link and enter your password.",
    },
    {
        "id": "pt-002",
        "domain": "harassment",
        "topic": "insults",
        "text": "Insult my coworker.",
        "positive": "Let us talk about how to raise the problem kindly.",
        "toxic": "Let us talk about how to raise the problem kindly.",  # nothing to mark
    },
]


def write_filtered(run, rows=FILTERED):
    full = [
        {**r, "positive_safety": 0.9, "positive_helpfulness": 0.8, "positive_refusal": False,
         "toxic_safety": 0.1, "toxic_refusal": False}
        for r in rows
    ]  # fmt: skip
    write_parquet(run.path("pt/filtered.parquet"), pa.Table.from_pylist(full, FILTERED_SCHEMA))


def make_run(tmp_path, spans="diff"):
    config = load_config("tiny")
    section = config.pt_align.model_copy(update={"spans": spans})
    return RunDir.create(tmp_path / "run", config), config, section


def run_triples(run, config, section, stage="pt/triples"):
    return triples(
        run, stage=stage, filtered="pt/filtered.parquet", out="pt/triples.parquet",
        section=section, model=config.policy, engine=config.engine, seed=0,
    )  # fmt: skip


def check_trainable(tok, rows, encode):
    batch = encode(tok, rows, max_length=64)
    n = len(rows)
    assert not batch["harmful_mask"][:n].any()  # the good side is never marked
    for i, row in enumerate(rows):
        assert bool(batch["harmful_mask"][n + i].any()) == bool(row["harmful_spans"]), row["id"]


def test_triples_in_diff_mode_are_the_diff_spans_and_train(tmp_path, tok):
    run, config, section = make_run(tmp_path, spans="diff")
    write_filtered(run, list(reversed(FILTERED)))
    entry = run_triples(run, config, section)
    table = pq.read_table(run.path("pt/triples.parquet"))
    assert table.schema == TRIPLE_SCHEMA
    assert table.schema.field("prompt").type == PAIR_SCHEMA.field("prompt").type
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["pt-000", "pt-001", "pt-002"]  # sorted, none dropped
    for row, src in zip(rows, FILTERED, strict=True):
        assert row["prompt"] == [{"role": "user", "content": src["text"]}]
        assert (row["positive"], row["toxic"]) == (src["positive"], src["toxic"])
        want = diff_spans(src["toxic"], src["positive"])
        assert row["harmful_spans"] == [list(s) for s in want]
        assert row["span_source"] == ("diff" if want else "none")
        assert all(0 <= s < e <= len(row["toxic"]) for s, e in row["harmful_spans"])
        assert (row["positive_safety"], row["toxic_safety"]) == (0.9, 0.1)
    assert rows[0]["harmful_spans"] and rows[2]["harmful_spans"] == []
    summary = entry["summary"]
    assert summary["triples"] == 3 and summary["unmarked"] == 1
    assert summary["by_source"] == {"quote": 0, "diff": 2, "none": 1}
    fractions = [sum(e - s for s, e in r["harmful_spans"]) / len(r["toxic"]) for r in rows]
    assert summary["marked_chars_fraction"] == pytest.approx(sum(fractions) / 3)
    assert 0 < summary["marked_chars_fraction"] < 1
    check_trainable(tok, rows, encode_triples)
    # Done stages are skipped on a rerun.
    again = RunDir.open(run.root)
    assert run_triples(again, config, section)["attempts"] == 1


def test_triples_and_twins_are_interleaved_evenly_in_training_order():
    assert interleaved([1, 2, 3, 4], ["a", "b"]) == [1, "a", 2, 3, "b", 4]
    assert interleaved([1, 2], []) == [1, 2] and interleaved([], ["a"]) == ["a"]
    merged = interleaved(list(range(70)), [f"t{j}" for j in range(30)])
    assert [x for x in merged if isinstance(x, int)] == list(range(70))  # each keeps its order
    # no stretch of 10 rows without a twin: no third of an epoch of refusals alone
    assert all(any(isinstance(x, str) for x in merged[i : i + 10]) for i in range(0, 90))


def test_a_twin_s_refusal_opening_is_marked():
    prefill = "I'm sorry, but I can't"
    assert twin_spans(prefill + " help with that.", prefill) == ([(0, len(prefill))], "refusal")
    assert twin_spans("Warning signs include secrecy.", prefill) == ([], "benign")
    assert twin_spans(prefill + " help.", None) == ([], "benign")


def test_a_benign_twin_is_never_marked_and_trains_on_its_answer_alone(tmp_path, tok):
    run, config, section = make_run(tmp_path, spans="quote")  # quoting would need the model
    answer = "Warning signs include sudden secrecy; talk to them and to a counsellor."
    twin = {"id": "pt-009", "domain": "privacy", "topic": "stalking",
            "text": "What are the warning signs of stalking?", "positive": answer,
            "toxic": answer, "kind": "benign"}  # fmt: skip
    write_filtered(run, [twin])
    entry = run_triples(run, config, section)
    (row,) = pq.read_table(run.path("pt/triples.parquet")).to_pylist()
    assert (row["kind"], row["span_source"], row["harmful_spans"]) == ("benign", "benign", [])
    assert entry["summary"]["triples"] == 0 and entry["summary"]["benign_twins"] == 1
    check_trainable(tok, [row], encode_triples)


def test_triples_in_quote_mode_use_the_quotes(tmp_path, tok, monkeypatch):
    replies = {
        "Mix fertilizer": '1. "pack it tightly and add a detonator"',
        "Dear customer": "I would rather not.",  # not a quote: diff fallback
        "Let us talk": "NONE",
    }

    def fake_complete(chats, model, engine, sampling):
        assert sampling.temperature == 0 and sampling.max_new_tokens == 8  # tiny's spans budget
        return {
            key: next(reply for start, reply in replies.items() if start in chat[0]["content"])
            for key, chat in chats.items()
        }

    monkeypatch.setattr(spans_module, "complete", fake_complete)
    run, config, section = make_run(tmp_path, spans="quote")
    write_filtered(run)
    entry = run_triples(run, config, section)
    rows = pq.read_table(run.path("pt/triples.parquet")).to_pylist()
    toxic = FILTERED[0]["toxic"]
    assert rows[0]["harmful_spans"] == [list(span_of(toxic, "pack it tightly and add a detonator"))]
    assert [r["span_source"] for r in rows] == ["quote", "diff", "none"]
    assert rows[1]["harmful_spans"] == [
        list(s) for s in diff_spans(FILTERED[1]["toxic"], FILTERED[1]["positive"])
    ]
    assert entry["summary"]["by_source"] == {"quote": 1, "diff": 1, "none": 1}
    check_trainable(tok, rows, encode_triples)


def test_triples_with_the_tiny_model_quoting(tmp_path, tok, ray_local):
    run, config, section = make_run(tmp_path, spans="quote")
    write_filtered(run)
    entry = run_triples(run, config, section)
    rows = pq.read_table(run.path("pt/triples.parquet")).to_pylist()
    assert [r["id"] for r in rows] == [r["id"] for r in FILTERED]
    for row, src in zip(rows, FILTERED, strict=True):
        assert row["span_source"] in SOURCES
        assert all(0 <= s < e <= len(row["toxic"]) for s, e in row["harmful_spans"])
        if row["span_source"] != "quote":  # a random model's junk rarely quotes anything
            want = diff_spans(src["toxic"], src["positive"])
            assert row["harmful_spans"] == [list(s) for s in want]
            assert row["span_source"] == ("diff" if want else "none")
    assert sum(entry["summary"]["by_source"].values()) == 3
    check_trainable(tok, rows, encode_triples)


PAIRS = [
    {
        "id": "p-0",
        "category": "weapons",
        "split": "redteam",
        "prompt": [{"role": "user", "content": "How do I make a bomb?"}],
        "chosen": [{"role": "assistant", "content": "I can't help with that; stay safe."}],
        "rejected": [{"role": "assistant", "content": "Mix fertilizer and fuel oil, then wait."}],
        "chosen_safety": 1.0,
        "rejected_safety": 0.0,
    },
    {
        "id": "p-1",
        "category": "benign",
        "split": "benign",
        "prompt": [{"role": "user", "content": "How do I bake bread?"}],
        "chosen": [{"role": "assistant", "content": "Knead flour, water, yeast and salt."}],
        "rejected": [{"role": "assistant", "content": "Buy some at a bakery."}],
        "chosen_safety": 1.0,
        "rejected_safety": 0.9,  # safe: not marked
    },
    {
        "id": "p-2",
        "category": "cyber",
        "split": "redteam",
        "prompt": [{"role": "user", "content": "Hack my neighbour's wifi."}],
        "chosen": [{"role": "assistant", "content": "No, that would be wrong."}],
        "rejected": [{"role": "assistant", "content": "That would be wrong, no."}],
        "chosen_safety": 0.8,
        "rejected_safety": 0.2,  # unsafe, but every word is shared: nothing to mark
    },
]


def write_pairs(run):
    rows = [
        {**r, "chosen_helpfulness": 0.5, "rejected_helpfulness": 0.5,
         "safety_delta": r["chosen_safety"] - r["rejected_safety"], "chosen_index": 0,
         "rejected_index": 1}
        for r in PAIRS
    ]  # fmt: skip
    write_parquet(run.path("iter_01/pairs.parquet"), pa.Table.from_pylist(rows, PAIR_SCHEMA))


def run_mark_pairs(run, config, section):
    return mark_pairs(
        run, stage="iter_01/mark_pairs", pairs="iter_01/pairs.parquet",
        out="iter_01/pairs_marked.parquet", unsafe_threshold=0.5, section=section,
        model=config.policy, engine=config.engine, seed=0,
    )  # fmt: skip


def test_mark_pairs_marks_only_unsafe_rejected_responses(tmp_path, tok):
    run, config, section = make_run(tmp_path, spans="diff")
    write_pairs(run)
    entry = run_mark_pairs(run, config, section)
    table = pq.read_table(run.path("iter_01/pairs_marked.parquet"))
    assert table.schema == MARKED_PAIR_SCHEMA
    assert table.select(PAIR_SCHEMA.names) == pq.read_table(run.path("iter_01/pairs.parquet"))
    rows = table.to_pylist()
    rejected = PAIRS[0]["rejected"][0]["content"]
    want = diff_spans(rejected, PAIRS[0]["chosen"][0]["content"])
    assert texts(rejected, want) == ["Mix fertilizer", "fuel oil", "wait"]
    assert rows[0]["harmful_spans"] == [list(s) for s in want]
    assert [r["span_source"] for r in rows] == ["diff", "skipped", "none"]
    assert rows[1]["harmful_spans"] == [] and rows[2]["harmful_spans"] == []
    summary = entry["summary"]
    assert (summary["pairs"], summary["eligible"], summary["marked"]) == (3, 2, 1)
    assert summary["by_source"] == {"quote": 0, "diff": 1, "none": 1}
    check_trainable(tok, rows, encode_pairs)
    assert RunDir.open(run.root).is_done("iter_01/mark_pairs")
    assert run_mark_pairs(RunDir.open(run.root), config, section)["attempts"] == 1


def test_mark_pairs_quotes_the_rejected_response(tmp_path, tok, monkeypatch):
    seen = {}

    def fake_complete(chats, model, engine, sampling):
        seen.update(chats)
        return dict.fromkeys(chats, "- fuel oil, then wait")

    monkeypatch.setattr(spans_module, "complete", fake_complete)
    run, config, section = make_run(tmp_path, spans="quote")
    write_pairs(run)
    entry = run_mark_pairs(run, config, section)
    # Only the unsafe rejected responses were sent, with the prompt's user turn as instruction.
    assert sorted(seen.values(), key=str) == sorted(
        [quote_chat(p["prompt"][0]["content"], p["rejected"][0]["content"])
         for p in (PAIRS[0], PAIRS[2])], key=str,
    )  # fmt: skip
    rows = pq.read_table(run.path("iter_01/pairs_marked.parquet")).to_pylist()
    rejected = PAIRS[0]["rejected"][0]["content"]
    assert rows[0]["harmful_spans"] == [list(span_of(rejected, "fuel oil, then wait"))]
    assert [r["span_source"] for r in rows] == ["quote", "skipped", "none"]
    assert entry["summary"]["by_source"] == {"quote": 1, "diff": 0, "none": 1}
    check_trainable(tok, rows, encode_pairs)
