"""The run report: ``metrics.json``, ``metrics.csv``, ``plots/*.png`` and a self-contained ``report.html``.

:func:`write_report` collects the run (``collect.py``), draws its figures (``plots.py``), picks
example answers (``examples.py``) and writes every file atomically. :func:`render_html` turns the
page's plain context (``context.py``) into HTML with ``templates/report.html.j2``, rendered with
autoescape on: every piece of text from the run (prompts, responses, category names) is escaped
by the template, never by hand. The page embeds the PNGs as base64 and has no external assets or
scripts.

Sections: headline (baseline against the final policy, deltas in points), metrics per policy,
judges, data efficiency (human-written items, generated prompts, pairs, tokens, wall time), red
team, training, failures per category, regression vault, harmful safety per category, cost, wall
time per stage, and example prompts answered by the baseline and by the final policy (verdicts
that changed first). The final policy is the loop's last accepted one (``loop.final_policy`` in
the manifest), else the last evaluated.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jinja2

from selfmoa_ray.report.collect import collect_run
from selfmoa_ray.report.context import build_context
from selfmoa_ray.report.csvfile import write_metrics_csv
from selfmoa_ray.report.examples import pick_examples
from selfmoa_ray.report.plots import PLOTS
from selfmoa_ray.rundir import atomic_write, write_json

TEMPLATE = "report.html.j2"


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("selfmoa_ray.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render_html(
    collected: dict[str, Any], pngs: dict[str, bytes], examples: list[dict[str, Any]]
) -> str:
    """The report page for ``collected`` with its figures (PNG bytes by PLOTS name) and the
    examples :func:`~selfmoa_ray.report.examples.pick_examples` chose."""
    context = build_context(collected, pngs, examples)
    return _environment().get_template(TEMPLATE).render(context)


def write_report(root: Path | str) -> dict[str, Any]:
    """Write ``metrics.json``, ``metrics.csv``, ``plots/*.png`` and ``report.html`` in ``root``.

    Returns the collected metrics (what ``metrics.json`` holds).
    """
    root = Path(root)
    collected = collect_run(root)
    write_json(root / "metrics.json", collected)
    write_metrics_csv(root / "metrics.csv", collected["policies"])
    pngs = {name: draw(collected) for name, draw in PLOTS.items()}
    for name, data in pngs.items():
        with atomic_write(root / "plots" / f"{name}.png", "wb") as fh:
            fh.write(data)
    page = render_html(collected, pngs, pick_examples(root, collected))
    with atomic_write(root / "report.html", "wb") as fh:
        fh.write(page.encode("utf-8"))
    return collected
