"""Whether a loop iteration's policy is accepted: the checks on its held-out evaluation.

An evaluated policy is kept when held-out safety gained over the last accepted policy (paired over
the prompts, report/gains.py) and benign over-refusal and helpfulness stayed within bounds of the
start policy's; otherwise the loop stops and the run's final policy is the last accepted one.
"""

from __future__ import annotations

from typing import Any

from selfmoa_ray.config import Config, LoopSection
from selfmoa_ray.layout import BASELINE
from selfmoa_ray.report.gains import run_gains
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.schema import EVAL_BENIGN_SPLIT, EVAL_HARMFUL_SPLIT


def check_policy(
    run: RunDir, name: str, accepted: str, t: int, config: Config
) -> tuple[str | None, dict[str, Any]]:
    """:func:`stop_reason` for the evaluated policy ``name`` against the last ``accepted`` one
    (safety: the paired gain on the held-out harmful prompts, report/gains.py) and the start
    policy (over-refusal, helpfulness); and the safety gain it judged by."""

    def change(split: str, key: str, since: str) -> float:
        return policy_metric(run, name, split, key) - policy_metric(run, since, split, key)

    loop = config.loop
    gains = run_gains(run.root, accepted, name, config.evaluate.judge.unsafe_threshold) or {}
    safety = gains.get(EVAL_HARMFUL_SPLIT, {}).get("safety_rate")
    if safety is None:  # no harmful split evaluated: the (unpaired) change of the rate
        safety = {"gain": round(change(EVAL_HARMFUL_SPLIT, "safety_rate", accepted), 4)}
    bound = loop.gain_measure == "lower_bound" and "interval" in safety
    reason = stop_reason(
        safety["interval"][0] if bound else safety["gain"],
        change(EVAL_BENIGN_SPLIT, "refusal_rate", BASELINE),
        t,
        loop,
        helpfulness_drop=-change(EVAL_BENIGN_SPLIT, "helpfulness", BASELINE),
        gain_label="lower end of the 95% interval of the held-out safety gain" if bound else None,
    )
    return reason, safety


def stop_reason(
    gain: float,
    over_refusal_rise: float,
    t: int,
    loop: LoopSection,
    *,
    helpfulness_drop: float = 0,
    gain_label: str | None = None,
) -> str | None:
    """Why iteration ``t``'s policy is rejected and the loop stops, or None to accept it and go on.

    ``gain``: held-out harmful safety over the last accepted policy (or the lower end of its
    interval, named by ``gain_label``, under ``loop.gain_measure: lower_bound``);
    ``over_refusal_rise``: benign refusal rate over the start policy; ``helpfulness_drop``: benign helpfulness below the start
    policy's (a policy can evade without refusing: "I'm a helpful assistant, here to help" is
    judged safe and no refusal, and helps no one). A rejected policy stays on disk, but the run's
    final policy is the last accepted one.
    """
    if helpfulness_drop > loop.max_helpfulness_drop:
        return (
            f"benign helpfulness fell {helpfulness_drop:.3f} below the start policy's "
            f"(> loop.max_helpfulness_drop {loop.max_helpfulness_drop}) at iteration {t}"
        )
    if over_refusal_rise > loop.max_over_refusal_rise:
        return (
            f"over-refusal rose {100 * over_refusal_rise:+.1f} pts over the start policy "
            f"(> loop.max_over_refusal_rise {100 * loop.max_over_refusal_rise:.1f}) at iteration {t}"
        )
    if gain < loop.min_gain:
        label = gain_label or "held-out safety gain"
        return f"{label} {gain:+.4f} < loop.min_gain {loop.min_gain} at iteration {t}"
    return None


def policy_metric(run: RunDir, name: str, split: str, key: str) -> float:
    splits = run.manifest["stages"][f"{name}/evaluate"]["summary"]["splits"]
    return float(splits[split][key]) if split in splits else 0.0
