"""Session fixtures: tiny SD-topology models built once per builder version.

The models land in .cache/iseg-tests/ (git-ignored) under a key that hashes the
builder's source, so a changed builder rebuilds and an unchanged one is reused across
runs; a file lock keeps parallel sessions from building the same model twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ISEG_TEST_MODEL_CACHE", REPO / ".cache" / "iseg-tests"))
BUILDER_SOURCES = ("engine/tools/tiny_model.py", "engine/model/clip_vocab.py", "engine/model/layers.py",
                   "engine/method/prompt.py")
"""What the tiny model's weights depend on: the builder, the tokenizer files, the layers it
calibrates and the prompt it calibrates with."""


def _builder_key() -> str:
    digest = hashlib.sha256()
    for source in BUILDER_SOURCES:
        digest.update((REPO / source).read_bytes())
    return digest.hexdigest()[:12]


def tiny_model_path(family: str, seed: int = 0) -> Path:
    """The cached tiny model of a family, built on first use."""
    target = CACHE / f"tiny-{family}-s{seed}-{_builder_key()}"
    if (target / "model_index.json").is_file():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model_index.json").is_file():
            from engine import build_tiny_model

            building = target.with_name(target.name + ".building")
            shutil.rmtree(building, ignore_errors=True)
            build_tiny_model(building, family=family, seed=seed, progress=lambda _line: None)
            os.rename(building, target)
    return target


@pytest.fixture(scope="session")
def tiny_sd21() -> Path:
    """Tiny random-weight SD 2.1-base topology (5 heads at 64×64, linear projections)."""
    return tiny_model_path("sd21")


@pytest.fixture(scope="session")
def tiny_sd15() -> Path:
    """Tiny random-weight SD 1.5 topology (8 heads, conv projections)."""
    return tiny_model_path("sd15")


@pytest.fixture(scope="session")
def clip_vocab() -> Path:
    """The real CLIP BPE vocabulary file (fetched from the open_clip_torch wheel once)."""
    from engine.model.clip_vocab import locate_vocab

    return locate_vocab(progress=lambda _line: None)
