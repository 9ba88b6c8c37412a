"""The sample images bundled with the package (the demo segments them)."""

from __future__ import annotations

from pathlib import Path

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"


def sample_paths() -> list[Path]:
    """Bundled sample PNGs, sorted by name."""
    return sorted(SAMPLES_DIR.glob("*.png"))
