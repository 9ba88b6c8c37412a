"""What a recording carries besides the flagged frame: the overlays just before and after it,
the k-of-n window of flags that led to it, and the config version it was judged under.

The recorder feeds every `overlay.<camera>` message here; a short ring per camera gives
the frames before a flagged one, and the next overlays of that camera are added to its
recording folder as they arrive (each file written whole and renamed into place).
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class SeenFrame:
    """One overlay the recorder saw."""

    seq: int
    session: str
    flagged: list[str]
    jpeg: bytes


@dataclass
class PendingAfter:
    """A recording still waiting for its following frames."""

    folder: Path
    seq: int
    written: int = 0


def config_version(path: str) -> str:
    """Short SHA-256 of the config file's bytes (which config judged a frame); '' when unreadable."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:12]
    except OSError:
        return ""


class ContextFrames:
    """Per-camera rings of recent overlays and the recordings waiting for frames after them."""

    def __init__(self, before: int, after: int, window_n: int) -> None:
        self.before = before
        self.after = after
        self.window_n = window_n
        self.rings: dict[str, deque[SeenFrame]] = {}
        self.pending: dict[str, list[PendingAfter]] = {}

    def overlay(self, header: dict[str, Any], jpeg: bytes) -> int:
        """Remember one overlay; add it to recordings waiting for later frames. Returns files written."""
        camera, seq = str(header["camera"]), int(header["seq"])
        ring = self.rings.setdefault(camera, deque(maxlen=max(self.before + 1, self.window_n)))
        ring.append(SeenFrame(seq, str(header.get("capture_ts")), list(header.get("flagged", [])), jpeg))
        written = 0
        waiting = self.pending.get(camera, [])
        for item in waiting:
            if seq > item.seq and item.written < self.after:
                item.written += 1
                if self._write(item.folder, f"after-{item.written}.jpg", jpeg):
                    written += 1
        self.pending[camera] = [p for p in waiting if p.written < self.after and p.folder.is_dir()]
        return written

    def before_files(self, camera: str, seq: int) -> dict[str, bytes]:
        """before-1.jpg (the frame just before) … before-N.jpg for a flagged frame."""
        earlier = [f for f in self.rings.get(camera, ()) if f.seq < seq][-self.before:] if self.before else []
        return {f"before-{i}.jpg": frame.jpeg for i, frame in enumerate(reversed(earlier), start=1)}

    def window(self, camera: str, seq: int, k: int) -> dict[str, Any]:
        """The last n frames' flags up to this one: why the k-of-n rule fired (or not)."""
        frames = [{"seq": f.seq, "flagged": f.flagged} for f in self.rings.get(camera, ()) if f.seq <= seq][-self.window_n:]
        return {"k": k, "n": self.window_n, "frames": frames}

    def expect_after(self, camera: str, seq: int, folder: Path) -> None:
        """Collect the next `after` overlays of this camera into the recording's folder."""
        if self.after:
            self.pending.setdefault(camera, []).append(PendingAfter(folder, seq))

    @staticmethod
    def _write(folder: Path, name: str, data: bytes) -> bool:
        """Whole file or nothing (a recording deleted by retention meanwhile is skipped)."""
        staging = folder / f".{name}.tmp"
        try:
            staging.write_bytes(data)
            os.replace(staging, folder / name)
        except OSError:
            staging.unlink(missing_ok=True)
            return False
        return True
