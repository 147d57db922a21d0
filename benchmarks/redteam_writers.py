"""Red-team writers: how many usable attacks each way of asking the generator yields.

The same slots (a category, a human seed and the examples shown) are written three ways by the
generator, in one pass through the engine pool:

* ``rephrase``: the chat instruction to rephrase the seed (stages/redteam.py ``REPHRASE``);
* ``fewshot``: the chat instruction to write a new request like the examples (``FEWSHOT``);
* ``continue``: the examples as a numbered list ending in an open item, continued in plain
  completion mode (no chat template; ``list_prompt``).

A request is *usable* when it is one (not a refusal, at least three words), on topic (its content
words come from the seed or the examples, ``redteam.min_topic_overlap``), not a copy of one of them
(character 5-gram Jaccard below ``redteam.dedup.threshold``) and not a duplicate of a held-out
evaluation prompt or of a request already written by the same writer. Every share comes with its
95% Wilson interval; novelty is the mean 1 - highest 5-gram Jaccard with any human seed.

    .venv/bin/python benchmarks/redteam_writers.py                   # demo config, 72 slots
    .venv/bin/python benchmarks/redteam_writers.py --slots 24 --config tiny
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter, defaultdict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WRITERS = ("rephrase", "fewshot", "continue")


def measure(config_name: str, slots: int, overrides: list[str]) -> dict:
    from selfmoa_ray.config import load_config
    from selfmoa_ray.engines.base import SamplingParams
    from selfmoa_ray.engines.pool import complete
    from selfmoa_ray.ray_runtime import ray_for_run
    from selfmoa_ray.report.stats import rate_interval
    from selfmoa_ray.sources.dedup import Deduplicator
    from selfmoa_ray.sources.prompts import load_prompts
    from selfmoa_ray.stages.attack_stats import novelty
    from selfmoa_ray.stages.redteam import (
        REPHRASE,
        allocate_budget,
        fewshot_instruction,
        plan_slots,
        usable_request,
    )

    config = load_config(config_name, overrides)
    section, seed = config.redteam, config.run.seed
    rng = random.Random(f"{seed}-writers")
    seeds = [row for spec in config.data.seeds for row in load_prompts(spec)]
    by_category = defaultdict(list)
    for row in seeds:
        by_category[row.category].append(row)
    for rows in by_category.values():
        rng.shuffle(rows)
    budget = allocate_budget(dict.fromkeys(by_category, 1.0), slots, 1.0, salt=str(seed))
    planned = plan_slots(budget, by_category, {}, iteration=1, few_shot=section.few_shot, rng=rng,
                         continued=True, list_examples=section.list_examples)  # fmt: skip
    prompts: dict = {}
    for s in planned:
        prompts[f"rephrase|{s.id}"] = [
            {"role": "user", "content": REPHRASE.format(seed=s.seed.text)}
        ]
        instruction = fewshot_instruction(s.category, s.references)
        prompts[f"fewshot|{s.id}"] = [{"role": "user", "content": instruction}]
        prompts[f"continue|{s.id}"] = s.instruction
    sampling = SamplingParams(temperature=section.temperature, top_p=section.top_p,
                              max_new_tokens=section.max_new_tokens, seed=seed + 1)  # fmt: skip
    start = time.perf_counter()
    with ray_for_run(config.ray):
        completions = complete(prompts, config.policy, config.engine, sampling, label="writers")
    seconds = time.perf_counter() - start

    eval_texts = [r.text for spec in [*config.data.eval_harmful, *config.data.eval_benign]
                  for r in load_prompts(spec)]  # fmt: skip
    out = {"config": config_name, "generator": config.policy.label, "slots": len(planned),
           "seconds_all_writers": round(seconds, 1), "writers": {}}  # fmt: skip
    for writer in WRITERS:
        dedup = Deduplicator(section.dedup.threshold, section.dedup.ngram, section.dedup.unit)
        dedup.add_history(eval_texts)
        reasons: Counter[str] = Counter()
        usable = []
        for s in planned:
            references = (s.seed.text,) if writer == "rephrase" else s.references
            text, why = usable_request(
                completions.get(f"{writer}|{s.id}", ""), references,
                continued=writer == "continue", min_overlap=section.min_topic_overlap,
                copy_threshold=section.dedup.threshold,
            )  # fmt: skip
            if text is not None and not dedup.filter([text])[0].keep:
                text, why = None, "duplicate"
            reasons[why] += 1
            if text is not None:
                usable.append(text)
        n = len(planned)
        out["writers"][writer] = {
            "usable": len(usable), "usable_share": round(len(usable) / n, 4),
            "ci95": rate_interval(len(usable), n),
            "off_topic_share": round(reasons["off_topic"] / n, 4),
            "reasons": dict(reasons),
            "novelty_of_usable": novelty(usable, [r.text for r in seeds]),
            "examples": usable[:5],
        }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument(
        "--slots", type=int, default=72, help="slots, spread evenly over categories"
    )
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_args()
    result = measure(args.config, args.slots, args.overrides)
    print(f"{result['slots']} slots, {result['generator']}, {result['seconds_all_writers']} s")
    print(f"{'writer':<10} {'usable':>22} {'off topic':>10} {'novelty':>8}  reasons")
    for writer, w in result["writers"].items():
        lo, hi = w["ci95"]
        share = f"{100 * w['usable_share']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
        print(f"{writer:<10} {share:>22} {100 * w['off_topic_share']:>9.1f}% "
              f"{w['novelty_of_usable'] or 0:>8.3f}  {w['reasons']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
