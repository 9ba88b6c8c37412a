"""Which presence threshold applies to a camera's class, and where a camera's calibration is
stored: read by the calibration command, the worker and the live threshold book alike (its own
module, so none of them imports another for it)."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.config import CameraConfig, DaemonConfig


def calibration_file(config: DaemonConfig, camera_id: str) -> Path:
    """Where a camera's calibration lives in the state dir."""
    return config.state_path / "calibration" / f"{camera_id}.json"



def thresholds_for(config: DaemonConfig, camera: CameraConfig) -> dict[str, tuple[float, str]]:
    """Each class's threshold and where it came from: the camera's config (an explicit
    override) wins, then a calibration for this exact class set, then alerts.default_threshold."""
    calibrated: dict[str, float] = {}
    path = calibration_file(config, camera.id)
    if path.is_file():
        try:
            document = json.loads(path.read_text())
        except ValueError:
            document = {}
        if document.get("classes") == list(camera.classes) and document.get("bg_context") == camera.bg_context:
            calibrated = {name: float(v["threshold"]) for name, v in document["per_class"].items()}
    chosen = {}
    for name in camera.classes:
        if name in camera.thresholds:
            chosen[name] = (camera.thresholds[name], "config")
        elif name in calibrated:
            chosen[name] = (calibrated[name], "calibration")
        else:
            chosen[name] = (config.alerts.default_threshold, "default")
    return chosen
