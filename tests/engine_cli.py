"""Running the installed `iseg` console script from tests, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ISEG = str(Path(sys.executable).with_name("iseg"))


def run_iseg(*args: str, cache_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """`iseg ARGS` with its own embedding cache; output captured as text."""
    env = dict(os.environ, ISEG_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1")
    return subprocess.run([ISEG, *args], capture_output=True, text=True, timeout=timeout, env=env)
