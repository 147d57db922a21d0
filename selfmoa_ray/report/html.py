"""The run report: ``metrics.json``, ``metrics.csv``, ``plots/*.png`` and a self-contained ``report.html``.

:func:`write_report` collects the run (``collect.py``), draws its plots with matplotlib's
object API (``Figure`` renders through Agg: no display, no pyplot global state), and writes every
file atomically. The HTML page embeds the PNGs as base64 and has no external assets or scripts;
every piece of text from the run (prompts, responses, category names) goes through
``html.escape``.

Sections: headline (baseline against the final policy, deltas in points), metrics per policy,
data efficiency (human-written items, generated prompts, pairs, tokens, wall time), failures per
category, harmful safety per category, wall time per stage, and example prompts answered by the
baseline and by the final policy (verdicts that changed first). The final policy is the loop's
last accepted one (``loop.final_policy`` in the manifest), else the last evaluated.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path
from typing import Any

from selfmoa_ray.report.collect import (
    BASELINE,
    BENIGN_SPLIT,
    HARMFUL_SPLIT,
    STAGE_ORDER,
    ReportError,
    collect_run,
)
from selfmoa_ray.rundir import atomic_write, write_json

CSV_COLUMNS = (
    "policy",
    "iteration",
    "harmful_safety",
    "harmful_string_refusal",
    "harmful_strict_refusal",
    "benign_over_refusal",
    "benign_string_refusal",
    "benign_strict_refusal",
    "benign_helpfulness",
    "pairs",
    "prompts",
    "tokens",
    "seconds",
)
TEXT_LIMIT = 600
EXAMPLE_COLUMNS = [
    "id",
    "text",
    "category",
    "split",
    "sample_index",
    "response",
    "safety",
    "refusal",
]


# --------------------------------------------------------------------------- rows and numbers


def policy_row(policy: dict[str, Any]) -> dict[str, Any]:
    """One policy as the flat row of ``metrics.csv``."""
    harmful, benign, data = policy.get("harmful") or {}, policy.get("benign") or {}, policy["data"]
    return {
        "policy": policy["name"],
        "iteration": policy["iteration"],
        "harmful_safety": harmful.get("safety_rate"),
        "harmful_string_refusal": harmful.get("string_refusal_rate"),
        "harmful_strict_refusal": harmful.get("strict_refusal_rate"),
        "benign_over_refusal": benign.get("over_refusal"),
        "benign_string_refusal": benign.get("string_over_refusal"),
        "benign_strict_refusal": benign.get("strict_over_refusal"),
        "benign_helpfulness": benign.get("helpfulness"),
        "pairs": data.get("pairs"),
        "prompts": data.get("prompts"),
        "tokens": data.get("tokens"),
        "seconds": data.get("seconds"),
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _pct_ci(value: float | None, interval: list[float] | None) -> str:
    """A rate with its 95% interval: ``67.5% [52.0, 79.9]``."""
    if value is None or not interval:
        return _pct(value)
    return f"{_pct(value)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def _gain(gain: dict[str, Any] | None) -> str:
    """A paired gain in points, its 95% interval and McNemar's p: ``+7.5 [-2.5, +17.5] p=0.18``."""
    if not gain:
        return "-"
    low, high = gain["interval"]
    return (
        f"{100 * gain['gain']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] p={gain['p_value']:.2g}"
    )


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _delta(row: dict[str, Any]) -> str:
    if row["delta"] is None:
        return "-"
    if row["unit"] == "rate":
        return f"{row['delta_points']:+.1f} pts"
    return f"{row['delta']:+.3f}"


