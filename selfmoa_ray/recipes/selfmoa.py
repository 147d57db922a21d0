"""Recipe: the Self-MOA closed loop, top to bottom (docs/design.md 2.1).

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

from selfmoa_ray.config import Config, ModelSection
from selfmoa_ray.layout import BASELINE, CALIBRATION, POLICY, Iteration
from selfmoa_ray.recipes.acceptance import check_policy
from selfmoa_ray.recipes.steps import Steps, human_items, stage_done, track_policy, track_training
from selfmoa_ray.report.html import write_report
from selfmoa_ray.report.tracking import make_tracker
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


def run_selfmoa(config: Config, run: RunDir) -> dict[str, Any]:
    """Run (or resume) the closed loop in ``run``; returns the collected metrics of the run.

    ``run.recipe: combined``: Self-MOA pairs plus PT-ALIGN's token-level unlikelihood on the
    harmful spans of each unsafe rejected answer (weight ``train.unlikelihood_alpha``).
    """
    with make_tracker(config.tracking, run.root, config.run.name) as tracker:
        tracker.log_config(config)
        stage_done(run, evaluate_policy(run, config, config.policy, BASELINE), BASELINE)
        calibrated = calibrate(run, stage="calibrate", out=CALIBRATION, config=config)
        stage_done(run, calibrated, "calibrate")
        if config.loop.validation_prompts:
            stage_done(run, validation(run, config), "validation")
        track_policy(tracker, run, 0, BASELINE)
        policy, accepted = config.policy, BASELINE
        state: dict[str, Any] = {"recipe": config.run.recipe, "safety_gains": {}}
        state.update(iterations_planned=config.loop.iterations, iterations_done=0)
        state.update(stopped_early=False, stop_reason=None)
        for it in map(Iteration, range(1, config.loop.iterations + 1)):
            trained = run_iteration(config, run, it, policy)
            track_training(tracker, run, it)
            state["iterations_done"] = it.t
            if isinstance(trained, str):
                state.update(stopped_early=True, stop_reason=trained)
                break
            track_policy(tracker, run, it.t, it.name)
            reason, gain = check_policy(run, it.name, accepted, it.t, config)
            state["safety_gains"][it.name] = {"since": accepted, **gain}
            if reason:
                state.update(stopped_early=it.t < config.loop.iterations, stop_reason=reason)
                break
            policy, accepted = trained, it.name
        # The policy a user should take away: the last one that passed both checks.
        final = run.path(accepted, POLICY) if accepted != BASELINE else config.policy.source
        state.update(final_policy=accepted, final_policy_path=str(final))
        state["human_items"] = human_items(run, config)
        run.manifest["loop"] = state
        run.save()
        collected = write_report(run.root)
        tracker.log_report(run.root)
    return collected


def run_iteration(config: Config, run: RunDir, it: Iteration, policy: ModelSection) -> Any:
    """One iteration from policy M_{t-1}; returns M_t (a ``ModelSection``), or why the loop stops
    here: too few pairs were kept, or training kept the start policy (no epoch improved the
    validation frontier, so there is nothing new to evaluate)."""
    steps, t, unsafe = Steps(run, it), it.t, config.judge.unsafe_threshold
    engine, seed = config.engine, config.run.seed + t
    trainer = config.train  # the combined recipe adds the unlikelihood term on marked spans
    combined = config.run.recipe == "combined"
    trainer = trainer.model_copy(update={"unlikelihood": True}) if combined else trainer
    attack_round(config, run, it, policy, guided=True)
    kept = steps("pairs", pairs, section=config.pairs, unsafe_threshold=unsafe)["summary"]["pairs"]
    if kept < trainer.batch_size * trainer.num_workers:
        log.warning("iteration %d kept %d pairs, fewer than one batch: stopping", t, kept)
        return f"too few pairs to train at {t}"
    if combined:  # PT-ALIGN's harmful spans in unsafe rejected answers, for the unlikelihood term
        marking = {"section": config.pt_align, "model": config.redteam.generator or policy}
        steps("spans", mark_pairs, unsafe_threshold=unsafe, engine=engine, seed=seed, **marking)
    data = it.io("spans" if combined else "pairs")["out"]
    ref = policy if trainer.reference == "previous" else config.policy
    steps("reference", reference, pairs=data, model=ref, engine=engine, train=trainer)
    held_back = read_validation(run)
    entry = steps("train", train, model=policy, config=trainer, validation=held_back, seed=seed)
    if entry["summary"].get("kept_epoch") == 0:
        trace = entry["summary"].get("validation_trace")
        return (
            f"training at iteration {t} kept its start policy: no epoch improved the validation "
            f"frontier (epoch:attacks/benign refused {trace})"
        )
    new_policy = policy.model_copy(update={"source": str(run.path(it.file(POLICY)))})
    # The vault's attacks are answered in the evaluation's pass (evaluate.AlsoAnswer).
    before = Iteration(t - 1).io("vault")["out"] if t > 1 else None
    attacks = vault_attacks(run, previous=before, failures=it.io("failures")["out"], found_in=t)
    also = AlsoAnswer(attacks, it.io("vault")["answers"], ANSWER_COLUMNS)
    evaluated = evaluate_policy(run, config, new_policy, it.name, also=also)
    stage_done(run, evaluated, it.stage("evaluate"))
    steps("vault", vault, attacks=attacks, found_in=t, config=config, model=new_policy)
    return new_policy


def attack_round(
    config: Config, run: RunDir, it: Iteration, policy: ModelSection, *, guided: bool
) -> dict[str, Any]:
    """Round ``it`` of targeted red-teaming: attacks aimed at the round before's successes,
    ``policy``'s answers (and, when ``guided``, answers under ``sampling.guide`` and
    ``sampling.prefill``), their scores, and the attacks that succeeded; returns the ``failures``
    stage's summary. The loop's iterations and the red-team-only recipe (recipes/redteam.py)
    share it."""
    steps, s, t = Steps(run, it), config.sampling, it.t
    last = run.stage_summary(Iteration(t - 1).stage("failures")).get("by_category")
    writer = config.redteam.generator or policy
    steps("redteam", redteam, config=config, iteration=t, generator=writer, previous_rates=last)
    chat = [m.model_dump() for m in s.guide or []]
    guide = {"guide": chat, "prefill": s.prefill} if guided else {}
    params = s.params(seed=config.run.seed + t)
    steps("sample", sample, model=policy, engine=config.engine, sampling=params, **guide)
    steps("judge", judge, config=config.judge, dtype=config.policy.dtype)
    return steps("failures", failures, unsafe_threshold=config.judge.unsafe_threshold)["summary"]
