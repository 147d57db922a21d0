"""The report page's content as plain data: what ``templates/report.html.j2`` shows, section by
section, every number already formatted (``formats.py``) and every text already shortened.

Nothing here is HTML: values are plain strings the template escapes. A table is
``{"headers": [...] or None, "rows": [[cell, ...], ...], "cls": ""}``; a cell is a string, or
``{"b": text}`` for bold text. A section with nothing to show is ``None`` (the template then says
why).
"""

from __future__ import annotations

import base64
from typing import Any

from selfmoa_ray.report.csvfile import policy_row
from selfmoa_ray.report.formats import (
    count,
    delta,
    gain,
    kappa,
    pct,
    pct_ci,
    score,
    secs,
    text,
)
from selfmoa_ray.report.plots import seconds_by_group

TEXT_LIMIT = 600
Table = dict[str, Any]
# Figures in page order: (name in PLOTS, alt text).
IMAGES = (
    ("safety", "safety and over-refusal per policy"),
    ("tradeoff", "safety / helpfulness trade-off"),
    ("frontier", "attack refusal against over-refusal per policy"),
    ("failures", "failure rate per category and iteration"),
    ("vault", "old attacks that still succeed per iteration"),
    ("time", "wall time per stage"),
)


def _table(headers: list[str] | None, rows: list[list[Any]], cls: str = "") -> Table:
    return {"headers": headers, "rows": rows, "cls": cls}


def _pairs(counts: dict[str, Any], *, sort: bool = True) -> str:
    """``{"a": 1, "b": 2}`` as ``a: 1, b: 2`` (sorted by key unless ``sort`` is false)."""
    items = sorted(counts.items()) if sort else counts.items()
    return ", ".join(f"{k}: {v}" for k, v in items)


def meta(collected: dict[str, Any]) -> Table:
    run, loop = collected["run"], collected["loop"]
    rows = [
        ["run", text(run["name"])],
        ["run id", text(run["run_id"])],
        ["recipe", text(loop.get("recipe", "selfmoa"))],
        ["created", text(run["created"])],
        ["config fingerprint", text(run["config_fingerprint"])],
        ["start policy", text(run["policy_model"])],
        ["status", text(run["status"])],
        [
            "iterations",
            f"{text(loop.get('iterations_done', len(collected['iterations'])))} done of "
            f"{text(loop.get('iterations_planned', '?'))} planned",
        ],
    ]
    if loop.get("stopped_early"):
        rows.append(["stopped early", text(loop.get("stop_reason") or "yes")])
    elif loop.get("stop_reason"):
        rows.append(["last iteration", text(loop["stop_reason"])])
    elif loop.get("final_policy"):
        rows.append(["stopped", "every planned iteration ran and was accepted"])
    return _table(None, rows, "meta")


def headline(collected: dict[str, Any]) -> Table | None:
    head = collected["headline"]
    if not head:
        return None

    def shown(row: dict[str, Any], which: str) -> str:
        if row["unit"] != "rate":
            return score(row[which])
        return pct_ci(row[which], row.get(f"{which}_interval"))

    rows = [
        [text(r["label"]), shown(r, "before"), shown(r, "after"), delta(r), gain(r.get("paired"))]
        for r in head["rows"]
    ]
    headers = [
        "metric",
        head["before"],
        head["after"],
        "change",
        "paired change, pts [95% interval] and McNemar p",
    ]
    return _table(headers, rows)


def policies(collected: dict[str, Any]) -> Table:
    rows = []
    for p in collected["policies"]:
        r = policy_row(p)
        harmful, benign = p.get("harmful") or {}, p.get("benign") or {}
        hci, bci = harmful.get("intervals") or {}, benign.get("intervals") or {}
        rows.append(
            [
                text(r["policy"]),
                pct_ci(r["harmful_safety"], hci.get("safety_rate")),
                pct_ci(r["harmful_string_refusal"], hci.get("string_refusal_rate")),
                pct_ci(r["harmful_strict_refusal"], hci.get("strict_refusal_rate")),
                pct_ci(r["benign_over_refusal"], bci.get("over_refusal")),
                pct_ci(r["benign_string_refusal"], bci.get("string_over_refusal")),
                pct_ci(r["benign_strict_refusal"], bci.get("strict_over_refusal")),
                score(r["benign_helpfulness"]),
                count(r["pairs"]),
                count(r["tokens"]),
                secs(r["seconds"]),
            ]
        )
    headers = [
        "policy",
        "harmful safety (judge)",
        "harmful refusal (classic)",
        "harmful refusal (strict)",
        "over-refusal (judge)",
        "over-refusal (classic)",
        "over-refusal (strict)",
        "helpfulness",
        "pairs",
        "tokens",
        "wall time",
    ]
    return _table(headers, rows)


