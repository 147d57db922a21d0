"""The report's figures, drawn with matplotlib's object API and returned as PNG bytes.

``Figure`` renders through Agg: no display and no pyplot global state, so drawing is safe in any
process. :data:`PLOTS` names every figure ``write_report`` saves under ``plots/`` and embeds in
``report.html``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from selfmoa_ray.layout import BASELINE
from selfmoa_ray.report.collect import STAGE_ORDER

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float = 7.0, height: float = 4.0) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Figure) -> bytes:
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
            xs,
            ys,
            fmt="none",
            ecolor="0.5",
            capsize=3,
            alpha=0.7,
            zorder=1,
            xerr=[
                [x - ci[0] for _, x, _, ci, _ in points],
                [ci[1] - x for _, x, _, ci, _ in points],
            ],
            yerr=[
                [y - ci[0] for _, _, y, _, ci in points],
                [ci[1] - y for _, _, y, _, ci in points],
            ],
        )
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


def seconds_by_group(
    collected: dict[str, Any],
) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """Wall time summed per (group, stage kind): groups in loop order, kinds in stage order."""
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
    groups, kinds, table = seconds_by_group(collected)
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


PLOTS: dict[str, Callable[[dict[str, Any]], bytes]] = {
    "safety": plot_safety,
    "vault": plot_vault,
    "tradeoff": plot_tradeoff,
    "frontier": plot_frontier,
    "failures": plot_failures,
    "time": plot_time,
}
