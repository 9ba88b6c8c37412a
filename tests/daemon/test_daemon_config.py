"""Config validation: typed, unknown keys rejected, one-line errors with the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from daemon.config import ConfigError, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]


def minimal(**changes):
    doc = {"state_dir": "s", "engine": {"model_dir": "m"}, "cameras": [{"id": "a", "source": "synthetic"}]}
    doc.update(changes)
    return doc


@pytest.mark.parametrize("doc, message", [
    (minimal(cameras=[{"id": "a", "source": "synthetic"}, {"id": "b", "source": "x.mp4", "fsp": 2}]),
     "cameras[1].fsp: unknown key"),
    (minimal(cameras=[{"id": "a", "source": "synthetic", "fps": "fast"}]), "cameras[0].fps: 'fast' must be a number"),
    (minimal(cameras=[{"id": "a", "source": "synthetic"}, {"id": "a", "source": "synthetic"}]),
     "cameras[1].id: 'a' is used by two cameras"),
    (minimal(cameras=[{"id": "a", "source": "synthetic", "thresholds": {"crack": 0.5}}]),
     "cameras[0].thresholds.crack: not one of this camera's classes"),
    (minimal(cameras=[{"id": "a", "source": "synthetic", "roi": [0, 0, 10]}]), "cameras[0].roi: expected 4 values"),
    (minimal(engine={"model_dir": "m", "settings": {"sise": 256}}), "engine.settings.sise: unknown setting"),
    (minimal(engine={"model_dir": "m", "settings": {"size": 100}}), "engine.settings.size: 100 must be a multiple of 64"),
    (minimal(alerts={"k": 4, "n": 3}), "alerts.k: 4 must be between 1 and alerts.n"),
    (minimal(worker={"batch_size": True}), "worker.batch_size: True must be an integer"),
    (minimal(sockets={"frames": "ipc:///tmp/frames.sock"}), "sockets.frames: must contain {camera}"),
    (minimal(metrics={"listen": "9108"}), "metrics.listen:"),
    (minimal(bogus=1), "bogus: unknown key"),
    ({"state_dir": "s", "cameras": [{"id": "a", "source": "synthetic"}]}, "engine: required key is missing"),
    (minimal(cameras=[{"id": "a", "source": "rtsp://u:${NO_SUCH_SECRET_VAR}@h/s"}]),
     "cameras[0].source: environment variable NO_SUCH_SECRET_VAR is not set"),
])
def test_bad_configs_name_the_key_path(doc, message):
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_env_secrets_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("CAM_PASSWORD", "s3cret")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(cameras=[{"id": "a", "source": "rtsp://u:${CAM_PASSWORD}@h/s", "tcp_port": None}],
                                           state_dir="${ISEG_TEST_STATE:-state}")))
    config = load_config(path)
    assert config.cameras[0].source == "rtsp://u:s3cret@h/s" and config.cameras[0].source_kind == "rtsp"
    assert config.state_path == tmp_path / "state" and config.model_path == tmp_path / "m"
    assert config.endpoint("frames", "a") == f"ipc://{tmp_path}/state/run/frames-a.sock"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_validate_config_command(tmp_path):
    assert run_cli("validate-config", "configs/demo.yaml").returncode == 0
    ok = run_cli("validate-config", "configs/line.example.yaml")
    assert ok.returncode == 1 and ok.stderr.startswith("error: cameras[0].source: environment variable PRESS1_PASSWORD")
    bad = tmp_path / "bad.yaml"
    bad.write_text("state_dir: s\nengine: {model_dir: m}\ncameras:\n  - {id: a, source: synthetic, colour: red}\n")
    done = run_cli("validate-config", str(bad))
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: cameras[0].colour: unknown key")
    broken = tmp_path / "broken.yaml"
    broken.write_text("cameras: [\n  - id: a\n")
    done = run_cli("validate-config", str(broken))
    assert done.returncode == 1 and "invalid YAML" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("run", "--config", str(tmp_path / "missing.yaml"))
    assert done.returncode == 1 and "cannot read config" in done.stderr


def test_example_configs_validate_with_secrets(monkeypatch):
    monkeypatch.setenv("PRESS1_PASSWORD", "a")
    monkeypatch.setenv("WELD2_PASSWORD", "b")
    line = load_config(REPO / "configs" / "line.example.yaml")
    assert [c.id for c in line.cameras] == ["press1", "weld2"] and line.sockets.remote is not None
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.cameras[0].source_kind == "synthetic" and demo.engine.build_tiny_if_missing


@pytest.mark.parametrize("engine, message", [
    ({"backend": "tensorrt"}, "engine.backend: 'tensorrt' must be one of torch, onnx"),
    ({"backend": "onnx"}, "engine.onnx_dir: backend onnx needs the folder written by `iseg export-onnx`"),
    ({"onnx_dir": "exported"}, "engine.onnx_dir: only used with backend: onnx"),
    ({"backend": "onnx", "onnx_dir": "x", "cuda_graphs": True}, "engine.cuda_graphs/compile: apply to backend torch only"),
    ({"cuda_graphs": True}, "engine.cuda_graphs: needs device cuda or cuda:N, not 'cpu'"),
    ({"dtype": "fp16"}, "engine.dtype: 'fp16' must be one of float32, float16, bfloat16"),
])
def test_engine_backend_options_are_checked(engine, message):
    with pytest.raises(ConfigError) as err:
        parse_config(minimal(engine={"model_dir": "m", **engine}))
    assert str(err.value).startswith(message), str(err.value)


def test_engine_backend_options_resolve(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(engine={"model_dir": "m", "device": "cuda:1", "dtype": "float16",
                                                   "cuda_graphs": True, "compile": True})))
    config = load_config(path)
    assert config.engine.cuda_graphs and config.engine.compile and config.onnx_path is None
    path.write_text(yaml.safe_dump(minimal(engine={"model_dir": "m", "backend": "onnx", "onnx_dir": "exported"})))
    assert load_config(path).onnx_path == tmp_path / "exported"