def other_splits(collected: dict[str, Any]) -> Table | None:
    rows = [
        [
            text(p["name"]),
            text(split),
            count(m.get("responses")),
            pct(m.get("safety_rate")),
            pct(m.get("refusal_rate")),
            pct(m.get("string_refusal_rate")),
            score(m.get("helpfulness")),
        ]
        for p in collected["policies"]
        for split, m in sorted(p["other_splits"].items())
    ]
    if not rows:
        return None
    headers = ["policy", "split", "n", "safety", "refusal", "refusal (string)", "helpfulness"]
    return _table(headers, rows)


def judges(collected: dict[str, Any]) -> dict[str, Table | None]:
    """Each judge's accuracy on human labels held back from it (``calibration``), and how far the
    two judges agree on every policy's held-out answers (``agreement``)."""
    calibration = None
    found = collected.get("judges")
    if found:
        rows = []
        for name, label in (
            ("training_judge", "training (judge)"),
            ("audit_judge", "audit (evaluate.judge)"),
        ):
            c = found.get(name) or {}
            kinds = ", ".join(
                e["kind"] + (f" ({e['model']})" if e.get("model") else "")
                for e in c.get("evaluators", [])
            )
            cells = [label, kinds, text(c.get("held_back_split"))]
            for task in ("safety", "objective", "harm", "refusal"):
                m = c.get(task) or {}
                cells.append(f"{pct_ci(m.get('accuracy'), m.get('interval'))} ({m.get('rows', 0)})")
            rows.append(cells)
        headers = [
            "judge",
            "evaluators",
            "scored on the split",
            "safety accuracy",
            "objective rows",
            "harm rows",
            "refusal accuracy",
        ]
        calibration = _table(headers, rows)
    rows = []
    for p in collected["policies"]:
        for split in ("harmful", "benign"):
            agreement = (p.get(split) or {}).get("judge_agreement")
            audit = (p.get(split) or {}).get("safety_rate")
            if agreement:
                rows.append(
                    [
                        text(p["name"]),
                        split,
                        kappa(agreement.get("safety_kappa")),
                        pct(agreement.get("safety_agreement")),
                        kappa(agreement.get("refusal_kappa")),
                        pct(agreement.get("training_judge_safety_rate")),
                        pct(audit),
                    ]
                )
    headers = [
        "policy",
        "held-out split",
        "safety kappa",
        "safety agreement",
        "refusal kappa",
        "safe by the training judge",
        "safe by the audit judge",
    ]
    return {"calibration": calibration, "agreement": _table(headers, rows) if rows else None}


def data(collected: dict[str, Any]) -> dict[str, Any]:
    totals = collected["totals"]
    rows: list[list[Any]] = []
    for it in collected["iterations"]:
        rows.append(
            [
                text(it["name"]),
                count(it["prompts"]),
                count(it["benign_prompts"]),
                count(it["failed_prompts"]),
                count(it["pairs"]),
                _pairs(it["pairs_dropped"]) or "-",
                count(it["sample_tokens"]),
                count(it["eval_tokens"]),
                secs(it["seconds"]),
                "yes" if it["trained"] else "no",
            ]
        )
    rows.append(
        [
            {"b": "total"},
            count(totals["prompts"]),
            count(totals["benign_prompts"]),
            count(totals["failed_prompts"]),
            count(totals["pairs"]),
            "",
            count(totals["sample_tokens"]),
            count(totals["eval_tokens"]),
            secs(totals["seconds"]),
            "",
        ]
    )
    headers = [
        "iteration",
        "prompts generated",
        "benign mixed in",
        "successful attacks",
        "training examples (pairs or triples)",
        "dropped (why)",
        "tokens (sample)",
        "tokens (eval)",
        "wall time",
        "trained",
    ]
    return {
        "human_items": count(totals["human_items"]),
        "tokens": count(totals["tokens"]),
        "seconds": secs(totals["seconds"]),
        "table": _table(headers, rows),
    }


