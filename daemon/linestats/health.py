"""Camera and inspection health: can this camera's inspection be trusted right now?

Per camera, from every published frame (on a thumbnail, ~1 ms):
- frozen: the image has not changed (mean absolute difference under `frozen_diff` grey levels)
  for `frozen_s` seconds while frames keep arriving;
- defocus: sharpness (variance of the Laplacian) below `defocus_ratio` of its baseline;
- exposure: mean brightness more than `exposure_band` (relative) away from its baseline, or more
  than `clipped_max` of the pixels black- or white-clipped;
- presence_drift: population stability index of the last `psi_frames` presence scores against
  the calibration's distribution above `psi_max` (only with a calibration);
- unreliable: the golden-sample self-test of a worker serving this camera failed.
Baselines come from the calibration (stored with it); without one, from the first
`baseline_frames` frames. The median of the last `window_frames` measures is compared, and a
state must hold `hold_s` before it is reported, so one odd frame changes nothing. A change to
a non-ok state is a `health` alert; the way back to ok is a "recovered" one.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from daemon.linestats.config import HealthConfig

STATES = ("ok", "frozen", "defocus", "exposure", "presence_drift", "unreliable")
"""Every health state (the `state` label's complete set); later ones win when several hold."""
THUMB_SIDE = 160
PSI_BINS = 20
PSI_EPS = 1e-4


@dataclass(frozen=True)
class Measures:
    """What the checks need of one frame."""

    sharpness: float
    brightness: float
    clipped: float
    thumb: np.ndarray


def measure(frame: np.ndarray) -> Measures:
    """Sharpness, brightness and clipping of a frame, on a grey thumbnail of at most THUMB_SIDE pixels a side."""
    step = max(1, int(math.ceil(max(frame.shape[:2]) / THUMB_SIDE)))
    small = frame[::step, ::step]
    grey = small.mean(axis=2, dtype=np.float32) if small.ndim == 3 else small.astype(np.float32)
    sharpness = float(cv2.Laplacian(grey, cv2.CV_32F).var())
    clipped = float(np.count_nonzero((grey <= 3) | (grey >= 252))) / grey.size
    return Measures(sharpness, float(grey.mean()), clipped, grey)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index between two histograms over the same bins."""
    e = expected / max(1, expected.sum()) + PSI_EPS
    a = actual / max(1, actual.sum()) + PSI_EPS
    return float(np.sum((a - e) * np.log(a / e)))


def baseline_from_frames(frames: list[np.ndarray]) -> dict[str, float]:
    """Median sharpness and brightness of known-good frames (stored with the calibration)."""
    values = [measure(f) for f in frames]
    return {"sharpness": float(np.median([m.sharpness for m in values])),
            "brightness": float(np.median([m.brightness for m in values]))}


@dataclass
class CameraHealth:
    """One camera's running checks and its reported state."""

    baseline: dict[str, float] | None
    presence_baseline: dict[str, np.ndarray]
    learning: list[Measures] = field(default_factory=list)
    window: deque = field(default_factory=deque)
    last_thumb: np.ndarray | None = None
    changed_at: float | None = None
    last_frame_at: float | None = None
    recent: dict[str, deque] = field(default_factory=dict)
    unreliable: str = ""
    state: str = "ok"
    reason: str = ""
    since: float = field(default_factory=time.time)
    candidate: str = "ok"
    candidate_reason: str = ""
    candidate_since: float = field(default_factory=time.time)
    measures: dict[str, Any] = field(default_factory=dict)


class HealthMonitor:
    """Health of every camera; `observe` per frame, `tick` turns held conditions into state changes."""

    def __init__(self, config: HealthConfig, cameras: list[str],
                 baselines: dict[str, dict[str, Any]] | None = None) -> None:
        self.config = config
        self.cameras: dict[str, CameraHealth] = {}
        for camera in cameras:
            saved = (baselines or {}).get(camera) or {}
            image = saved.get("image")
            presence = {name: np.asarray(counts, np.float64) for name, counts in (saved.get("presence") or {}).items()}
            self.cameras[camera] = CameraHealth(dict(image) if image else None, presence)

    def observe(self, camera: str, ts: float, frame: np.ndarray, presence: dict[str, float]) -> None:
        """Feed one published frame (ts: capture time)."""
        health = self.cameras[camera]
        values = measure(frame)
        health.last_frame_at = ts
        if health.last_thumb is None or health.last_thumb.shape != values.thumb.shape or \
                float(np.abs(values.thumb - health.last_thumb).mean()) > self.config.frozen_diff:
            health.changed_at = ts
        health.last_thumb = values.thumb
        if health.baseline is None:
            health.learning.append(values)
            if len(health.learning) >= self.config.baseline_frames:
                health.baseline = {"sharpness": float(np.median([m.sharpness for m in health.learning])),
                                   "brightness": float(np.median([m.brightness for m in health.learning]))}
                health.learning = []
        health.window.append(values)
        while len(health.window) > self.config.window_frames:
            health.window.popleft()
        for name, score in presence.items():
            if name in health.presence_baseline:
                recent = health.recent.setdefault(name, deque(maxlen=self.config.psi_frames))
                recent.append(score)

    def self_test(self, cameras: list[str], ok: bool, detail: str) -> None:
        """A worker's golden-sample self-test result for the cameras it serves."""
        for camera in cameras:
            if camera in self.cameras:
                self.cameras[camera].unreliable = "" if ok else detail

    def conditions(self, camera: str) -> tuple[str, str, dict[str, Any]]:
        """The worst condition that holds now: (state, reason, measures)."""
        c, health = self.config, self.cameras[camera]
        found = ("ok", "")
        measures: dict[str, Any] = {}
        if health.window and health.baseline:
            sharp = float(np.median([m.sharpness for m in health.window]))
            bright = float(np.median([m.brightness for m in health.window]))
            clipped = float(np.median([m.clipped for m in health.window]))
            measures.update(sharpness=sharp, brightness=bright, clipped=clipped,
                            baseline_sharpness=health.baseline["sharpness"],
                            baseline_brightness=health.baseline["brightness"])
            drift = abs(bright - health.baseline["brightness"]) / max(1.0, health.baseline["brightness"])
            if sharp < c.defocus_ratio * health.baseline["sharpness"]:
                found = ("defocus", f"sharpness {sharp:.1f} is below {c.defocus_ratio:g} of its baseline "
                                    f"{health.baseline['sharpness']:.1f}")
            if drift > c.exposure_band or clipped > c.clipped_max:
                found = ("exposure", f"brightness {bright:.0f} vs baseline {health.baseline['brightness']:.0f}, "
                                     f"{clipped:.0%} of pixels clipped")
        for name, recent in health.recent.items():
            if len(recent) >= min(c.psi_frames, 20) and len(recent) == recent.maxlen:
                counts, _ = np.histogram(np.fromiter(recent, np.float64), bins=PSI_BINS, range=(0.0, 1.0))
                value = psi(health.presence_baseline[name], counts.astype(np.float64))
                measures[f"psi_{name}"] = value
                if value > c.psi_max and found[0] in ("ok",):
                    found = ("presence_drift", f"{name} presence distribution moved from calibration (PSI {value:.2f})")
        if health.changed_at is not None and health.last_frame_at is not None:
            unchanged = health.last_frame_at - health.changed_at
            measures["unchanged_s"] = unchanged
            if unchanged >= c.frozen_s:
                found = ("frozen", f"image unchanged for {unchanged:.0f}s while frames keep arriving")
        if health.unreliable:
            found = ("unreliable", f"inspection unreliable: {health.unreliable}")
        health.measures = measures
        return found[0], found[1], measures

    def tick(self, now: float) -> list[tuple[str, str, str, str]]:
        """Apply held conditions; returns the changes as (camera, old state, new state, reason)."""
        changes = []
        for camera, health in self.cameras.items():
            state, reason, _ = self.conditions(camera)
            if state != health.candidate:
                health.candidate, health.candidate_since = state, now
            health.candidate_reason = reason
            hold = 0.0 if state == "unreliable" or health.state == "unreliable" else self.config.hold_s
            if health.candidate != health.state and now - health.candidate_since >= hold:
                changes.append((camera, health.state, state, reason))
                health.state, health.reason, health.since = state, reason, now
            elif state == health.state:
                health.reason = reason
        return changes

    def snapshot(self, camera: str) -> dict[str, Any]:
        """The `health.<camera>` message body (also in /stats and the console's badges)."""
        health = self.cameras[camera]
        return {"camera": camera, "state": health.state, "reason": health.reason, "since": health.since,
                "baseline": "learning" if health.baseline is None else "ok",
                "checks": {k: round(v, 4) if isinstance(v, float) else v for k, v in health.measures.items()}}
