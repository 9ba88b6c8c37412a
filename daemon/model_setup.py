"""Makes sure the configured model folder exists before a worker loads it.

The demo config points at a tiny random-weight model that is built on first run; a
file lock keeps two workers from building it at once, and the folder appears by
rename only when complete, so a crash mid-build never leaves a half model behind.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from pathlib import Path

from daemon.config import DaemonConfig
from engine.errors import ModelLoadError

log = logging.getLogger("iseg.model")


def ensure_model(config: DaemonConfig) -> Path:
    """The model folder; built (tiny, random weights) when missing and the config allows it."""
    path = config.model_path
    if (path / "model_index.json").is_file() or not config.engine.build_tiny_if_missing:
        if not path.exists():
            raise ModelLoadError(f"engine.model_dir: {path} does not exist (the engine loads only local folders; "
                                 "set build_tiny_if_missing: true for the demo model)")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "model_index.json").is_file():
            return path
        from engine.tiny_model import build_tiny_model

        building = path.parent / f".{path.name}.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        log.info("building the tiny demo model (random weights) in %s; this takes about a minute once", path)
        build_tiny_model(building, family="sd21", seed=0, progress=lambda line: log.info("%s", line))
        if path.exists():
            shutil.rmtree(path)
        os.rename(building, path)
    return path
