"""PT-ALIGN instruction writers: how many usable harmful instructions each way of writing yields.

The same slots (PT-ALIGN's topics from the domain descriptions of the packaged seed file, a few
per topic, as ``stages/instructions.py`` plans them) are written three ways, the two model-written
ones in one pass through the engine pool:

* ``chat``: the chat request of the ``chat`` writer (``pt_prompts.INSTRUCTION``, the domain's
  demonstrations as examples);
* ``continue``: a numbered list of demonstrations under a header naming the topic, continued in
  plain completion mode (the red team's best writer, ``redteam.list_prompt``);
* ``template``: the seed file's human-written instruction templates filled with the topic.

*Usable* follows the stage's own rules: a request (not a refusal, at least three words), on topic
(content words from the topic, the domain's description or its demonstrations:
``pt_align.min_topic_overlap``), and not a near duplicate of a demonstration, of a held-out
evaluation prompt or of another instruction of the same writer. *Faithful* is stricter: usable,
and naming at least half of the content words of the slot's topic, so that a copy of a
demonstration from another domain does not count. Every share has its 95% Wilson interval.

    .venv/bin/python benchmarks/pt_align_writers.py                  # demo config, 48 slots
    .venv/bin/python benchmarks/pt_align_writers.py --config tiny --per-topic 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WRITERS = ("chat", "continue", "template")
LIST_EXAMPLES = 4


def measure(config_name: str, per_topic: int, overrides: list[str]) -> dict:
    from selfmoa_ray.config import load_config
    from selfmoa_ray.engines.base import SamplingParams
    from selfmoa_ray.engines.pool import complete
    from selfmoa_ray.evaluators.audit import held_out_prompts
    from selfmoa_ray.ray_runtime import ray_for_run
    from selfmoa_ray.report.stats import rate_interval
    from selfmoa_ray.sources.generated_requests import content_words
    from selfmoa_ray.sources.human_seeds import load_human_seeds
    from selfmoa_ray.stages.instructions import (
        check_instruction,
        fill_templates,
        make_deduplicator,
        plan_slots,
    )
    from selfmoa_ray.stages.redteam import list_prompt, usable_request
    from selfmoa_ray.stages.topics import fallback_topics

    config = load_config(config_name, overrides)
    section, seed = config.pt_align, config.run.seed
    seeds = load_human_seeds(section.seeds)
    topics = [
        {"id": f"{d.name}-{i:02d}", "domain": d.name, "topic": topic}
        for d in seeds.domains
        for i, topic in enumerate(itertools.islice(fallback_topics(d.description), section.topics_per_domain))
    ]  # fmt: skip
    slots = plan_slots(topics, seeds, per_topic)
    demos = [d.instruction for d in seeds.demonstrations]
    prompts: dict = {}
    for s in slots:
        prompts[f"chat|{s.id}"] = s.chat(0)
        shown = [*s.examples, *(d for d in demos if d not in s.examples)][:LIST_EXAMPLES]
        prompts[f"continue|{s.id}"] = list_prompt(f"{s.topic} ({s.domain})", shown)
    sampling = SamplingParams(temperature=section.temperature, top_p=section.top_p,
                              max_new_tokens=section.max_new_tokens, seed=seed + 1)  # fmt: skip
    start = time.perf_counter()
    with ray_for_run(config.ray):
        completions = complete(prompts, config.policy, config.engine, sampling, label="writers")
    seconds = time.perf_counter() - start

    exclude = [p.text for p in held_out_prompts(config.data, seed)]
    out = {"config": config_name, "generator": config.policy.label, "slots": len(slots),
           "seconds_model_writers": round(seconds, 1), "writers": {}}  # fmt: skip
    for writer in WRITERS:
        dedup, excluded = make_deduplicator(section, seeds, exclude)
        reasons: Counter[str] = Counter()
        texts: dict[str, str] = {}
        if writer == "template":
            texts, failed = fill_templates(slots, seeds.instruction_templates, dedup, excluded)
            reasons.update(failed.values())
        for s in slots if writer != "template" else ():
            completion = completions.get(f"{writer}|{s.id}", "")
            if writer == "chat":
                text, why = check_instruction(completion, s.references, section.min_topic_overlap)
            else:
                text, why = usable_request(
                    completion, s.references, continued=True,
                    min_overlap=section.min_topic_overlap, copy_threshold=section.dedup.threshold,
                    cut=s.id in completions.cut,
                )  # fmt: skip
            if text is not None and not dedup.filter([text])[0].keep:
                text, why = None, "duplicate"
            if text is None:
                reasons[why] += 1
            else:
                texts[s.id] = text
        topic_words = {s.id: content_words(s.topic) for s in slots}
        faithful = [t for k, t in texts.items()
                    if len(topic_words[k] & content_words(t)) >= len(topic_words[k]) / 2]  # fmt: skip
        n = len(slots)
        out["writers"][writer] = {
            "usable": len(texts), "usable_ci95": rate_interval(len(texts), n),
            "faithful": len(faithful), "faithful_ci95": rate_interval(len(faithful), n),
            "dropped": dict(reasons), "examples": list(texts.values())[:6],
        }  # fmt: skip
    return out


def _share(count: int, n: int, ci: list[float]) -> str:
    return f"{100 * count / n:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--per-topic", type=int, default=2, help="slots per topic")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_args()
    result = measure(args.config, args.per_topic, args.overrides)
    n = result["slots"]
    print(f"{n} slots, {result['generator']}, model writers {result['seconds_model_writers']} s")
    print(f"{'writer':<9} {'usable':>20} {'faithful to the topic':>22}  dropped")
    for writer, w in result["writers"].items():
        print(f"{writer:<9} {_share(w['usable'], n, w['usable_ci95']):>20} "
              f"{_share(w['faithful'], n, w['faithful_ci95']):>22}  {w['dropped']}")  # fmt: skip
        for example in w["examples"][:3]:
            print(f"          e.g. {example[:110]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
