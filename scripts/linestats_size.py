"""Measure the summary store's size per camera-day: fill one day of minutes for one camera with 3
classes (as the publisher's writer would, in 2 s batches) and report the file size, for a typical
presence distribution and for a worst case that spreads every minute over many bins.

    python scripts/linestats_size.py [--fps 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.linestats.store import Bucket, SummaryStore, score_bin  # noqa: E402

CLASSES = ("scratch", "dent", "crack")


def fill(path: Path, fps: float, spread: str, days: int = 1, cameras: int = 1) -> int:
    """Write `days` of minutes for `cameras` cameras; returns the file size in bytes after a checkpoint."""
    rng = np.random.default_rng(0)
    per_minute = int(round(fps * 60))
    store = SummaryStore(path)
    start = 1_780_000_000 // 60
    for minute in range(start, start + days * 1440):
        buckets = {}
        for cam in range(cameras):
            for k, name in enumerate(CLASSES):
                if spread == "typical":
                    scores = np.clip(rng.normal(0.25 + 0.1 * k, 0.03, per_minute), 0, 1)
                else:
                    scores = rng.uniform(0, 1, per_minute)
                bucket = Bucket(frames=per_minute, flagged=int((scores > 0.5).sum()), alerts=int(rng.integers(0, 2)),
                                area_sum=float(rng.uniform(0, per_minute * 0.05)))
                for score in scores:
                    bucket.hist[score_bin(float(score))] += 1
                buckets[(f"cam{cam}", name, minute)] = bucket
        store.merge(buckets)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return path.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fps", type=float, default=2.0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    result = {"fps": args.fps, "classes": len(CLASSES), "minutes_per_day": 1440}
    with tempfile.TemporaryDirectory() as tmp:
        for spread in ("typical", "worst"):
            size = fill(Path(tmp) / f"{spread}.sqlite3", args.fps, spread)
            result[spread] = {"bytes_per_camera_day": size, "bytes_per_row": round(size / (1440 * len(CLASSES)), 1),
                              "projected_4_cameras_30_days_mb": round(size * 4 * 30 / 1e6, 1)}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
