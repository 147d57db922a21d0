"""Recipe: red-team only, an audit of a model that is never trained (docs/design.md 3).

    for t in 1..redteam.rounds:
        iter_t/redteam    prompts.parquet       attacks aimed at round t-1's successful attacks
        iter_t/sample     responses.parquet/    the target answers each attack sampling.n times
        iter_t/judge      scored.parquet/       evaluators: safety, refusal, helpfulness
        iter_t/failures   failures.parquet      the attacks that succeeded: next round's few-shots
    redteam.json                                attack success rate per round and category, and
                                                the benign prompts the target refused

The target is ``policy``: local weights, or any OpenAI-compatible endpoint (``policy.endpoint``),
so a deployed model, ours or another vendor's, is audited without its weights. Attacks are written
by ``redteam.generator`` (by default the target itself; a vendor model that refuses to rephrase an
attack falls back to the human seed). The rounds are the loop's first four stages
(:func:`~selfmoa_ray.recipes.selfmoa.attack_round`) in the same folders, without guided samples:
an audit measures the model as deployed. Stages are skipped when done, so ``--resume`` continues.
"""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from selfmoa_ray.config import Config
from selfmoa_ray.layout import Iteration
from selfmoa_ray.recipes.selfmoa import attack_round
from selfmoa_ray.report.metrics import summarize
from selfmoa_ray.rundir import RunDir, write_json
from selfmoa_ray.schema import BENIGN_SPLIT

SUMMARY = "redteam.json"


def run_redteam(config: Config, run: RunDir) -> dict[str, Any]:
    """Run (or resume) ``redteam.rounds`` rounds against ``config.policy``; returns the summary
    written to ``redteam.json``."""
    rounds = []
    for t in range(1, config.redteam.rounds + 1):
        it = Iteration(t)
        failures = attack_round(config, run, it, config.policy, guided=False)
        scored = pq.read_table(run.path(it.io("judge")["out"])).to_pylist()
        splits = summarize(scored, config.judge.unsafe_threshold)
        rounds.append(
            {
                "round": t,
                "attacks": failures["attack_prompts"],
                "successful_attacks": failures["failed"],
                "attack_success_rate": failures["failure_rate"],
                "by_category": failures["by_category"],
                "answers": splits,
            }
        )
    summary = {"target": config.policy.label, "rounds": rounds}
    run.manifest["redteam"] = {k: v for k, v in summary.items() if k != "rounds"}
    run.save()
    write_json(run.path(SUMMARY), summary)
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """A short table for the terminal: one line per round, then the worst categories."""
    header = f"{'round':>5} {'attacks':>8} {'succeeded':>10} {'rate':>7} {'benign refused':>15}"
    lines = [f"target: {summary['target']}", header]
    for r in summary["rounds"]:
        benign = r["answers"].get(BENIGN_SPLIT, {})
        refused = f"{100 * benign['refusal_rate']:.1f}%" if benign else "-"
        lines.append(
            f"{r['round']:>5} {r['attacks']:>8} {r['successful_attacks']:>10} "
            f"{100 * r['attack_success_rate']:>6.1f}% {refused:>15}"
        )
    last = summary["rounds"][-1]["by_category"] if summary["rounds"] else {}
    worst = sorted(last.items(), key=lambda kv: -kv[1]["rate"])[:5]
    if worst:
        shares = [f"{c} {100 * s['rate']:.0f}% ({s['failed']}/{s['prompts']})" for c, s in worst]
        lines.append("worst categories (last round): " + ", ".join(shares))
    return lines
