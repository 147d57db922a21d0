"""Red-team rounds of a run, measured: how attacks were written and which ones succeeded.

Reads a run folder of ``selfmoa redteam`` (or of the loop) and prints, per round: the share of
written slots the generator wrote (the rest fell back to the human seed) and the share that went
off topic, the novelty of the attacks against the human seeds (mean 1 - highest character 5-gram
Jaccard), and the attack success rate per style, writer and category, each with its 95% Wilson
interval. Runs made before attack styles existed (``style`` then held the writer, and jailbreak
templates were the only style) are read the same way.

    .venv/bin/python benchmarks/redteam_rounds.py --run /tmp/rt/new [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pyarrow.parquet as pq


def rounds(run: Path) -> list[dict]:
    from selfmoa_ray.config import load_config
    from selfmoa_ray.report.stats import rate_interval
    from selfmoa_ray.sources.prompts import load_prompts
    from selfmoa_ray.stages.attack_stats import novelty, success_by

    config = load_config(str(run / "config.yaml"))
    seeds = [r.text for spec in config.data.seeds for r in load_prompts(spec)]
    manifest = json.loads((run / "manifest.json").read_text())
    out = []
    for it in sorted(p.name for p in run.glob("iter_*") if (p / "failures.parquet").exists()):
        rows = pq.read_table(run / it / "prompts.parquet").to_pylist()
        if rows and "writer" not in rows[0]:  # before attack styles
            for r in rows:
                r["writer"] = r["style"]
                r["style"] = "benign" if r["split"] == "benign" else (
                    "jailbreak" if r["template"] else "plain")  # fmt: skip
        won = set(pq.read_table(run / it / "failures.parquet", columns=["id"])["id"].to_pylist())
        attacks = [r for r in rows if r["split"] != "benign"]
        summary = manifest["stages"][f"{it}/redteam"]["summary"]
        written = summary["generated"] + summary["seed_fallback"]
        k = sum(r["id"] in won for r in attacks)
        out.append({
            "round": it,
            "attacks": len(attacks),
            "written": written,
            "generated_share": round(summary["generated"] / written, 4) if written else None,
            "generated_ci95": rate_interval(summary["generated"], written),
            "off_topic_share": round(summary["off_topic"] / written, 4) if written else None,
            "resent": sum(r["writer"] == "mutate" for r in attacks),
            "novelty": novelty([r["base_text"] for r in attacks], seeds),
            "novelty_generated": novelty(
                [r["base_text"] for r in attacks if r["writer"] not in ("seed", "mutate")], seeds
            ),
            "attack_success": round(k / len(attacks), 4) if attacks else None,
            "attack_success_ci95": rate_interval(k, len(attacks)),
            "by_style": success_by(attacks, won, "style"),
            "by_writer": success_by(attacks, won, "writer"),
            "by_category": success_by(attacks, won, "category"),
            "redteam_seconds": manifest["stages"][f"{it}/redteam"].get("seconds"),
        })  # fmt: skip
    return out


def _pct(rate: float | None, ci: list[float]) -> str:
    if rate is None:
        return "-"
    return f"{100 * rate:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    result = rounds(args.run)
    for r in result:
        print(f"{r['round']}: {r['attacks']} attacks ({r['resent']} re-sent), generated "
              f"{_pct(r['generated_share'], r['generated_ci95'])} of {r['written']} written, off "
              f"topic {100 * (r['off_topic_share'] or 0):.1f}%, novelty {r['novelty']} "
              f"(generated {r['novelty_generated']}), attack success "
              f"{_pct(r['attack_success'], r['attack_success_ci95'])}")  # fmt: skip
        for key in ("by_style", "by_writer"):
            cells = [f"{v} {s['succeeded']}/{s['prompts']} {_pct(s['rate'], s['ci95'])}"
                     for v, s in r[key].items()]  # fmt: skip
            print(f"  {key}: " + "; ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