def pt_yield(collected: dict[str, Any]) -> list[dict[str, Any]]:
    """PT-ALIGN's yield per step and per domain (empty for the other recipes)."""
    out = []
    for it in collected["iterations"]:
        found = it.get("pt_yield")
        if not found:
            continue
        steps = [
            [
                text(s["step"]),
                count(s["count"]),
                text(s["notes"]),
                _pairs(s["dropped"], sort=False) or "-",
            ]
            for s in found["steps"]
        ]
        domains = [
            [text(d), count(v.get("instructions")), count(v.get("kept"))]
            for d, v in found["by_domain"].items()
        ]
        out.append(
            {
                "name": text(it["name"]),
                "steps": _table(["step", "count", "from", "dropped (why)"], steps),
                "domains": _table(["domain", "instructions", "kept triples"], domains),
            }
        )
    return out


def redteam(collected: dict[str, Any]) -> dict[str, Table | None] | None:
    """What the red team wrote, how new it was, and which attack styles worked."""
    rows, styles = [], {}
    for it in collected["iterations"]:
        rt = it.get("redteam") or {}
        if any(v is not None for v in rt.values()):
            rows.append(
                [
                    text(it["name"]),
                    text(rt.get("writer") or "-"),
                    pct(rt.get("generated_share")),
                    pct(rt.get("off_topic_share")),
                    score(rt.get("novelty")),
                    score(rt.get("novelty_generated")),
                    _pairs(rt["by_writer"] or {}) or "-",
                ]
            )
        for style, m in (it.get("success_by_style") or {}).items():
            styles.setdefault(style, {})[it["name"]] = m
    if not rows:
        return None
    headers = [
        "iteration",
        "writer",
        "generated (not seed)",
        "off topic",
        "novelty",
        "novelty of generated",
        "rows per writer",
    ]
    by_style = None
    if styles:
        names = [it["name"] for it in collected["iterations"]]

        def cell(m: dict[str, Any] | None) -> str:
            if m is None:
                return "-"
            return f"{m['succeeded']}/{m['prompts']} = {pct_ci(m['rate'], m.get('ci95'))}"

        table = [
            [text(style), *[cell(per.get(n)) for n in names]]
            for style, per in sorted(styles.items())
        ]
        by_style = _table(["style", *names], table)
    return {"table": _table(headers, rows), "styles": by_style}


def training(collected: dict[str, Any]) -> Table | None:
    """Did each iteration learn its pairs, and which epoch did it keep (training/selection.py)."""
    rows = []
    for it in collected["iterations"]:
        train = it.get("train")
        if not train:
            continue
        kept = train.get("kept_epoch")
        val = train.get("val_attack_refusal")
        rows.append(
            [
                text(it["name"]),
                count(it["pairs"]),
                _pairs(it.get("pairs_by_split") or {}) or "-",
                count(train.get("steps")),
                "last" if kept is None else count(int(kept)),
                pct(train.get("pairs_accuracy")),
                score(train.get("pairs_reward_margin")),
                "-" if val is None else f"{pct(val)} / {pct(train.get('val_benign_refusal'))}",
                text(train.get("validation_trace") or "-"),
            ]
        )
    if not rows:
        return None
    headers = [
        "iteration",
        "pairs",
        "pairs by split",
        "optimizer steps",
        "epoch kept",
        "pairs learned (chosen preferred)",
        "reward margin",
        "validation refusal: attacks / benign",
        "per epoch (epoch:attacks/benign)",
    ]
    return _table(headers, rows)


def failures(collected: dict[str, Any]) -> Table | None:
    iterations = [it for it in collected["iterations"] if it["failures_by_category"]]
    if not iterations:
        return None
    categories = sorted({c for it in iterations for c in it["failures_by_category"]})
    rows = []
    for cat in categories:
        cells = [text(cat)]
        for it in iterations:
            m = it["failures_by_category"].get(cat)
            cells.append("-" if not m else f"{m['failed']}/{m['prompts']} ({pct(m['rate'])})")
        rows.append(cells)
    return _table(["category", *[it["name"] for it in iterations]], rows)


def vault(collected: dict[str, Any]) -> Table | None:
    iterations = [it for it in collected["iterations"] if it.get("vault")]
    if not iterations:
        return None
    rows = [
        [
            text(it["name"]),
            count(it["vault"]["attacks"]),
            count(it["vault"]["new"]),
            pct_ci(it["vault"]["success_rate"], it["vault"]["interval"]),
        ]
        for it in iterations
    ]
    headers = [
        "policy",
        "attacks in the vault",
        "new this iteration",
        "still succeed [95% interval]",
    ]
    return _table(headers, rows)


