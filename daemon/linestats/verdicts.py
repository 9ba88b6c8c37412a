"""Operator verdicts (confirmed / false alarm) from the recordings index, read-only.

The recorder owns `recordings.sqlite3`; statistics and what-if only read it, so a missing
file (recorder disabled, nothing flagged yet) is simply no verdicts.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Verdict:
    """One judged recording: which classes it flagged, their scores and the operator's status."""

    camera: str
    ts: float
    flagged: tuple[str, ...]
    presence: dict[str, float]
    status: str


def judged(state_dir: Path, camera: str | None = None, since: float | None = None) -> list[Verdict]:
    """Every confirmed or false-alarm recording (optionally of one camera, captured since `since`)."""
    path = state_dir / "recordings.sqlite3"
    if not path.is_file():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        query = ("SELECT camera, capture_ts, flagged, presence, status FROM recordings "
                 "WHERE status IN ('confirmed', 'false-alarm')")
        args: list[object] = []
        if camera is not None:
            query += " AND camera = ?"
            args.append(camera)
        if since is not None:
            query += " AND capture_ts >= ?"
            args.append(since)
        rows = db.execute(query, args).fetchall()
    except sqlite3.Error:
        return []
    finally:
        db.close()
    out = []
    for cam, ts, flagged, presence, status in rows:
        try:
            out.append(Verdict(cam, float(ts), tuple(json.loads(flagged)), dict(json.loads(presence)), status))
        except (ValueError, TypeError):
            continue
    return out
