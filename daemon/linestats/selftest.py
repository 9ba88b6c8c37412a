"""The golden-sample self-test: a reference image with a known defect and a known-good one go
through the worker's own batch path (same model, same class set, same live thresholds) every
`health.self_test_s` seconds; the defect must still flag its class and the good image nothing.

A failure is sent to the publisher (`selftest` message), which marks every camera the worker
serves "inspection unreliable" until a later self-test passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from daemon.config import DaemonConfig


class SelfTestError(ValueError):
    """A golden image that cannot be read (the message names the file)."""


@dataclass(frozen=True)
class Golden:
    """The two reference images and what the defect one must flag."""

    camera: str
    defect_class: str
    defect: np.ndarray
    good: np.ndarray


def load_golden(config: DaemonConfig) -> Golden | None:
    """The configured golden sample as RGB arrays, or None when the self-test is off."""
    golden = config.health.golden
    if golden is None or config.health.self_test_s <= 0:
        return None
    images = []
    for key in ("defect_image", "good_image"):
        path = config.resolve(getattr(golden, key))
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise SelfTestError(f"health.golden.{key}: cannot read {path} as an image")
        images.append(np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)))
    return Golden(golden.camera, golden.defect_class, images[0], images[1])


def judge(golden: Golden, defect_presence: dict[str, float], good_presence: dict[str, float],
          thresholds: dict[str, float]) -> tuple[bool, str]:
    """(passed, why): the defect image must score above its class's threshold, the good image below every one."""
    problems = []
    score, limit = defect_presence[golden.defect_class], thresholds[golden.defect_class]
    if not score > limit:
        problems.append(f"defect image no longer flags {golden.defect_class} ({score:.3f} <= {limit:.3f})")
    wrong = [f"{n} {good_presence[n]:.3f} > {thresholds[n]:.3f}"
             for n in thresholds if good_presence[n] > thresholds[n]]
    if wrong:
        problems.append("good image flags " + ", ".join(wrong))
    passed = f"defect {golden.defect_class} {score:.3f} > {limit:.3f}, good image clean"
    return not problems, "; ".join(problems) or passed


def message(worker: str, golden: Golden, passed: bool, detail: str) -> dict[str, Any]:
    """The `selftest` header the worker sends to the publisher (schema: daemon.messages.Boundary.self_test)."""
    return {"worker": worker, "camera": golden.camera, "ok": passed, "detail": detail, "ts": time.time()}
