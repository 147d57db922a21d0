"""Precision: what ``auto`` resolves to, and the reference pass computing log-probs exactly as the
trainer's forward pass does (same weights dtype, same autocast), in float32 and in bf16."""

import pyarrow as pa
import pytest
import torch

from selfmoa_ray.config import TrainSection
from selfmoa_ray.precision import (
    bf16_is_fast,
    cpu_has_native_bf16,
    describe,
    resolve_dtype,
    resolve_precision,
)
from selfmoa_ray.stages.reference import ReferenceScorer
from selfmoa_ray.training.data import encode_pairs
from selfmoa_ray.training.loop import load_policy
from selfmoa_ray.training.losses import sequence_logps
from selfmoa_ray.training.objective import response_token_logps
from selfmoa_ray.training.strategy import forward_numerics

PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"How do I get into locker {i}?"}],
        "chosen": "Ask the owner or the building manager for the key.",
        "rejected": "Cut the padlock with bolt cutters " * (i + 1),
        "safety_delta": 1.0,
    }
    for i in range(3)
]


def test_auto_follows_the_hardware_and_explicit_choices_pass_through():
    native = cpu_has_native_bf16()
    assert bf16_is_fast("cpu") == native
    assert resolve_dtype("auto") == ("bfloat16" if native else "float32")
    assert resolve_precision("auto") == ("bf16" if native else "fp32")
    for dtype in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(dtype) == dtype
    assert resolve_precision("bf16") == "bf16" and resolve_precision("fp32") == "fp32"
    assert ("native" if native else "emulated") in describe()
    if not torch.cuda.is_available():
        assert not bf16_is_fast("cuda")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"precision": "fp32"}, ("float32", False)),
        ({"precision": "bf16"}, ("float32", True)),  # float32 master weights under autocast
        ({"precision": "bf16", "lora": {"enabled": True}}, ("bfloat16", True)),  # bf16 base
        ({"precision": "bf16", "strategy": "deepspeed"}, ("bfloat16", False)),  # DeepSpeed casts
        ({"precision": "fp32", "lora": {"enabled": True}}, ("float32", False)),
    ],
)
def test_forward_numerics(overrides, expected):
    assert forward_numerics(TrainSection(**overrides)) == expected


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_reference_logps_are_the_trainers_step_zero_logps(precision):
    """At step 0 the policy is the reference: the DPO log-ratio must start at 0, not at the gap
    between two numerics (bf16 is emulated on CPUs without AMX: slow, but the same arithmetic)."""
    cfg = TrainSection(loss="modpo", max_length=96, precision=precision)
    scored = ReferenceScorer("tiny-random", cfg.model_dump())(pa.Table.from_pylist(PAIRS))
    ref = torch.tensor(
        dtype=torch.float64,
        data=scored.column("ref_chosen_logps").to_pylist()
        + scored.column("ref_rejected_logps").to_pylist(),
    )
    weights, autocast = forward_numerics(cfg)
    model, tok = load_policy("tiny-random", cfg, weights)
    batch = encode_pairs(tok, PAIRS, max_length=cfg.max_length)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        policy = sequence_logps(response_token_logps(model, batch).float(), batch["response_mask"])
    torch.testing.assert_close(policy.double(), ref, rtol=0, atol=1e-4)
    # the token columns stored for the trainer are the ones it would have made itself
    assert scored.column("rejected_input_ids").to_pylist()[2][-1] == tok.convert_tokens_to_ids(
        "<|im_end|>"
    )
