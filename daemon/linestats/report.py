"""Statistics per camera, class and shift or hour, with p-chart control limits.

The defect rate of a period is flagged frames / frames. Its control limits are those of a
p-chart over the whole window shown: p̄ = all flagged / all frames of that camera and class,
limits p̄ ± 3·sqrt(p̄(1-p̄)/n) with n the period's frames, so a small hour gets wide limits and
an hour outside them is marked out of control.
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from typing import Any

from daemon.linestats.shifts import ShiftCalendar
from daemon.linestats.verdicts import Verdict

FIELDS = ("camera", "class", "period", "frames", "flagged", "alerts", "confirmed", "false_alarms", "defect_rate",
          "center", "lcl", "ucl", "out_of_control", "mean_area")


class StatsError(ValueError):
    """A statistics request that cannot be answered as asked; the message says what would be right."""


def parse_since(text: str) -> float:
    """'24h', '7d', '90m', '3600s' (or a bare number of hours) → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text))
    if not match:
        raise StatsError(f"--since {text!r}: give a duration like 24h, 7d, 90m or 3600s")
    value = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 3600}[match.group(2)]
    if not 0 < value <= 3650 * 86400:
        raise StatsError(f"--since {text!r}: must be more than 0 and at most 10 years")
    return value


def p_chart(flagged: int, frames: int, center: float) -> tuple[float, float, bool]:
    """(lcl, ucl, out of control) of one period's defect rate around the centre line."""
    if frames <= 0:
        return 0.0, 1.0, False
    sigma = math.sqrt(center * (1 - center) / frames)
    lcl, ucl = max(0.0, center - 3 * sigma), min(1.0, center + 3 * sigma)
    rate = flagged / frames
    return lcl, ucl, rate > ucl or rate < lcl


def build_stats(minutes: list[dict[str, Any]], verdicts: list[Verdict], calendar: ShiftCalendar,
                by: str = "hour") -> list[dict[str, Any]]:
    """One row per camera, class and period (hour or shift), oldest first."""
    if by not in ("hour", "shift"):
        raise StatsError(f"--by {by!r}: use hour or shift")
    period = calendar.hour if by == "hour" else calendar.shift
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    order: list[tuple[str, str, str]] = []

    def row(camera: str, name: str, label: str) -> dict[str, Any]:
        key = (camera, name, label)
        if key not in rows:
            rows[key] = {"camera": camera, "class": name, "period": label, "frames": 0, "flagged": 0, "alerts": 0,
                         "confirmed": 0, "false_alarms": 0, "area_sum": 0.0}
            order.append(key)
        return rows[key]

    for minute in minutes:
        target = row(minute["camera"], minute["class"], period(minute["minute"] * 60.0))
        for key in ("frames", "flagged", "alerts"):
            target[key] += minute[key]
        target["area_sum"] += minute["mean_area"] * minute["frames"]
    for verdict in verdicts:
        for name in verdict.flagged:
            key = "confirmed" if verdict.status == "confirmed" else "false_alarms"
            row(verdict.camera, name, period(verdict.ts))[key] += 1
    totals: dict[tuple[str, str], list[int]] = {}
    for (camera, name, _), values in rows.items():
        total = totals.setdefault((camera, name), [0, 0])
        total[0] += values["flagged"]
        total[1] += values["frames"]
    out = []
    for key in sorted(order, key=lambda k: (k[0], k[1], order.index(k))):
        values = rows[key]
        flagged, frames = totals[key[:2]]
        center = flagged / frames if frames else 0.0
        lcl, ucl, out_of_control = p_chart(values["flagged"], values["frames"], center)
        area = values.pop("area_sum")
        out.append({**values, "defect_rate": values["flagged"] / values["frames"] if values["frames"] else None,
                    "center": center, "lcl": lcl, "ucl": ucl, "out_of_control": out_of_control,
                    "mean_area": area / values["frames"] if values["frames"] else None})
    return out


def to_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV with a header line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row[k]) for k in FIELDS})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    return f"{value:.6f}" if isinstance(value, float) else ("" if value is None else value)


def to_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for the terminal; '!' marks an out-of-control period."""
    if not rows:
        return "no statistics in this window (is the daemon running, and stats.enabled true?)"
    lines = [f"{'camera':<12} {'class':<12} {'period':<24} {'frames':>7} {'flagged':>7} {'alerts':>6} "
             f"{'confirm':>7} {'false':>6} {'rate':>7} {'limits':>15}"]
    for r in rows:
        rate = "-" if r["defect_rate"] is None else f"{r['defect_rate']:.2%}"
        mark = " !" if r["out_of_control"] else ""
        lines.append(f"{r['camera']:<12} {r['class']:<12} {r['period']:<24} {r['frames']:>7} {r['flagged']:>7} "
                     f"{r['alerts']:>6} {r['confirmed']:>7} {r['false_alarms']:>6} {rate:>7} "
                     f"{r['lcl']:>6.2%}-{r['ucl']:<7.2%}{mark}")
    return "\n".join(lines)


def window_start(since_s: float, now: float | None = None) -> float:
    """The epoch time `since_s` seconds ago."""
    return (time.time() if now is None else now) - since_s
