"""Tokenising pairs and triples: masks on exactly the response, harmful marks on exactly the spans."""

import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from selfmoa_ray.config import TrainSection
from selfmoa_ray.sources.models import load_tokenizer, resolve_model
from selfmoa_ray.training.data import (
    MalformedPairError,
    collate,
    encode_pairs,
    encode_response,
    encode_triples,
    in_training_order,
    mixed_order,
    spans_of,
    tokenize,
)
from selfmoa_ray.training.losses import sequence_logps
from selfmoa_ray.training.objective import check_columns


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model("tiny-random"))


PROMPT = [{"role": "user", "content": "How do I pick a lock?"}]


def test_response_mask_covers_response_and_end_of_turn_only(tok):
    enc = encode_response(tok, PROMPT, "I can't help with that.", max_length=128)
    prompt_ids = tok.apply_chat_template(
        PROMPT, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    response_ids = tok("I can't help with that.", add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids == list(prompt_ids) + response_ids + [end]
    assert enc.response_mask == [False] * len(prompt_ids) + [True] * (len(response_ids) + 1)
    assert not any(enc.harmful_mask)


def test_harmful_spans_mark_exactly_the_overlapping_tokens(tok):
    text = "Sure. First get a tension wrench, then rake the pins. Stay safe."
    start = text.index("tension wrench")
    span = (start, start + len("tension wrench"))
    enc = encode_response(tok, PROMPT, text, max_length=128, harmful_spans=[span])
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    n_prompt = enc.response_mask.index(True)
    marked = [i - n_prompt for i, m in enumerate(enc.harmful_mask) if m]
    expected = [i for i, (a, b) in enumerate(offsets) if a < span[1] and b > span[0]]
    assert marked == expected and marked  # non-empty, and exactly the overlapping tokens
    marked_text = tok.decode([enc.input_ids[n_prompt + i] for i in marked])
    assert marked_text.strip() == "tension wrench"
    special = set(tok.all_special_ids)
    assert not any(m and t in special for t, m in zip(enc.input_ids, enc.harmful_mask, strict=True))


def test_special_tokens_in_a_span_are_never_marked(tok):
    text = "bad<|im_end|>worse"
    enc = encode_response(tok, PROMPT, text, max_length=128, harmful_spans=[(0, len(text))])
    marked = [t for t, m in zip(enc.input_ids, enc.harmful_mask, strict=True) if m]
    assert marked and not set(marked) & set(tok.all_special_ids)


def test_truncation_keeps_the_prompt_tail_and_drops_the_end_token(tok):
    long_prompt = "word " * 200
    enc = encode_response(tok, long_prompt, "answer " * 200, max_length=64)
    assert len(enc.input_ids) == 64
    assert sum(not m for m in enc.response_mask) == 32  # prompt kept to max_length // 2
    assert enc.input_ids[-1] != tok.convert_tokens_to_ids("<|im_end|>")


def test_collate_left_pads_prompts_and_right_pads_responses(tok):
    rows = [
        {"prompt": PROMPT, "chosen": "No.", "rejected": "No, and here is a longer answer."},
        {"prompt": "Hi", "chosen": "Hello there, friend.", "rejected": "Go."},
    ]
    tokens = tokenize(tok, rows, kind="pairs", max_length=64)
    batch = collate(tokens, pad_token_id=tok.pad_token_id)
    sequences = tokens["chosen_input_ids"] + tokens["rejected_input_ids"]
    starts = tokens["chosen_prompt_len"] + tokens["rejected_prompt_len"]
    width = max(starts)  # every response starts at this column
    responses = [ids[n:] for ids, n in zip(sequences, starts, strict=True)]
    assert batch["input_ids"].shape == (4, width + max(map(len, responses)))
    assert batch["logits_to_keep"] == max(map(len, responses)) + 1
    for i, (ids, n, response) in enumerate(zip(sequences, starts, responses, strict=True)):
        row = batch["input_ids"][i]
        assert row[width - n : width + len(response)].tolist() == ids
        assert batch["attention_mask"][i].sum() == len(ids)
        # positions count real tokens only, from 0 at the first prompt token
        assert batch["position_ids"][i, width - n] == 0
        assert batch["position_ids"][i, width + len(response) - 1] == len(ids) - 1
        # labels are the response tokens, -100 after them; the mask says which count
        assert batch["labels"][i, : len(response)].tolist() == response
        assert (batch["labels"][i, len(response) :] == -100).all()
        assert batch["response_mask"][i].sum() == len(response)


def test_the_new_layout_scores_like_one_unpadded_sequence(tok):
    """Log-probs from a padded batch equal those of each sequence run alone, no padding."""
    from selfmoa_ray.sources.models import load_model
    from selfmoa_ray.training.objective import response_token_logps

    model = load_model(resolve_model("tiny-random"))
    rows = [
        {"prompt": "word " * 20, "chosen": "short", "rejected": "a much longer answer " * 3},
        {"prompt": "q", "chosen": "mid length answer here", "rejected": "x"},
    ]
    batch = encode_pairs(tok, rows, max_length=128)
    with torch.no_grad():
        batched = sequence_logps(response_token_logps(model, batch), batch["response_mask"])
        tokens = tokenize(tok, rows, kind="pairs", max_length=128)
        alone = []
        for ids, n in zip(tokens["chosen_input_ids"] + tokens["rejected_input_ids"],
                          tokens["chosen_prompt_len"] + tokens["rejected_prompt_len"],
                          strict=True):  # fmt: skip
            logits = model(input_ids=torch.tensor([ids])).logits[0, n - 1 : -1]
            alone.append(logits.log_softmax(-1).gather(-1, torch.tensor(ids[n:])[:, None]).sum())
    assert torch.allclose(batched, torch.stack(alone), atol=1e-4)


def test_pairs_and_triples_batch_both_sides(tok):
    pairs = encode_pairs(
        tok, [{"prompt": "hi", "chosen": "hello", "rejected": [{"role": "assistant", "content": "go"}]}],
        max_length=64,
    )  # fmt: skip
    assert pairs["input_ids"].shape[0] == 2
    triples = encode_triples(
        tok, [{"prompt": "q", "positive": "safe", "toxic": "harm", "harmful_spans": [[0, 4]]}],
        max_length=64,
    )  # fmt: skip
    assert triples["harmful_mask"][0].sum() == 0 and triples["harmful_mask"][1].sum() > 0


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt is empty"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt must be"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "role and content"),
        ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen must be"),
        ({"prompt": "q", "chosen": "a", "rejected": None}, "rejected must be"),
    ],
)
def test_malformed_pairs_are_rejected_clearly(tok, row, message):
    with pytest.raises(MalformedPairError, match=message):
        encode_pairs(tok, [row], max_length=64)


