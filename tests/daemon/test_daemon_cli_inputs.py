"""CLI and start-up inputs that used to be tracebacks or restart loops: each is one line and the right exit code."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemon.config import load_config, parse_config
from daemon.model_setup import ensure_model
from daemon.recorder import RecordingStore
from daemon.role import EX_CONFIG
from daemon.sources import SourceError, open_source
from engine.errors import ModelLoadError
from tests.crafted_images import png_declaring

REPO = Path(__file__).resolve().parents[2]
LONG_CLASSES = [f"deep surface defect kind {i}" for i in range(12)]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def write_config(tmp_path: Path, model: Path | str = "m", **changes) -> Path:
    doc = {"state_dir": str(tmp_path / "state"), "engine": {"model_dir": str(model), "settings": {"size": 64}},
           "cameras": [{"id": "belt1", "source": "synthetic"}]}
    doc.update(changes)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_validate_config_checks_prompts_against_the_tokenizer(tiny_sd21, tmp_path):
    fits = run_cli("validate-config", str(write_config(tmp_path, tiny_sd21)))
    assert fits.returncode == 0 and "prompts fit the tokenizer" in fits.stdout, fits.stderr
    long = write_config(tmp_path, tiny_sd21, cameras=[{"id": "belt1", "source": "synthetic"},
                                                      {"id": "press2", "source": "synthetic", "classes": LONG_CLASSES}])
    done = run_cli("validate-config", str(long))
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: cameras[1].classes: the prompt needs ") and "drop deep surface" in done.stderr


@pytest.mark.slow
def test_worker_exits_78_when_a_prompt_does_not_fit(tiny_sd21, tmp_path):
    config = write_config(tmp_path, tiny_sd21, cameras=[{"id": "press2", "source": "synthetic", "classes": LONG_CLASSES}])
    done = run_cli("worker", "--config", str(config), timeout=300)
    assert done.returncode == EX_CONFIG, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "cannot start with this configuration: cameras[0] (press2): classes: the prompt needs" in done.stdout


def test_remote_worker_without_sockets_remote(tmp_path):
    done = run_cli("worker", "--remote", "--config", str(write_config(tmp_path)))
    assert done.returncode == EX_CONFIG and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: worker --remote: ") and done.stderr.count("\n") == 1
    assert "no sockets.remote" in done.stderr


def test_review_with_a_huge_id_and_a_corrupt_meta_json(tmp_path):
    config = write_config(tmp_path)
    store = RecordingStore(load_config(config).state_path)
    store.write({"camera": "belt1", "seq": 1, "capture_ts": time.time(), "flagged": ["x"], "presence": {"x": 1.0}},
                {"original.png": b"a", "mask.png": b"b", "overlay.jpg": b"c"})
    meta = Path(store.get(1)["folder"]) / "meta.json"
    store.close()
    for action in ("show", "mark"):
        huge = run_cli("review", action, str(10**30), *(["confirmed"] if action == "mark" else []), "--config", str(config))
        assert huge.returncode == 1 and huge.stderr.count("\n") == 1, huge.stderr
        assert huge.stderr.startswith(f"error: review {action}: {10**30} is not a recording id")
    meta.write_text('{"camera": "belt1", "seq": ')
    corrupt = run_cli("review", "show", "1", "--config", str(config))
    assert corrupt.returncode == 1 and corrupt.stderr.count("\n") == 1, corrupt.stderr
    assert corrupt.stderr.startswith("error: review show: recording 1's meta.json is unreadable")
    marked = run_cli("review", "mark", "1", "confirmed", "--config", str(config))
    assert marked.returncode == 0 and "marked confirmed" in marked.stdout


def test_build_tiny_if_missing_never_replaces_a_foreign_folder(tmp_path):
    folder = tmp_path / "models" / "tiny"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("somebody's data")
    config = parse_config({"state_dir": "s", "engine": {"model_dir": str(folder), "build_tiny_if_missing": True},
                           "cameras": [{"id": "a", "source": "synthetic"}]})
    with pytest.raises(ModelLoadError, match="exists but holds no model_index.json"):
        ensure_model(config)
    assert (folder / "notes.txt").read_text() == "somebody's data"


def test_file_source_that_is_an_oversized_still_image(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(20000, 20000))
    camera = parse_config({"state_dir": "s", "engine": {"model_dir": "m"},
                           "cameras": [{"id": "a", "source": str(bomb)}]}).cameras[0]
    source = open_source(camera, max_pixels=100_000_000)
    with pytest.raises(SourceError, match=r"bomb.png: image is 20000×20000 \(400.0 MP\), over the limit of 100 MP"):
        source.open()
