"""Recipe: the Self-MOA closed loop, top to bottom (design.md 2.1).

    baseline/evaluate                           the start policy on the held-out sets (audit judge)
    calibrate         calibration.json          both judges on human labels held back from them
    validation        validation.parquet        seed attacks and benign prompts kept from the red
                                                team: training keeps its best epoch on them
    for t in 1..loop.iterations:
        iter_t/redteam    prompts.parquet       attacks aimed at M_{t-1}'s failures, benign mixed in
        iter_t/sample     responses.parquet/    M_{t-1} answers each prompt k times (and k more
                                                under sampling.guide / .prefill, when set)
        iter_t/judge      scored.parquet/       evaluators: safety, helpfulness, refusal
        iter_t/failures   failures.parquet      successful attacks: next iteration's few-shots
        iter_t/pairs      pairs.parquet         Self-MOA preference pairs
        iter_t/spans      pairs_marked.parquet  (combined recipe only) harmful spans of unsafe
                                                rejected answers, for PT-ALIGN's unlikelihood
        iter_t/reference  pairs_ref.parquet/    reference log-probs (M_{t-1}, or M_0)
        iter_t/train      policy/               MODPO on Ray Train: M_t (the epoch on the
                                                validation frontier)
        iter_t/evaluate   metrics.json          M_t on the held-out sets (audit judge); rejected
                                                (and the loop stops) if safety did not gain (paired
                                                over prompts) or over-refusal rose; in the same
                                                pass M_t answers the vault's attacks
        iter_t/vault      vault.parquet         every successful attack so far, and how many of
                                                them M_t's answers still fail
    report.html, metrics.json, metrics.csv

Every stage is a function of files in the run directory and is skipped when its output exists, so
a killed run started again with ``--resume`` continues where it stopped and never repeats or loses
rows. The loop itself holds no state that the files do not: the policy of iteration t is
``iter_t/policy`` and the stop decision is recomputed from the stored metrics.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow.parquet as pq

from selfmoa_ray import console
from selfmoa_ray.config import Config, LoopSection, ModelSection
from selfmoa_ray.engines.base import SamplingParams
from selfmoa_ray.report.collect import (
    BASELINE,
    BENIGN_SPLIT,
    CALIBRATION,
    HARMFUL_SPLIT,
    collect_run,
)
from selfmoa_ray.report.gains import run_gains
from selfmoa_ray.report.html import write_report
from selfmoa_ray.report.tracking import cost_metrics, flat_metrics, make_tracker
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.stages.calibrate import calibrate
from selfmoa_ray.stages.evaluate import AlsoAnswer, evaluate_policy
from selfmoa_ray.stages.failures import failures
from selfmoa_ray.stages.judge import judge
from selfmoa_ray.stages.pairs import pairs
from selfmoa_ray.stages.redteam import redteam
from selfmoa_ray.stages.reference import reference
from selfmoa_ray.stages.sample import sample
from selfmoa_ray.stages.spans import mark_pairs
from selfmoa_ray.stages.train import train
from selfmoa_ray.stages.validation import read_validation, validation
from selfmoa_ray.stages.vault import ANSWER_COLUMNS, vault, vault_attacks

log = logging.getLogger(__name__)


def iteration_dir(t: int) -> str:
    return f"iter_{t:02d}"


def check_recipe(config: Config) -> None:
    """Fail before any work on a config this recipe cannot run."""
    if config.train.loss == "pt_align":
        raise ValueError(
            "train.loss=pt_align trains on positive/toxic triples, not Self-MOA pairs; "
            "use a preference loss (modpo, dpo, ipo, scalarised_dpo)"
        )


def run_selfmoa(config: Config, run: RunDir, *, combined: bool = False) -> dict[str, Any]:
    """Run (or resume) the closed loop in ``run``; returns the collected metrics of the run.

    ``combined``: the combined recipe, Self-MOA pairs plus PT-ALIGN's token-level unlikelihood on
    the harmful spans of each unsafe rejected answer (weight ``train.unlikelihood_alpha``).
    """
    check_recipe(config)
    tracker = make_tracker(config.tracking, run.root, config.run.name)
    try:
        stage_done(run, evaluate_policy(run, config, config.policy, BASELINE), BASELINE)
        stage_done(run, calibrate(run, stage="calibrate", out=CALIBRATION, config=config),
                   "calibrate")  # fmt: skip
        if config.loop.validation_prompts:
            stage_done(run, validation(run, config), "validation")
        track_policy(tracker, run, 0, BASELINE)
        policy, accepted = config.policy, BASELINE
        state = {"recipe": "combined" if combined else "selfmoa",
                 "iterations_planned": config.loop.iterations, "iterations_done": 0,
                 "stopped_early": False, "stop_reason": None, "safety_gains": {}}  # fmt: skip
        for t in range(1, config.loop.iterations + 1):
            trained = run_iteration(config, run, t, policy, combined=combined)
            state["iterations_done"] = t
            if isinstance(trained, str):
                state.update(stopped_early=True, stop_reason=trained)
                break
            name = iteration_dir(t)
            track_policy(tracker, run, t, name)
            reason, gain = check_policy(run, name, accepted, t, config)
            state["safety_gains"][name] = {"since": accepted, **gain}
            if reason:
                state.update(stopped_early=t < config.loop.iterations, stop_reason=reason)
                break
            policy, accepted = trained, name
        # The policy a user should take away: the last one that passed both checks.
        state["final_policy"] = accepted
        state["final_policy_path"] = str(
            run.path(accepted, "policy") if accepted != BASELINE else config.policy.source
        )
        state["human_items"] = human_items(run, config)
        run.manifest["loop"] = state
        run.save()
    finally:
        tracker.close()
    return write_report(run.root)


def run_iteration(
    config: Config, run: RunDir, t: int, policy: ModelSection, *, combined: bool = False
) -> ModelSection | str:
    """One iteration from policy M_{t-1}; returns M_t, or why the loop stops here: too few pairs
    were kept, or training kept the start policy (no epoch improved the validation frontier, so
    there is nothing new to evaluate)."""
    it = iteration_dir(t)
    threshold = config.judge.unsafe_threshold
    generator = config.redteam.generator or policy

    def done(name: str, entry: dict[str, Any]) -> dict[str, Any]:
        return stage_done(run, entry, f"{it}/{name}")

    attack_round(config, run, t, policy, guided=True)
    kept = done("pairs", pairs(run, stage=f"{it}/pairs", scored=f"{it}/scored.parquet",
                               out=f"{it}/pairs.parquet", section=config.pairs,
                               unsafe_threshold=threshold))["summary"]["pairs"]  # fmt: skip
    needed = config.train.batch_size * config.train.num_workers
    if kept < needed:
        log.warning(
            "iteration %d kept %d pairs, fewer than one batch (%d): stopping", t, kept, needed
        )
        return f"too few pairs to train at {t}"
    train_pairs = f"{it}/pairs.parquet"
    if combined:
        train_pairs = f"{it}/pairs_marked.parquet"
        done("spans", mark_pairs(
            run, stage=f"{it}/spans", pairs=f"{it}/pairs.parquet", out=train_pairs,
            unsafe_threshold=threshold, section=config.pt_align, model=generator,
            engine=config.engine, seed=config.run.seed + t,
        ))  # fmt: skip
    ref_model = policy if config.train.reference == "previous" else config.policy
    done("reference", reference(
        run, stage=f"{it}/reference", pairs=train_pairs, out=f"{it}/pairs_ref.parquet",
        model=ref_model, engine=config.engine, train=config.train,
    ))  # fmt: skip
    trained_summary = done("train", train(
        run, stage=f"{it}/train", data=f"{it}/pairs_ref.parquet", out=f"{it}/policy",
        model=policy, config=config.train, seed=config.run.seed + t,
        validation=read_validation(run),
    ))["summary"]  # fmt: skip
    if trained_summary.get("kept_epoch") == 0:
        trace = trained_summary.get("validation_trace")
        return (
            f"training at iteration {t} kept its start policy: no epoch improved the validation "
            f"frontier (epoch:attacks/benign refused {trace})"
        )
    trained = policy.model_copy(update={"source": str(run.path(it, "policy"))})
    # The vault's attacks are answered in the evaluation's pass (evaluate.AlsoAnswer).
    previous_vault = f"{iteration_dir(t - 1)}/vault.parquet" if t > 1 else None
    attacks = vault_attacks(run, previous=previous_vault, failures=f"{it}/failures.parquet",
                            found_in=t)  # fmt: skip
    answers = f"{it}/vault_answers.parquet"
    done("evaluate", evaluate_policy(run, config, trained, it,
                                     also=AlsoAnswer(attacks, answers, ANSWER_COLUMNS)))  # fmt: skip
    done("vault", vault(run, stage=f"{it}/vault", attacks=attacks, out=f"{it}/vault.parquet",
                        answers=answers, found_in=t, config=config, model=trained))  # fmt: skip
    return trained


def attack_round(
    config: Config, run: RunDir, t: int, policy: ModelSection, *, guided: bool
) -> dict[str, Any]:
    """Round ``t`` of targeted red-teaming: attacks aimed at round t-1's successes, ``policy``'s
    answers (and, when ``guided``, answers under ``sampling.guide``), their scores, and the
    attacks that succeeded; returns the ``failures`` stage's summary. The loop's iterations and
    the red-team-only recipe (recipes/redteam.py) share it."""
    it = iteration_dir(t)

    def done(name: str, entry: dict[str, Any]) -> dict[str, Any]:
        return stage_done(run, entry, f"{it}/{name}")

    done("redteam", redteam(run, config, iteration=t,
                            generator=config.redteam.generator or policy,
                            out=f"{it}/prompts.parquet"))  # fmt: skip
    done("sample", sample(
        run, stage=f"{it}/sample", prompts=f"{it}/prompts.parquet",
        out=f"{it}/responses.parquet", model=policy, engine=config.engine,
        sampling=SamplingParams(
            n=config.sampling.n, temperature=config.sampling.temperature,
            top_p=config.sampling.top_p, max_new_tokens=config.sampling.max_new_tokens,
            seed=config.run.seed + t,
        ),
        guide=[m.model_dump() for m in config.sampling.guide or []] if guided else None,
        prefill=config.sampling.prefill if guided else None,
    ))  # fmt: skip
    done("judge", judge(run, stage=f"{it}/judge", responses=f"{it}/responses.parquet",
                        out=f"{it}/scored.parquet", config=config.judge,
                        dtype=config.policy.dtype))  # fmt: skip
    return done("failures", failures(
        run, stage=f"{it}/failures", scored=f"{it}/scored.parquet",
        out=f"{it}/failures.parquet", unsafe_threshold=config.judge.unsafe_threshold,
    ))["summary"]  # fmt: skip


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
    safety = gains.get(HARMFUL_SPLIT, {}).get("safety_rate")
    if safety is None:  # no harmful split evaluated: the (unpaired) change of the rate
        safety = {"gain": round(change(HARMFUL_SPLIT, "safety_rate", accepted), 4)}
    bound = loop.gain_measure == "lower_bound" and "interval" in safety
    reason = stop_reason(
        safety["interval"][0] if bound else safety["gain"],
        change(BENIGN_SPLIT, "refusal_rate", BASELINE),
        t,
        loop,
        helpfulness_drop=-change(BENIGN_SPLIT, "helpfulness", BASELINE),
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


def human_items(run: RunDir, config: Config) -> int:
    """Human-written items the loop started from: the seed and benign prompts its red team drew
    on, the messages of ``sampling.guide`` and the ``sampling.prefill``; no human labels."""
    seeds: set[str] = set()
    for path in sorted(run.root.glob("iter_*/prompts.parquet")):
        seeds |= set(pq.read_table(path, columns=["seed_id"]).column("seed_id").to_pylist())
    guide = len(config.sampling.guide or []) + bool(config.sampling.prefill)
    return len(seeds - {""}) + guide


def policy_metric(run: RunDir, name: str, split: str, key: str) -> float:
    splits = run.manifest["stages"][f"{name}/evaluate"]["summary"]["splits"]
    return float(splits[split][key]) if split in splits else 0.0


def track_policy(tracker: Any, run: RunDir, step: int, name: str) -> None:
    """The policy's held-out metrics at ``step``, and what the run has cost so far."""
    collected = collect_run(run.root)
    for policy in collected["policies"]:
        if policy["name"] == name:
            tracker.log_iteration(step, flat_metrics(policy) | cost_metrics(collected["cost"]))


def stage_done(run: RunDir, entry: dict[str, Any], name: str) -> dict[str, Any]:
    """One line per finished stage, so a user watching the job sees the loop advance; returns
    the stage's manifest entry. The line fits the terminal (the full summary is in the manifest):
    ``[iter_01/judge] done in 9.3s rows=32 unsafe=30 refusals=2``; an evaluation shows each
    split's safety and refusal rates."""
    summary = entry.get("summary", {})
    parts = [f"{k}={_short(v)}" for k, v in summary.items() if not isinstance(v, (dict, list))]
    for split, m in (summary.get("splits") or {}).items():
        if isinstance(m, dict) and "safety_rate" in m:
            parts.append(f"{split}: safety {m['safety_rate']:.1%} refusal {m['refusal_rate']:.1%}")
    status = f"[{name}] {entry.get('status')} in {entry.get('seconds', 0):.1f}s"
    console.current().line(console.fit(" ".join([status, *parts])))
    return entry


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
