"""Numbers as the report shows them (``67.5% [52.0, 79.9]``, ``+7.5 pts``, ``3.2 min``).

Shared by the HTML page (``context.py``) and the terminal tables (``tables.py``) so both print a
number the same way. Every function returns plain text; the HTML template escapes it.
"""

from __future__ import annotations

from typing import Any


def text(value: Any, limit: int | None = None) -> str:
    """``value`` as text (``None`` as empty), cut to ``limit`` characters with a `` […]`` mark."""
    out = "" if value is None else str(value)
    if limit is not None and len(out) > limit:
        out = out[:limit] + " […]"
    return out


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def pct_ci(value: float | None, interval: list[float] | None) -> str:
    """A rate with its 95% interval: ``67.5% [52.0, 79.9]``."""
    if value is None or not interval:
        return pct(value)
    return f"{pct(value)} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"


def gain(paired: dict[str, Any] | None) -> str:
    """A paired gain in points, its 95% interval and McNemar's p: ``+7.5 [-2.5, +17.5] p=0.18``."""
    if not paired:
        return "-"
    low, high = paired["interval"]
    return (
        f"{100 * paired['gain']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] "
        f"p={paired['p_value']:.2g}"
    )


def score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def kappa(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def count(value: Any) -> str:
    return "-" if value is None else f"{value:,}"


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def delta(row: dict[str, Any]) -> str:
    """A headline row's change: points for a rate, the raw difference for a score."""
    if row["delta"] is None:
        return "-"
    if row["unit"] == "rate":
        return f"{row['delta_points']:+.1f} pts"
    return f"{row['delta']:+.3f}"