# --------------------------------------------------------------------------- plots


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_safety(collected: dict[str, Any]) -> bytes:
    """(a) harmful safety and benign over-refusal per policy, by the judge and the string matcher,
    with the judge's 95% intervals as error bars."""
    policies = collected["policies"]
    names = [p["name"] for p in policies]
    x = list(range(len(policies)))
    series = [
        ("harmful", "safety_rate", "harmful safety (judge)", "tab:green", "-"),
        ("harmful", "string_refusal_rate", "harmful refusal (string matcher)", "tab:green", "--"),
        ("benign", "over_refusal", "benign over-refusal (judge)", "tab:red", "-"),
        ("benign", "string_over_refusal", "benign over-refusal (string matcher)", "tab:red", "--"),
    ]
    fig = _figure()
    ax = fig.subplots()
    for split, key, label, color, style in series:
        values = [(p.get(split) or {}).get(key) for p in policies]
        points = [(i, v) for i, v in zip(x, values, strict=True) if v is not None]
        if points:
            ax.plot(*zip(*points, strict=True), style, marker="o", color=color, label=label)
        bars = [
            (i, v, ((policies[i].get(split) or {}).get("intervals") or {}).get(key))
            for i, v in points
        ]
        bars = [(i, v, ci) for i, v, ci in bars if ci and style == "-"]
        if bars:
            ax.errorbar(
                [i for i, _, _ in bars],
                [v for _, v, _ in bars],
                fmt="none",
                ecolor=color,
                capsize=4,
                alpha=0.6,
                yerr=[[v - ci[0] for _, v, ci in bars], [ci[1] - v for _, v, ci in bars]],
            )
    ax.set_xticks(x, names)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("rate")
    ax.set_title("Held-out safety and over-refusal per policy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def plot_tradeoff(collected: dict[str, Any]) -> bytes:
    """(b) harmful safety against benign over-refusal and against benign helpfulness."""
    policies = collected["policies"]
    fig = _figure(9.0, 4.0)
    axes = fig.subplots(1, 2)
    for ax, key, xlabel in (
        (axes[0], "over_refusal", "benign over-refusal (judge)  <- better"),
        (axes[1], "helpfulness", "benign helpfulness  better ->"),
    ):
        points = [
            (
                p["name"],
                (p.get("benign") or {}).get(key),
                (p.get("harmful") or {}).get("safety_rate"),
            )
            for p in policies
        ]
        points = [(n, x, y) for n, x, y in points if x is not None and y is not None]
        if points:
            ax.plot([x for _, x, _ in points], [y for _, _, y in points], color="0.7", zorder=1)
            ax.scatter(
                [x for _, x, _ in points],
                [y for _, _, y in points],
                c=range(len(points)),
                cmap="viridis",
                zorder=2,
            )
            for name, px, py in points:
                ax.annotate(name, (px, py), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.margins(0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("harmful safety (judge)  better ->")
        ax.grid(alpha=0.3)
    fig.suptitle("Safety / helpfulness trade-off, one point per policy")
    return _png(fig)


def plot_frontier(collected: dict[str, Any]) -> bytes:
    """(c) the frontier the loop must climb: refusal of held-out attacks (strict matcher) against
    over-refusal of held-out benign prompts (judge), one point per policy with 95% intervals."""
    points = []
    for p in collected["policies"]:
        harmful, benign = p.get("harmful") or {}, p.get("benign") or {}
        x, y = benign.get("over_refusal"), harmful.get("strict_refusal_rate")
        if x is not None and y is not None:
            xci = (benign.get("intervals") or {}).get("over_refusal") or [x, x]
            yci = (harmful.get("intervals") or {}).get("strict_refusal_rate") or [y, y]
            points.append((p["name"], x, y, xci, yci))
    fig = _figure(6.0, 4.5)
    ax = fig.subplots()
    if points:
        xs, ys = [pt[1] for pt in points], [pt[2] for pt in points]
        ax.plot(xs, ys, color="0.7", zorder=1)
        ax.errorbar(
            xs, ys, fmt="none", ecolor="0.5", capsize=3, alpha=0.7, zorder=1,
            xerr=[[x - ci[0] for _, x, _, ci, _ in points], [ci[1] - x for _, x, _, ci, _ in points]],
            yerr=[[y - ci[0] for _, _, y, _, ci in points], [ci[1] - y for _, _, y, _, ci in points]],
        )  # fmt: skip
        ax.scatter(xs, ys, c=range(len(points)), cmap="viridis", zorder=2)
        for name, x, y, _, _ in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlim(left=-0.02)
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("benign over-refusal (judge)  <- better")
    ax.set_ylabel("held-out attacks refused (strict)  better ->")
    ax.set_title("Refusing attacks without refusing the rest, one point per policy")
    ax.grid(alpha=0.3)
    return _png(fig)


def plot_failures(collected: dict[str, Any]) -> bytes:
    """(c) share of attack prompts with an unsafe answer, per category, one bar per iteration."""
    iterations = [it for it in collected["iterations"] if it["failures_by_category"]]
    categories = sorted({c for it in iterations for c in it["failures_by_category"]})
    fig = _figure(min(14.0, max(7.0, 0.35 * len(categories) * max(1, len(iterations)) + 2)), 4.0)
    ax = fig.subplots()
    width = 0.8 / max(1, len(iterations))
    for j, it in enumerate(iterations):
        rates = [(it["failures_by_category"].get(c) or {}).get("rate") or 0.0 for c in categories]
        xs = [i + (j - (len(iterations) - 1) / 2) * width for i in range(len(categories))]
        ax.bar(xs, rates, width=width, label=it["name"])
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.03)
    ax.set_ylabel("failure rate (attacks with an unsafe answer)")
    ax.set_title("Successful attacks per category and iteration")
    if iterations:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no failures stage yet", ha="center", transform=ax.transAxes)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_vault(collected: dict[str, Any]) -> bytes:
    """(d) the regression vault: the share of every attack found so far that still succeeds
    against each iteration's policy, with its 95% interval."""
    points = [(it["name"], it["vault"]) for it in collected["iterations"] if it.get("vault")]
    points = [(name, v) for name, v in points if v.get("attacks")]
    fig = _figure(7.0, 3.5)
    ax = fig.subplots()
    if points:
        x = list(range(len(points)))
        rates = [v["success_rate"] for _, v in points]
        low = [r - v["interval"][0] for r, (_, v) in zip(rates, points, strict=True)]
        high = [v["interval"][1] - r for r, (_, v) in zip(rates, points, strict=True)]
        ax.errorbar(x, rates, yerr=[low, high], marker="o", capsize=4, color="tab:purple")
        for i, (_, v) in enumerate(points):
            ax.annotate(
                f"{v['still_succeed']}/{v['attacks']}",
                (i, rates[i]),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
            )
        ax.set_xticks(x, [name for name, _ in points])
    else:
        ax.text(0.5, 0.5, "no vault yet", ha="center", transform=ax.transAxes)
    ax.set_ylim(-0.03, 1.03)
    ax.set_ylabel("old attacks that still succeed")
    ax.set_title("Regression vault (training-side attacks, not held-out)")
    ax.grid(alpha=0.3)
    return _png(fig)


def _seconds_by_group(collected: dict[str, Any]) -> tuple[list[str], list[str], dict]:
    groups: list[str] = []
    table: dict[tuple[str, str], float] = {}
    for row in collected["stages"]:
        if row["group"] not in groups:
            groups.append(row["group"])
        key = (row["group"], row["kind"])
        table[key] = table.get(key, 0.0) + row["seconds"]
    order = [BASELINE] + [it["name"] for it in collected["iterations"]]
    groups = [g for g in order if g in groups] + [g for g in groups if g not in order]
    kinds = sorted(
        {k for _, k in table},
        key=lambda k: (STAGE_ORDER.index(k) if k in STAGE_ORDER else len(STAGE_ORDER), k),
    )
    return groups, kinds, table


def plot_time(collected: dict[str, Any]) -> bytes:
    """(d) wall time per stage, stacked per iteration."""
    groups, kinds, table = _seconds_by_group(collected)
    fig = _figure()
    ax = fig.subplots()
    bottom = [0.0] * len(groups)
    for kind in kinds:
        values = [table.get((g, kind), 0.0) for g in groups]
        ax.bar(range(len(groups)), values, bottom=bottom, label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("wall time (s)")
    ax.set_title("Wall time per stage")
    if kinds:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


PLOTS = {
    "safety": plot_safety,
    "vault": plot_vault,
    "tradeoff": plot_tradeoff,
    "frontier": plot_frontier,
    "failures": plot_failures,
    "time": plot_time,
}


# --------------------------------------------------------------------------- examples


def _read_eval(path: Path) -> dict[str, dict[str, Any]]:
    """``eval_responses.parquet`` keyed by prompt id (the first sample of each)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:
        raise ReportError(f"cannot read {path}: {err}") from err
    columns = [c for c in EXAMPLE_COLUMNS if c in table.column_names]
    rows = {}
    for row in table.select(columns).to_pylist():
        if row.get("sample_index", 0) == 0 or row["id"] not in rows:
            rows.setdefault(row["id"], row)
    return rows


def pick_examples(
    root: Path, collected: dict[str, Any], harmful: int = 4, benign: int = 1
) -> list[dict[str, Any]]:
    """Prompts answered by the first and the final policy (the headline's), matched by id.

    Harmful prompts whose verdict changed come first (unsafe -> safe, then safe -> unsafe); if
    none changed, unchanged harmful ones stand in. Then benign ones, a changed refusal first.
    """
    policies = collected["policies"]
    if len(policies) < 2:
        return []
    first, last = policies[0]["name"], collected["headline"]["after"]
    if first == last:
        return []
    before_path = root / first / "eval_responses.parquet"
    after_path = root / last / "eval_responses.parquet"
    if not before_path.exists() or not after_path.exists():
        return []
    threshold = float(collected["run"].get("unsafe_threshold") or 0.5)
    before, after = _read_eval(before_path), _read_eval(after_path)

    def verdict(row: dict[str, Any]) -> str:
        return "safe" if float(row.get("safety", 1.0)) >= threshold else "unsafe"

    pairs = [(before[i], after[i]) for i in sorted(before) if i in after]
    harm = [(b, a) for b, a in pairs if b.get("split") == HARMFUL_SPLIT]
    fixed = [(b, a) for b, a in harm if verdict(b) == "unsafe" and verdict(a) == "safe"]
    broke = [(b, a) for b, a in harm if verdict(b) == "safe" and verdict(a) == "unsafe"]
    # Keep one slot for a regression when there is one: the report shows both directions.
    n_fixed = min(len(fixed), harmful - min(len(broke), 1))
    n_broke = min(len(broke), harmful - n_fixed)
    picked = fixed[:n_fixed] + broke[:n_broke] or harm[:2]
    chosen = [(b, a, f"{verdict(b)} -> {verdict(a)}") for b, a in picked]
    ben = [(b, a) for b, a in pairs if b.get("split") == BENIGN_SPLIT]
    ben.sort(key=lambda ba: bool(ba[0].get("refusal")) == bool(ba[1].get("refusal")))
    for b, a in ben[:benign]:
        r_b = "refused" if b.get("refusal") else "answered"
        r_a = "refused" if a.get("refusal") else "answered"
        chosen.append((b, a, f"benign: {r_b} -> {r_a}"))
    return [
        {
            "id": b["id"],
            "split": b.get("split"),
            "category": b.get("category"),
            "change": change,
            "prompt": b.get("text", ""),
            "before": {
                "policy": first,
                "response": b.get("response", ""),
                "safety": b.get("safety"),
            },
            "after": {"policy": last, "response": a.get("response", ""), "safety": a.get("safety")},
        }
        for b, a, change in chosen
    ]


# --------------------------------------------------------------------------- HTML


def _e(value: Any, limit: int | None = None) -> str:
    text = "" if value is None else str(value)
    if limit is not None and len(text) > limit:
        text = text[:limit] + " […]"
    return html.escape(text)


def _table(headers: list[str] | None, rows: list[list[str]], cls: str = "") -> str:
    """Headers are escaped here; cells must already be escaped (or built from numbers)."""
    head = ""
    if headers:
        head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>\n" for row in rows)
    attr = f' class="{cls}"' if cls else ""
    return f"<table{attr}>{head}<tbody>{body}</tbody></table>\n"


def _img(pngs: dict[str, bytes], name: str, alt: str) -> str:
    data = base64.b64encode(pngs[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: right; vertical-align: top; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 0.5rem 0 1.5rem; }
.meta td, .meta th { text-align: left; }
.example { border: 1px solid #ddd; border-radius: 6px; padding: 0.6rem 1rem; margin: 1rem 0; }
.example pre { white-space: pre-wrap; background: #f8f8f8; padding: 0.5rem; margin: 0.3rem 0; }
.small { color: #666; font-size: 0.85rem; }
"""


def _section_headline(collected: dict[str, Any]) -> str:
    head = collected["headline"]
    if not head:
        return "<p>No policy has been evaluated yet.</p>"

    def shown(row: dict[str, Any], which: str) -> str:
        if row["unit"] != "rate":
            return _score(row[which])
        return _pct_ci(row[which], row.get(f"{which}_interval"))

    rows = [
        [_e(r["label"]), shown(r, "before"), shown(r, "after"), _delta(r), _gain(r.get("paired"))]
        for r in head["rows"]
    ]
    headers = [
        "metric",
        head["before"],
        head["after"],
        "change",
        "paired change, pts [95% interval] and McNemar p",
    ]
    note = (
        "<p class='small'>Rates with their 95% Wilson intervals. The paired change compares the "
        "two policies prompt by prompt (bootstrap interval over prompts; McNemar's exact test): "
        "a change whose interval holds 0 is inside the noise.</p>"
    )
    return _table(headers, rows) + note


def _section_policies(collected: dict[str, Any]) -> str:
    rows = []
    for p in collected["policies"]:
        r = policy_row(p)
        harmful, benign = p.get("harmful") or {}, p.get("benign") or {}
        hci, bci = harmful.get("intervals") or {}, benign.get("intervals") or {}
        rows.append(
            [
                _e(r["policy"]),
                _pct_ci(r["harmful_safety"], hci.get("safety_rate")),
                _pct_ci(r["harmful_string_refusal"], hci.get("string_refusal_rate")),
                _pct_ci(r["harmful_strict_refusal"], hci.get("strict_refusal_rate")),
                _pct_ci(r["benign_over_refusal"], bci.get("over_refusal")),
                _pct_ci(r["benign_string_refusal"], bci.get("string_over_refusal")),
                _pct_ci(r["benign_strict_refusal"], bci.get("strict_over_refusal")),
                _score(r["benign_helpfulness"]),
                _count(r["pairs"]),
                _count(r["tokens"]),
                _secs(r["seconds"]),
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
    return _table(headers, rows) + "<p class='small'>Rates with their 95% Wilson intervals.</p>"


def _section_other_splits(collected: dict[str, Any]) -> str:
    rows = [
        [
            _e(p["name"]),
            _e(split),
            _count(m.get("responses")),
            _pct(m.get("safety_rate")),
            _pct(m.get("refusal_rate")),
            _pct(m.get("string_refusal_rate")),
            _score(m.get("helpfulness")),
        ]
        for p in collected["policies"]
        for split, m in sorted(p["other_splits"].items())
    ]
    if not rows:
        return ""
    headers = ["policy", "split", "n", "safety", "refusal", "refusal (string)", "helpfulness"]
    return "<h3>Other evaluated prompt sets</h3>" + _table(headers, rows)


def _section_data(collected: dict[str, Any]) -> str:
    totals = collected["totals"]
    rows = []
    for it in collected["iterations"]:
        dropped = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(it["pairs_dropped"].items()))
        rows.append(
            [
                _e(it["name"]),
                _count(it["prompts"]),
                _count(it["benign_prompts"]),
                _count(it["failed_prompts"]),
                _count(it["pairs"]),
                dropped or "-",
                _count(it["sample_tokens"]),
                _count(it["eval_tokens"]),
                _secs(it["seconds"]),
                "yes" if it["trained"] else "no",
            ]
        )
    rows.append(
        [
            "<b>total</b>",
            _count(totals["prompts"]),
            _count(totals["benign_prompts"]),
            _count(totals["failed_prompts"]),
            _count(totals["pairs"]),
            "",
            _count(totals["sample_tokens"]),
            _count(totals["eval_tokens"]),
            _secs(totals["seconds"]),
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
    human = totals["human_items"]
    intro = (
        f"<p>Human-written items: <b>{_count(human)}</b>. Total tokens generated: "
        f"<b>{_count(totals['tokens'])}</b> (sampling and evaluation, baseline included). "
        f"Total wall time: <b>{_secs(totals['seconds'])}</b>.</p>"
    )
    return intro + _table(headers, rows)


def _section_pt_yield(collected: dict[str, Any]) -> str:
    """PT-ALIGN's yield per step and per domain (empty for the other recipes)."""
    out = []
    for it in collected["iterations"]:
        found = it.get("pt_yield")
        if not found:
            continue
        steps = [[_e(s["step"]), _count(s["count"]), _e(s["notes"]),
                  ", ".join(f"{_e(k)}: {v}" for k, v in s["dropped"].items()) or "-"]
                 for s in found["steps"]]  # fmt: skip
        domains = [[_e(d), _count(v.get("instructions")), _count(v.get("kept"))]
                   for d, v in found["by_domain"].items()]  # fmt: skip
        out.append(
            f"<h3>PT-ALIGN yield ({_e(it['name'])})</h3>"
            + _table(["step", "count", "from", "dropped (why)"], steps)
            + _table(["domain", "instructions", "kept triples"], domains)
        )
    return "".join(out)


def _section_failures(collected: dict[str, Any]) -> str:
    iterations = [it for it in collected["iterations"] if it["failures_by_category"]]
    if not iterations:
        return "<p>No failures stage has finished yet.</p>"
    categories = sorted({c for it in iterations for c in it["failures_by_category"]})
    rows = []
    for cat in categories:
        cells = [_e(cat)]
        for it in iterations:
            m = it["failures_by_category"].get(cat)
            cells.append("-" if not m else f"{m['failed']}/{m['prompts']} ({_pct(m['rate'])})")
        rows.append(cells)
    return _table(["category", *[it["name"] for it in iterations]], rows)


def _section_vault(collected: dict[str, Any]) -> str:
    iterations = [it for it in collected["iterations"] if it.get("vault")]
    if not iterations:
        return "<p>No vault stage has finished yet.</p>"
    rows = [
        [
            _e(it["name"]),
            _count(it["vault"]["attacks"]),
            _count(it["vault"]["new"]),
            _pct_ci(it["vault"]["success_rate"], it["vault"]["interval"]),
        ]
        for it in iterations
    ]
    note = (
        "<p class='small'>Every attack that succeeded in any iteration, answered again (greedy) "
        "by each new policy. These prompts come from the loop's own red team and trained its "
        "pairs: a fall here shows the policy stopped falling for its own attacks, not that it "
        "generalises (the held-out sets above say that).</p>"
    )
    return (
        _table(
            [
                "policy",
                "attacks in the vault",
                "new this iteration",
                "still succeed [95% interval]",
            ],
            rows,
        )
        + note
    )


def _section_redteam(collected: dict[str, Any]) -> str:
    """What the red team wrote, how new it was, and which attack styles worked."""
    rows, styles = [], {}
    for it in collected["iterations"]:
        rt = it.get("redteam") or {}
        if any(v is not None for v in rt.values()):
            writers = ", ".join(f"{_e(k)}: {v}" for k, v in sorted((rt["by_writer"] or {}).items()))
            rows.append(
                [
                    _e(it["name"]),
                    _e(rt.get("writer") or "-"),
                    _pct(rt.get("generated_share")),
                    _pct(rt.get("off_topic_share")),
                    _score(rt.get("novelty")),
                    _score(rt.get("novelty_generated")),
                    writers or "-",
                ]
            )
        for style, m in (it.get("success_by_style") or {}).items():
            styles.setdefault(style, {})[it["name"]] = m
    if not rows:
        return "<p>No red-team stage has finished yet.</p>"
    headers = ["iteration", "writer", "generated (not seed)", "off topic", "novelty",
               "novelty of generated", "rows per writer"]  # fmt: skip
    out = _table(headers, rows)
    names = [it["name"] for it in collected["iterations"]]
    if styles:
        table = [
            [_e(style)]
            + [
                "-" if (m := per.get(n)) is None
                else f"{m['succeeded']}/{m['prompts']} = {_pct_ci(m['rate'], m.get('ci95'))}"
                for n in names
            ]
            for style, per in sorted(styles.items())
        ]  # fmt: skip
        out += "<h3>Attack success per style</h3>" + _table(["style", *map(_e, names)], table)
    note = (
        "<p class='small'>Generated: the share of written attacks the generator wrote (the rest "
        "fell back to a human seed). Novelty: 1 - the highest character 5-gram Jaccard with any "
        "human seed (0: a seed as it is). Attack success: the share of a style's attacks with at "
        "least one unsafe bare answer, with its 95% interval.</p>"
    )
    return out + note


def _section_training(collected: dict[str, Any]) -> str:
    """Did each iteration learn its pairs, and which epoch did it keep (training/selection.py)."""
    rows = []
    for it in collected["iterations"]:
        train = it.get("train")
        if not train:
            continue
        by_split = it.get("pairs_by_split") or {}
        split_text = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(by_split.items())) or "-"
        kept = train.get("kept_epoch")
        val = train.get("val_attack_refusal")
        rows.append(
            [
                _e(it["name"]),
                _count(it["pairs"]),
                split_text,
                _count(train.get("steps")),
                "last" if kept is None else _count(int(kept)),
                _pct(train.get("pairs_accuracy")),
                _score(train.get("pairs_reward_margin")),
                "-" if val is None else f"{_pct(val)} / {_pct(train.get('val_benign_refusal'))}",
                _e(train.get("validation_trace") or "-"),
            ]
        )
    if not rows:
        return "<p>No iteration has trained yet.</p>"
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
    note = (
        "<p class='small'>Pairs learned: the share of the iteration's training pairs whose "
        "implicit reward prefers the chosen answer under the policy it kept. The epoch is kept on "
        "validation prompts the red team never uses (seed attacks and benign prompts), never on "
        "the held-out sets: the most attacks refused, each point of benign refusal above the "
        "start costing <code>train.over_refusal_weight</code> points.</p>"
    )
    return _table(headers, rows) + note


def _kappa(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _section_judges(collected: dict[str, Any]) -> str:
    """Each judge's accuracy on human labels held back from it, and how far the two judges agree
    on every policy's held-out answers: a judge that disagrees with humans is visible here."""
    parts = []
    calibration = collected.get("judges")
    if calibration:
        rows = []
        for name, label in (
            ("training_judge", "training (judge)"),
            ("audit_judge", "audit (evaluate.judge)"),
        ):
            c = calibration.get(name) or {}
            kinds = ", ".join(
                e["kind"] + (f" ({e['model']})" if e.get("model") else "")
                for e in c.get("evaluators", [])
            )
            cells = [_e(label), _e(kinds), _e(c.get("held_back_split"))]
            for task in ("safety", "objective", "harm", "refusal"):
                m = c.get(task) or {}
                cells.append(
                    f"{_pct_ci(m.get('accuracy'), m.get('interval'))} ({m.get('rows', 0)})"
                )
            rows.append(cells)
        parts.append(
            _table(
                [
                    "judge",
                    "evaluators",
                    "scored on the split",
                    "safety accuracy",
                    "objective rows",
                    "harm rows",
                    "refusal accuracy",
                ],
                rows,
            )
        )
        parts.append(
            "<p class='small'>Accuracy against PyRIT's human labels on the half of the rows "
            "held back from each judge (95% Wilson intervals, rows in brackets). All those "
            "objectives are harmful: this says how a judge tells harmful compliance from the "
            "rest, not how it treats benign prompts.</p>"
        )
    rows = []
    for p in collected["policies"]:
        for split in ("harmful", "benign"):
            agreement = (p.get(split) or {}).get("judge_agreement")
            audit = (p.get(split) or {}).get("safety_rate")
            if agreement:
                rows.append(
                    [
                        _e(p["name"]),
                        split,
                        _kappa(agreement.get("safety_kappa")),
                        _pct(agreement.get("safety_agreement")),
                        _kappa(agreement.get("refusal_kappa")),
                        _pct(agreement.get("training_judge_safety_rate")),
                        _pct(audit),
                    ]
                )
    if rows:
        parts.append(
            _table(
                [
                    "policy",
                    "held-out split",
                    "safety kappa",
                    "safety agreement",
                    "refusal kappa",
                    "safe by the training judge",
                    "safe by the audit judge",
                ],
                rows,
            )
        )
        parts.append(
            "<p class='small'>Cohen's kappa between the training judge and the audit judge on the "
            "same held-out answers. Held-out rates and the loop's acceptance use the audit judge; "
            "a policy that pleases the training judge more than the audit judge is learning its "
            "grader.</p>"
        )
    return "".join(parts) or "<p>No judge calibration in this run.</p>"


def _section_cost(collected: dict[str, Any]) -> str:
    """What the run spent, per iteration and in all, and per point of held-out safety gained."""
    cost = collected.get("cost")
    if not cost:
        return "<p>No cost recorded.</p>"
    rows = [
        [_e(it["name"]), _secs(it["seconds"]), _secs(it.get("cpu_seconds"))]
        + [_count(it.get(key)) for key in ("tokens", "prompts", "pairs")]
        for it in collected["iterations"]
    ]
    rows.append(
        ["whole run", _secs(cost["wall_seconds"]), _secs(cost["cpu_seconds"])]
        + [_count(cost[key]) for key in ("generated_tokens", "prompts", "pairs")]
    )
    table = _table(["", "wall time", "CPU time", "generated tokens", "prompts", "pairs"], rows)
    per_point = cost.get("per_point")
    gain = cost.get("safety_gain_points")
    if per_point:
        summary = (
            f"Held-out harmful safety gained {gain:+.1f} points (paired, start to final policy): "
            f"per point, {_secs(per_point['wall_seconds'])} of wall time, "
            f"{_secs(per_point['cpu_seconds'])} of CPU time, "
            f"{per_point['gpu_seconds_reserved']:.1f} reserved GPU-seconds and "
            f"{per_point['generated_tokens']:,.0f} generated tokens."
        )
    else:
        summary = "The run gained no held-out safety, so it has no cost per point."
    extra = (
        f" Human input: {_count(cost.get('human_items'))} human-written items, "
        f"{_count(cost.get('human_labels'))} human labels behind the training judge; "
        f"{cost['gpu_seconds_reserved']:.1f} reserved GPU-seconds in all."
    )
    how = (
        "<p class='small'>CPU time: this machine's process tree (the driver, Ray and its "
        "workers), sampled during each stage. GPU-seconds: the GPUs each stage's actors "
        "reserve, times its wall time (a reservation, not a measurement).</p>"
    )
    return table + f"<p>{_e(summary + extra)}</p>" + how


def _section_categories(collected: dict[str, Any]) -> str:
    policies = [p for p in collected["policies"] if p.get("harmful")]
    if not policies:
        return "<p>No harmful split evaluated.</p>"
    categories = sorted({c for p in policies for c in p["harmful"]["by_category"]})
    rows = []
    for cat in categories:
        values = [(p["harmful"]["by_category"].get(cat) or {}).get("safety_rate") for p in policies]
        n = (policies[-1]["harmful"]["by_category"].get(cat) or {}).get("responses")
        delta = (
            f"{100 * (values[-1] - values[0]):+.1f} pts"
            if len(values) > 1 and values[0] is not None and values[-1] is not None
            else "-"
        )
        rows.append([_e(cat), _count(n), *[_pct(v) for v in values], delta])
    headers = ["category", "n", *[p["name"] for p in policies], "change"]
    return _table(headers, rows)


def _section_time(collected: dict[str, Any]) -> str:
    groups, kinds, table = _seconds_by_group(collected)
    if not groups:
        return "<p>No stage has run yet.</p>"
    rows = []
    for group in groups:
        cells = [_secs(table[(group, k)]) if (group, k) in table else "" for k in kinds]
        total = sum(v for (g, _), v in table.items() if g == group)
        rows.append([_e(group), *cells, _secs(total)])
    return _table(["", *kinds, "total"], rows)


def _section_examples(examples: list[dict[str, Any]]) -> str:
    if not examples:
        return "<p>Examples need two evaluated policies with their responses.</p>"
    parts = []
    for ex in examples:
        b, a = ex["before"], ex["after"]
        parts.append(
            f'<div class="example"><p><b>{_e(ex["change"])}</b> '
            f'<span class="small">[{_e(ex["split"])} / {_e(ex["category"])} / {_e(ex["id"])}]</span></p>'
            f"<p>Prompt:</p><pre>{_e(ex['prompt'], TEXT_LIMIT)}</pre>"
            f"<p>{_e(b['policy'])} (safety {_score(b['safety'])}):</p>"
            f"<pre>{_e(b['response'], TEXT_LIMIT)}</pre>"
            f"<p>{_e(a['policy'])} (safety {_score(a['safety'])}):</p>"
            f"<pre>{_e(a['response'], TEXT_LIMIT)}</pre></div>"
        )
    return "".join(parts)


def render_html(
    collected: dict[str, Any], pngs: dict[str, bytes], examples: list[dict[str, Any]]
) -> str:
    run, loop = collected["run"], collected["loop"]
    meta_rows = [
        ["run", _e(run["name"])],
        ["run id", _e(run["run_id"])],
        ["recipe", _e(loop.get("recipe", "selfmoa"))],
        ["created", _e(run["created"])],
        ["config fingerprint", _e(run["config_fingerprint"])],
        ["start policy", _e(run["policy_model"])],
        ["status", _e(run["status"])],
        [
            "iterations",
            f"{_e(loop.get('iterations_done', len(collected['iterations'])))} done of "
            f"{_e(loop.get('iterations_planned', '?'))} planned",
        ],
    ]
    if loop.get("stopped_early"):
        meta_rows.append(["stopped early", _e(loop.get("stop_reason") or "yes")])
    elif loop.get("stop_reason"):
        meta_rows.append(["last iteration", _e(loop["stop_reason"])])
    elif loop.get("final_policy"):
        meta_rows.append(["stopped", "every planned iteration ran and was accepted"])
    body = [
        f"<h1>selfmoa-ray report: {_e(run['name'])}</h1>",
        _table(None, meta_rows, "meta"),
        "<h2>Before and after</h2>",
        _section_headline(collected),
        "<h2>Every policy</h2>",
        _section_policies(collected),
        _section_other_splits(collected),
        _img(pngs, "safety", "safety and over-refusal per policy"),
        _img(pngs, "tradeoff", "safety / helpfulness trade-off"),
        _img(pngs, "frontier", "attack refusal against over-refusal per policy"),
        "<h2>Judges</h2>",
        _section_judges(collected),
        "<h2>Data and supervision efficiency</h2>",
        _section_data(collected),
        _section_pt_yield(collected),
        "<h2>Red team</h2>",
        _section_redteam(collected),
        "<h2>Training</h2>",
        _section_training(collected),
        "<h2>Successful attacks per category</h2>",
        _section_failures(collected),
        _img(pngs, "failures", "failure rate per category and iteration"),
        "<h2>Regression vault</h2>",
        _section_vault(collected),
        _img(pngs, "vault", "old attacks that still succeed per iteration"),
        "<h2>Harmful safety per category</h2>",
        _section_categories(collected),
        "<h2>What it cost</h2>",
        _section_cost(collected),
        "<h2>Wall time per stage</h2>",
        _section_time(collected),
        _img(pngs, "time", "wall time per stage"),
        "<h2>Examples</h2>",
        _section_examples(examples),
        '<p class="small">Safety: share of held-out responses the audit judge scores safe (attack '
        "success rate = 1 - safety). Refusal (classic): the AdvBench/HarmBench refusal-prefix "
        "matcher; refusal (strict): a refusing opening the answer does not go back on; neither "
        "needs a model. Over-refusal: refusal rate on benign-but-sensitive prompts. "
        "Helpfulness: mean judge helpfulness on benign prompts.</p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>selfmoa-ray report: {_e(run['name'])}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


# --------------------------------------------------------------------------- writing


def write_report(root: Path | str) -> dict[str, Any]:
    """Write ``metrics.json``, ``metrics.csv``, ``plots/*.png`` and ``report.html`` in ``root``.

    Returns the collected metrics (what ``metrics.json`` holds).
    """
    root = Path(root)
    collected = collect_run(root)
    write_json(root / "metrics.json", collected)
    with atomic_write(root / "metrics.csv") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for policy in collected["policies"]:
            writer.writerow(policy_row(policy))
    pngs = {name: draw(collected) for name, draw in PLOTS.items()}
    for name, data in pngs.items():
        with atomic_write(root / "plots" / f"{name}.png", "wb") as fh:
            fh.write(data)
    page = render_html(collected, pngs, pick_examples(root, collected))
    with atomic_write(root / "report.html", "wb") as fh:
        fh.write(page.encode("utf-8"))
    return collected


def print_before_after(collected: dict[str, Any]) -> None:
    """A compact terminal table: every policy's held-out numbers, with the change since the first."""
    policies = collected["policies"]
    if not policies:
        print("no policy evaluated yet")
        return
    header = (
        f"{'policy':<10} {'safety':>7} {'(str)':>7} {'over-ref':>8} {'(str)':>7} "
        f"{'helpful':>8}   {'chg safety':>10} {'chg over-ref':>12}"
    )
    print(header)
    print("-" * len(header))
    first = policy_row(policies[0])

    def diff(r: dict[str, Any], key: str) -> str:
        if r is first or r[key] is None or first[key] is None:
            return ""
        return f"{100 * (r[key] - first[key]):+.1f}pts"

    for policy in policies:
        r = first if policy is policies[0] else policy_row(policy)
        print(
            f"{r['policy']:<10} {_pct(r['harmful_safety']):>7} {_pct(r['harmful_string_refusal']):>7} "
            f"{_pct(r['benign_over_refusal']):>8} {_pct(r['benign_string_refusal']):>7} "
            f"{_score(r['benign_helpfulness']):>8}   {diff(r, 'harmful_safety'):>10} "
            f"{diff(r, 'benign_over_refusal'):>12}"
        )
    print(
        "safety = harmful prompts judged safe; (str) = refusal-prefix matcher; "
        "over-ref = refusals of benign prompts"
    )
    head = collected.get("headline") or {}
    paired = {r["metric"]: r.get("paired") for r in head.get("rows", [])}
    shown = [
        (label, paired.get(metric))
        for metric, label in (
            ("harmful/safety_rate", "safety"),
            ("benign/over_refusal", "over-refusal"),
        )
    ]
    if any(gain for _, gain in shown):
        print(
            f"paired change {head['before']} -> {head['after']}, pts [95% interval]: "
            + "; ".join(f"{label} {_gain(gain)}" for label, gain in shown if gain)
        )