def test_bad_spans_and_missing_columns():
    with pytest.raises(MalformedPairError, match="start < end"):
        spans_of([[5, 2]])
    with pytest.raises(MalformedPairError, match=r"\[start, end\] integers"):
        spans_of([[1.5, 2]])
    assert spans_of(None) == [] and spans_of([[0, 3]]) == [(0, 3)]
    with pytest.raises(MalformedPairError, match="safety_delta"):
        check_columns(
            TrainSection(loss="modpo"),
            ["prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps"],
        )
    with pytest.raises(MalformedPairError, match="reference pass"):
        check_columns(TrainSection(loss="dpo"), ["prompt", "chosen", "rejected"])
    check_columns(TrainSection(loss="pt_align"), ["prompt", "positive", "toxic", "harmful_spans"])


def test_selfmoa_train_rejects_bad_pairs_files_before_starting_ray(tmp_path, capsys):
    from selfmoa_ray.cli import main

    missing = tmp_path / "missing_column.jsonl"
    missing.write_text('{"prompt": "q", "chosen": "a"}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "q", "chosen": \n')
    wrong = tmp_path / "pairs.txt"
    wrong.write_text("prompt,chosen,rejected\n")
    cases = [
        (missing, "needs columns \\['rejected'"),
        (broken, "cannot read as jsonl"),
        (wrong, "use .parquet or .jsonl"),
        (tmp_path / "absent.jsonl", "does not exist"),
    ]
    for path, message in cases:
        out = tmp_path / f"run-{path.stem}"
        code = main(["train", "--config", "tiny", "--pairs", str(path), "--output-dir", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and re.search(message, err), err
        assert not out.exists()  # rejected before a run folder (or Ray) was made


def test_mixed_order_spreads_benign_pairs_over_the_epoch():
    """The demo's pairs file holds 35 attack pairs, then 12 benign ones: in file order the trainer
    met its first benign pair after 35 rows; mixed, every stretch of 5 rows holds one."""
    splits = ["redteam"] * 35 + ["benign"] * 12
    order = mixed_order(splits, seed=0)
    assert sorted(order.tolist()) == list(range(47))
    benign_at = np.flatnonzero(np.asarray(splits, dtype=object)[order] == "benign")
    gaps = np.diff(np.concatenate([[-1], benign_at, [47]]))
    assert gaps.max() <= 5, benign_at
    assert (mixed_order(splits, seed=0) == order).all()
    assert (mixed_order(splits, seed=1) != order).any()


def test_training_order_follows_the_config():
    table = pa.table({"id": [f"p{i}" for i in range(8)], "split": ["redteam"] * 6 + ["benign"] * 2})
    assert in_training_order(table, "file", seed=0).equals(table)
    mixed = in_training_order(table, "mixed", seed=0)
    assert sorted(mixed["id"].to_pylist()) == table["id"].to_pylist()
    assert "benign" in mixed["split"].to_pylist()[:4]
    no_split = in_training_order(table.drop(["split"]), "mixed", seed=0)
    assert sorted(no_split["id"].to_pylist()) == table["id"].to_pylist()
    assert no_split["id"].to_pylist() != table["id"].to_pylist()
