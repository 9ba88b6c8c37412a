"""What a different threshold would have done, from the per-minute histograms and the verdicts.

- Frames that would flag: exact for thresholds on the histogram grid (multiples of 1/BINS =
  0.01), because bins are right-closed and a frame flags when its score is > threshold; other
  thresholds are rounded to the grid.
- Alerts: the k-of-n debouncer with its cooldown is *replayed on the per-minute data*, not on
  the original frame sequence (which is not stored): each minute's frames are taken as evenly
  spaced over the minute with its flagged frames consecutive at its start. Defects come as
  runs (a part passing the camera), so this is close for real lines, but it is an estimate.
- Confirmed defects missed / false alarms avoided: recorded frames with a verdict whose score
  for the class is <= the candidate. Frames that never flagged were never recorded, so a lower
  threshold cannot reveal defects nobody saw; it shows only what would have flagged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from daemon.linestats.shifts import ShiftCalendar
from daemon.linestats.store import BINS, score_bin
from daemon.linestats.verdicts import Verdict

METHOD = {"frames": f"exact at thresholds on the 1/{BINS} grid (others rounded to it)",
          "alerts": "k-of-n replay on per-minute data (each minute's flagged frames taken as consecutive and "
                    "evenly spaced); an estimate, not an exact frame-by-frame replay",
          "verdicts": "recorded frames with a verdict whose score is <= the threshold"}
MAX_POINTS = 1001


class WhatIfError(ValueError):
    """A what-if request that cannot be answered as asked; the message says what would be right."""


def parse_range(text: str) -> list[float]:
    """'0.1:0.9:0.01' → [0.1, 0.11, ..., 0.9] (inclusive, on the 0.01 grid, within [0, 1])."""
    parts = str(text).split(":")
    try:
        start, stop, step = (float(p) for p in parts) if len(parts) == 3 else (None, None, None)
    except ValueError:
        start = None
    if start is None or not all(math.isfinite(v) for v in (start, stop, step)):
        raise WhatIfError(f"--range {text!r}: give start:stop:step, e.g. 0.1:0.9:0.01")
    if not (0.0 <= start <= stop <= 1.0) or step <= 0:
        raise WhatIfError(f"--range {text!r}: need 0 <= start <= stop <= 1 and step > 0")
    count = int(math.floor((stop - start) / step + 1e-9)) + 1
    if count > MAX_POINTS:
        raise WhatIfError(f"--range {text!r}: {count} thresholds; at most {MAX_POINTS}")
    return [round(start + i * step, 6) for i in range(count)]


def grid_index(threshold: float) -> int:
    """Bins >= this index hold the scores > threshold (threshold rounded to the 1/BINS grid)."""
    return int(round(threshold * BINS))


def above_counts(minutes: list[dict[str, Any]]) -> np.ndarray:
    """[minutes, BINS + 1]: column j holds how many frames of each minute score above j / BINS."""
    if not minutes:
        return np.zeros((0, BINS + 1), np.int64)
    hist = np.stack([m["hist"] for m in minutes])
    tail = np.zeros((len(minutes), BINS + 1), np.int64)
    tail[:, :BINS] = hist[:, ::-1].cumsum(axis=1)[:, ::-1]
    return tail


def replay_alerts(minutes: list[dict[str, Any]], flagged: np.ndarray, k: int, n: int, cooldown_s: float) -> int:
    """Alerts the k-of-n debouncer with cooldown raises on the per-minute sequence (see METHOD).

    Only minutes with flagged frames are visited; the unflagged frames between them are pushed
    into the window in one step (the window holds the last n frames' flags; [] = all unflagged)."""
    frames = np.fromiter((m["frames"] for m in minutes), np.int64, len(minutes))
    before = np.concatenate(([0], np.cumsum(frames)))
    window: list[bool] = []
    last: float | None = None
    alerts = 0
    previous = -1
    for index in np.flatnonzero(flagged):
        gap = int(before[index] - before[previous + 1])
        if gap:
            window = [] if gap >= n else (window + [False] * gap)[-n:]
        count, m = int(frames[index]), int(flagged[index])
        base, step = minutes[index]["minute"] * 60.0, 60.0 / count
        first = next((i for i in range(1, min(m, k) + 1) if sum((window + [True] * i)[-n:]) >= k), None)
        if first is not None:
            i = first
            while i <= m:
                ts = base + (i - 1) * step
                if last is None or ts - last >= cooldown_s:
                    alerts += 1
                    last = ts
                    i += 1
                else:
                    i = max(i + 1, int(math.ceil((last + cooldown_s - base) / step - 1e-9)) + 1)
        window = (window + [True] * min(m, n) + [False] * min(count - m, n))[-n:]
        previous = index
    return alerts


def what_if(minutes: list[dict[str, Any]], verdicts: list[Verdict], cls: str, thresholds: list[float],
            calendar: ShiftCalendar, k: int, n: int, cooldown_s: float) -> dict[str, Any]:
    """Per candidate threshold: frames that would flag (total and per shift), replayed alerts,
    confirmed defects missed and false alarms avoided; plus the histograms for the Thresholds page."""
    minutes = sorted(minutes, key=lambda m: m["minute"])
    shift_of = [calendar.shift(m["minute"] * 60.0).split(" ", 1)[1] for m in minutes]
    shift_names = list(dict.fromkeys(shift_of))
    confirmed = [v.presence.get(cls, 0.0) for v in verdicts if cls in v.flagged and v.status == "confirmed"]
    false_alarms = [v.presence.get(cls, 0.0) for v in verdicts if cls in v.flagged and v.status == "false-alarm"]
    total_frames = int(sum(m["frames"] for m in minutes))
    above = above_counts(minutes)
    rows = []
    for threshold in thresholds:
        flagged = above[:, grid_index(threshold)]
        per_shift = {name: 0 for name in shift_names}
        for name, count in zip(shift_of, flagged):
            per_shift[name] += int(count)
        grid = grid_index(threshold) / BINS
        rows.append({"threshold": threshold, "frames_flagged": int(flagged.sum()),
                     "flagged_rate": float(flagged.sum()) / total_frames if total_frames else None,
                     "per_shift": per_shift, "alerts": replay_alerts(minutes, flagged, k, n, cooldown_s),
                     "confirmed_missed": sum(1 for s in confirmed if s <= grid),
                     "false_alarms_avoided": sum(1 for s in false_alarms if s <= grid)})
    histogram = np.zeros(BINS, np.int64)
    for minute in minutes:
        histogram += minute["hist"]
    return {"class": cls, "frames": total_frames, "minutes": len(minutes),
            "from": minutes[0]["minute"] * 60.0 if minutes else None,
            "to": minutes[-1]["minute"] * 60.0 + 60.0 if minutes else None,
            "method": METHOD, "debounce": {"k": k, "n": n, "cooldown_s": cooldown_s},
            "histograms": {"bins": BINS, "all": histogram.tolist(), "confirmed": _binned(confirmed),
                           "false_alarm": _binned(false_alarms)},
            "actual_alerts": int(sum(m["alerts"] for m in minutes)),
            "rows": rows}


def _binned(scores: list[float]) -> list[int]:
    counts = np.zeros(BINS, np.int64)
    for score in scores:
        counts[score_bin(score)] += 1
    return counts.tolist()
