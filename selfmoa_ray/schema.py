"""The rows that flow between stages: the names and pyarrow schemas more than one module reads.

A stage that writes a file other stages read declares its schema here, not in its own module, so
that no stage imports another for a column or a split name. Schemas only one stage reads stay
with that stage.
"""

from __future__ import annotations

import pyarrow as pa

MANIFEST = "manifest.json"  # the run folder's record of config, stages and summaries

# Splits of the red team's prompts (prompts.parquet, docs/design.md 2.1 step 1)
REDTEAM_SPLIT = "redteam"  # an attack
BENIGN_SPLIT = "benign"  # a benign-but-sensitive prompt the red team mixes in: not an attack

# Splits of the held-out evaluation (stages/evaluate.py): evaluation only, never trained on
EVAL_HARMFUL_SPLIT = "eval_harmful"
EVAL_BENIGN_SPLIT = "eval_benign"

# Kinds of PT-ALIGN items: a red-team instruction, or its benign twin (stages/instructions.py)
HARMFUL_KIND, BENIGN_KIND = "harmful", "benign"

# The packaged prompt source the red team mixes benign prompts from, and validation draws on
BENIGN_TRAIN_SOURCE = "benign_train"

GUIDED = "guided"  # column: the answer was drawn under sampling.guide or sampling.prefill

REDTEAM_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("category", pa.string()),
        ("source", pa.string()),
        ("split", pa.string()),
        ("style", pa.string()),
        ("writer", pa.string()),
        ("template", pa.string()),
        ("seed_id", pa.string()),
        ("parent_id", pa.string()),
        ("base_text", pa.string()),
        ("iteration", pa.int64()),
    ]
)

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
PAIR_SCHEMA = pa.schema(  # pairs.parquet: one chosen/rejected pair per prompt
    [
        ("id", pa.string()),
        ("category", pa.string()),
        ("split", pa.string()),
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("chosen_safety", pa.float64()),
        ("rejected_safety", pa.float64()),
        ("chosen_helpfulness", pa.float64()),
        ("rejected_helpfulness", pa.float64()),
        ("safety_delta", pa.float64()),
        ("chosen_index", pa.int64()),
        ("rejected_index", pa.int64()),
    ]
)

FILTERED_SCHEMA = pa.schema(  # PT-ALIGN's filtered.parquet: the items both answers passed
    [
        ("id", pa.string()),
        ("domain", pa.string()),
        ("topic", pa.string()),
        ("text", pa.string()),
        ("positive", pa.string()),
        ("toxic", pa.string()),
        ("positive_safety", pa.float64()),
        ("positive_helpfulness", pa.float64()),
        ("positive_refusal", pa.bool_()),
        ("toxic_safety", pa.float64()),
        ("toxic_refusal", pa.bool_()),
        ("positive_source", pa.string()),  # "guided" | "prefill" | "bare" (benign twins)
        ("toxic_source", pa.string()),  # "guided" | "bare"; a twin's "refusal" or null
        ("kind", pa.string()),  # HARMFUL_KIND | BENIGN_KIND
    ]
)
