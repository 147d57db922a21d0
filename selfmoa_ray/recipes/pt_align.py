"""Recipe: PT-ALIGN, dual safety self-alignment from fewer than 50 human items (docs/design.md 2.2).

    baseline/evaluate                               the start policy on the held-out sets
    calibrate             calibration.json          both judges on human labels held back
    validation            validation.parquet        prompts on which training picks its point
                                                    (``loop.validation_prompts``; as Self-MOA)
    iter_01/topics        topics.parquet            topics per safety domain
    iter_01/instructions  instructions.parquet      red-team instructions per topic (deduplicated,
                                                    never a held-out or validation prompt)
    iter_01/positive      positives.parquet         harmless answers, critiqued and revised (and
                                                    one opened by ``pt_align.positive_prefill``)
    iter_01/toxic         toxics.parquet            toxic answers, refined (refusals dropped),
                                                    and the policy's answers to the bare request
    iter_01/filter        filtered.parquet          the best candidates: positive judged safe and
                                                    not a needless refusal; toxic judged unsafe
    iter_01/triples       triples.parquet           harmful spans of each toxic answer, quoted by
                                                    the model and mapped to character offsets
    iter_01/train         policy/                   MLE on positives + unlikelihood on the harmful
                                                    tokens of toxics, on the bare instructions
    iter_01/evaluate      metrics.json              the trained policy on the held-out sets
    report.html, metrics.json, metrics.csv

The only human input written for the recipe is the seed file (``pt_align.seeds``), counted in
the manifest and the report; like the loop, it evaluates, calibrates and picks its training point
on the packaged public prompt and label sets, which it never trains on. The policy writes its own
data unless ``pt_align.generator`` names another model. Like the Self-MOA loop, every stage is
skipped when its output exists, so ``--resume`` continues a killed run.
"""

from __future__ import annotations

import logging
from typing import Any

from selfmoa_ray.config import Config
from selfmoa_ray.evaluators.audit import held_out_prompts
from selfmoa_ray.layout import BASELINE, CALIBRATION, POLICY, Iteration
from selfmoa_ray.recipes.acceptance import check_policy
from selfmoa_ray.recipes.steps import Steps, stage_done, track_policy, track_training
from selfmoa_ray.report.html import write_report
from selfmoa_ray.report.tracking import make_tracker
from selfmoa_ray.rundir import RunDir
from selfmoa_ray.sources.human_seeds import load_human_seeds
from selfmoa_ray.stages.calibrate import calibrate
from selfmoa_ray.stages.evaluate import evaluate_policy
from selfmoa_ray.stages.instructions import instructions
from selfmoa_ray.stages.positive import positive
from selfmoa_ray.stages.pt_filter import pt_filter
from selfmoa_ray.stages.spans import triples
from selfmoa_ray.stages.topics import topics
from selfmoa_ray.stages.toxic import toxic
from selfmoa_ray.stages.train import train
from selfmoa_ray.stages.validation import read_validation, validation

log = logging.getLogger(__name__)


def run_pt_align(config: Config, run: RunDir) -> dict[str, Any]:
    """Run (or resume) PT-ALIGN in ``run``; returns the collected metrics of the run."""
    section = config.pt_align
    seeds = load_human_seeds(section.seeds, section.max_human_items)  # fails before any work
    train_config = config.train.model_copy(update={"loss": "pt_align"})
    generator = section.generator or config.policy
    it, seed = Iteration(1), config.run.seed + 1
    steps = Steps(run, it)
    with make_tracker(config.tracking, run.root, config.run.name) as tracker:
        tracker.log_config(config)
        stage_done(run, evaluate_policy(run, config, config.policy, BASELINE), BASELINE)
        calibrated = calibrate(run, stage="calibrate", out=CALIBRATION, config=config)
        stage_done(run, calibrated, "calibrate")
        if config.loop.validation_prompts:
            stage_done(run, validation(run, config), "validation")
        held_back = read_validation(run) or {}
        track_policy(tracker, run, 0, BASELINE)

        model = {"model": generator, "engine": config.engine, "seed": seed}
        gen = {"seeds": seeds, "section": section, **model}
        eval_texts = [p.text for p in held_out_prompts(config.data, config.run.seed)]
        eval_texts += [text for texts in held_back.values() for text in texts]
        steps("topics", topics, **gen)
        steps("instructions", instructions, exclude=eval_texts, **gen)
        steps("positive", positive, **gen)
        steps("toxic", toxic, **gen)
        steps("filter", pt_filter, section=section, judge=config.judge)
        kept = steps("triples", triples, section=section, **model)["summary"]["triples"]
        state: dict[str, Any] = {"recipe": "pt_align", "iterations_planned": 1}
        state.update(iterations_done=1, stopped_early=False, stop_reason=None)
        state.update(human_items=seeds.items, human_seeds=section.seeds)
        state["human_seeds_fingerprint"] = seeds.fingerprint()
        needed = train_config.batch_size * train_config.num_workers
        accepted = BASELINE
        if kept < needed:
            log.warning("PT-ALIGN kept %d triples, fewer than one batch (%d)", kept, needed)
            state.update(stopped_early=True, stop_reason=f"too few triples to train ({kept})")
        else:
            data, start = it.io("triples")["out"], config.policy
            trainer = {"config": train_config, "seed": seed, "validation": held_back or None}
            steps("train", train, data=data, model=start, **trainer)
            track_training(tracker, run, it)
            trained = config.policy.model_copy(update={"source": str(run.path(it.file(POLICY)))})
            stage_done(run, evaluate_policy(run, config, trained, it.name), it.stage("evaluate"))
            track_policy(tracker, run, 1, it.name)
            reason, _ = check_policy(run, it.name, BASELINE, 1, config)
            state["stop_reason"] = reason
            accepted = BASELINE if reason else it.name
        state["final_policy"] = accepted
        final = run.path(accepted, POLICY) if accepted != BASELINE else config.policy.source
        state["final_policy_path"] = str(final)
        run.manifest["loop"] = state
        run.save()
        collected = write_report(run.root)
        tracker.log_report(run.root)
    return collected