def categories(collected: dict[str, Any]) -> Table | None:
    evaluated = [p for p in collected["policies"] if p.get("harmful")]
    if not evaluated:
        return None
    names = sorted({c for p in evaluated for c in p["harmful"]["by_category"]})
    rows = []
    for cat in names:
        values = [
            (p["harmful"]["by_category"].get(cat) or {}).get("safety_rate") for p in evaluated
        ]
        n = (evaluated[-1]["harmful"]["by_category"].get(cat) or {}).get("responses")
        change = (
            f"{100 * (values[-1] - values[0]):+.1f} pts"
            if len(values) > 1 and values[0] is not None and values[-1] is not None
            else "-"
        )
        rows.append([text(cat), count(n), *[pct(v) for v in values], change])
    return _table(["category", "n", *[p["name"] for p in evaluated], "change"], rows)


def cost(collected: dict[str, Any]) -> dict[str, Any] | None:
    """What the run spent, per iteration and in all, and per point of held-out safety gained."""
    spent = collected.get("cost")
    if not spent:
        return None
    rows = [
        [text(it["name"]), secs(it["seconds"]), secs(it.get("cpu_seconds"))]
        + [count(it.get(key)) for key in ("tokens", "prompts", "pairs")]
        for it in collected["iterations"]
    ]
    rows.append(
        ["whole run", secs(spent["wall_seconds"]), secs(spent["cpu_seconds"])]
        + [count(spent[key]) for key in ("generated_tokens", "prompts", "pairs")]
    )
    headers = ["", "wall time", "CPU time", "generated tokens", "prompts", "pairs"]
    per_point, gained = spent.get("per_point"), spent.get("safety_gain_points")
    if per_point:
        summary = (
            f"Held-out harmful safety gained {gained:+.1f} points (paired, start to final policy): "
            f"per point, {secs(per_point['wall_seconds'])} of wall time, "
            f"{secs(per_point['cpu_seconds'])} of CPU time, "
            f"{per_point['gpu_seconds_reserved']:.1f} reserved GPU-seconds and "
            f"{per_point['generated_tokens']:,.0f} generated tokens."
        )
    else:
        summary = "The run gained no held-out safety, so it has no cost per point."
    summary += (
        f" Human input: {count(spent.get('human_items'))} human-written items, "
        f"{count(spent.get('human_labels'))} human labels behind the training judge; "
        f"{spent['gpu_seconds_reserved']:.1f} reserved GPU-seconds in all."
    )
    return {"table": _table(headers, rows), "summary": summary}


def stage_time(collected: dict[str, Any]) -> Table | None:
    groups, kinds, seconds = seconds_by_group(collected)
    if not groups:
        return None
    rows = []
    for group in groups:
        cells = [secs(seconds[(group, k)]) if (group, k) in seconds else "" for k in kinds]
        total = sum(v for (g, _), v in seconds.items() if g == group)
        rows.append([text(group), *cells, secs(total)])
    return _table(["", *kinds, "total"], rows)


def examples(picked: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The picked examples (``examples.py``) with long prompts and answers cut to TEXT_LIMIT."""

    def side(answer: dict[str, Any]) -> dict[str, str]:
        return {
            "policy": text(answer["policy"]),
            "safety": score(answer["safety"]),
            "response": text(answer["response"], TEXT_LIMIT),
        }

    return [
        {
            "change": text(ex["change"]),
            "split": text(ex["split"]),
            "category": text(ex["category"]),
            "id": text(ex["id"]),
            "prompt": text(ex["prompt"], TEXT_LIMIT),
            "before": side(ex["before"]),
            "after": side(ex["after"]),
        }
        for ex in picked
    ]


def images(pngs: dict[str, bytes]) -> dict[str, dict[str, str]]:
    """Every figure as a base64 ``data:`` payload with its alt text, keyed by its PLOTS name."""
    return {
        name: {"data": base64.b64encode(pngs[name]).decode("ascii"), "alt": alt}
        for name, alt in IMAGES
    }


def build_context(
    collected: dict[str, Any], pngs: dict[str, bytes], picked: list[dict[str, Any]]
) -> dict[str, Any]:
    """Everything ``report.html.j2`` renders, as plain dicts, lists and strings."""
    return {
        "title": text(collected["run"]["name"]),
        "meta": meta(collected),
        "headline": headline(collected),
        "policies": policies(collected),
        "other_splits": other_splits(collected),
        "judges": judges(collected),
        "data": data(collected),
        "pt_yield": pt_yield(collected),
        "redteam": redteam(collected),
        "training": training(collected),
        "failures": failures(collected),
        "vault": vault(collected),
        "categories": categories(collected),
        "cost": cost(collected),
        "time": stage_time(collected),
        "examples": examples(picked),
        "images": images(pngs),
    }
