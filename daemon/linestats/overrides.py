"""Live threshold overrides: set from the CLI, the console or calibration, applied by running workers.

The config file's thresholds stay the defaults. Overrides live in the state dir
(`thresholds/overrides.json`, replaced atomically) and win over them; every change is a line
in `thresholds/audit.jsonl` (who, when, old, new, reason), and `revert` undoes the latest
change not yet undone, as a change of its own. Writers take a file lock, so the CLI and the
console can change thresholds at the same moment. Workers notice a new file by its stat
(`OverrideWatcher`) and apply it to the next batch, without a restart.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from daemon.thresholds import thresholds_for
from daemon.config import CameraConfig, DaemonConfig

CHECK_EVERY_S = 0.5
MAX_REASON_CHARS = 500


class ThresholdError(ValueError):
    """A threshold change that cannot be applied; the message names what is wrong and what would be right."""


def overrides_dir(state_dir: Path) -> Path:
    """Where overrides and their audit live."""
    return state_dir / "thresholds"


def read_overrides(state_dir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """camera → class → {value, user, ts, reason}; {} when there are none or the file is unreadable."""
    try:
        data = json.loads((overrides_dir(state_dir) / "overrides.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def effective_thresholds(config: DaemonConfig, camera: CameraConfig,
                         overrides: dict[str, dict[str, dict[str, Any]]] | None = None) -> dict[str, tuple[float, str]]:
    """Each class's threshold and its source: override (state dir), config, calibration or default."""
    chosen = thresholds_for(config, camera)
    mine = (read_overrides(config.state_path) if overrides is None else overrides).get(camera.id, {})
    for name in camera.classes:
        entry = mine.get(name)
        if isinstance(entry, dict) and _valid(entry.get("value")):
            chosen[name] = (float(entry["value"]), "override")
    return chosen


def _valid(value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and 0.0 <= value <= 1.0


def check_value(value: Any) -> float:
    """A threshold as a float in [0, 1]; ThresholdError for NaN, infinities, text or out of range."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ThresholdError(f"threshold {value!r} is not a number; give a value between 0 and 1") from None
    if isinstance(value, bool) or not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ThresholdError(f"threshold {value!r} is outside [0, 1]; give a value between 0 and 1")
    return number


def check_target(config: DaemonConfig, camera_id: str, cls: str) -> CameraConfig:
    """The camera, after checking it and the class exist; the error names the known ones."""
    cameras = {c.id: c for c in config.cameras}
    if camera_id not in cameras:
        raise ThresholdError(f"unknown camera {camera_id!r} (known: {', '.join(cameras)})")
    camera = cameras[camera_id]
    if cls not in camera.classes:
        raise ThresholdError(f"unknown class {cls!r} for camera {camera_id} (known: {', '.join(camera.classes)})")
    return camera


class ThresholdBook:
    """Reads and changes the overrides of one daemon's state dir."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.root = overrides_dir(config.state_path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def show(self) -> list[dict[str, Any]]:
        """Every camera/class: the value in force, its source, the value without override, and the override."""
        overrides = read_overrides(self.config.state_path)
        rows = []
        for camera in self.config.cameras:
            base = thresholds_for(self.config, camera)
            live = effective_thresholds(self.config, camera, overrides)
            for name in camera.classes:
                entry = overrides.get(camera.id, {}).get(name)
                rows.append({"camera": camera.id, "class": name, "value": live[name][0], "source": live[name][1],
                             "default": base[name][0], "default_source": base[name][1],
                             "override": entry if live[name][1] == "override" else None})
        return rows

    def audit(self, camera: str | None = None, cls: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Newest audit entries first (optionally of one camera/class)."""
        entries = [e for e in self._entries() if (camera is None or e.get("camera") == camera)
                   and (cls is None or e.get("class") == cls)]
        return entries[::-1][:limit]

    def _entries(self) -> list[dict[str, Any]]:
        path = self.root / "audit.jsonl"
        if not path.is_file():
            return []
        entries = []
        for line in path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except ValueError:
                continue
        return entries

    def set(self, camera_id: str, cls: str, value: Any, user: str, reason: str = "") -> dict[str, Any]:
        """Override one threshold; returns the audit entry."""
        camera = check_target(self.config, camera_id, cls)
        number = check_value(value)
        with self._locked():
            return self._change(camera, cls, {"value": number, "user": user, "ts": time.time(),
                                              "reason": _reason(reason)}, "set", user, reason)

    def revert(self, camera_id: str, cls: str, user: str, reason: str = "") -> dict[str, Any]:
        """Undo the latest change of this threshold not yet undone; returns the audit entry."""
        camera = check_target(self.config, camera_id, cls)
        with self._locked():
            pending = 0
            target = None
            for entry in reversed(self._entries()):
                if entry.get("camera") != camera_id or entry.get("class") != cls:
                    continue
                if entry.get("action") == "revert":
                    pending += 1
                elif pending:
                    pending -= 1
                else:
                    target = entry
                    break
            if target is None:
                raise ThresholdError(f"{camera_id}/{cls}: no change to revert (see `iseg thresholds show`)")
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(target["ts"]))
            return self._change(camera, cls, target.get("old_override"), "revert", user,
                                reason or f"revert of the change at {when}")

    def _change(self, camera: CameraConfig, cls: str, new: dict[str, Any] | None, action: str, user: str,
                reason: str) -> dict[str, Any]:
        overrides = read_overrides(self.config.state_path)
        old_value = effective_thresholds(self.config, camera, overrides)[cls]
        previous = overrides.get(camera.id, {}).get(cls)
        if new is None:
            overrides.get(camera.id, {}).pop(cls, None)
        else:
            overrides.setdefault(camera.id, {})[cls] = new
        overrides = {c: v for c, v in overrides.items() if v}
        tmp = self.root / "overrides.json.tmp"
        with open(tmp, "w") as handle:
            json.dump(overrides, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.root / "overrides.json")
        new_value = effective_thresholds(self.config, camera, overrides)[cls]
        entry = {"ts": time.time(), "user": user, "action": action, "camera": camera.id, "class": cls,
                 "old": old_value[0], "old_source": old_value[1], "new": new_value[0], "new_source": new_value[1],
                 "reason": _reason(reason), "old_override": previous}
        with open(self.root / "audit.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        return entry


def _reason(text: str) -> str:
    return " ".join(str(text or "").split())[:MAX_REASON_CHARS]


class OverrideWatcher:
    """Tells a worker when the overrides file changed (a stat at most every CHECK_EVERY_S)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = overrides_dir(state_dir) / "overrides.json"
        self.next_check = 0.0
        self.seen = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_ino

    def changed(self) -> bool:
        """True once after each replacement of the file."""
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + CHECK_EVERY_S
        stamp = self._stamp()
        if stamp == self.seen:
            return False
        self.seen = stamp
        return True
