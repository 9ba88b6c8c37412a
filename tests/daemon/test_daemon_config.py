"""Config validation: typed, unknown keys rejected, one-line errors with the key path."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from daemon.config import CAMERA_ID_PATTERN, ConfigError, config_json_schema, load_config, parse_config, parse_config_text

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


def camera(**fields):
    return {"id": "a", "source": "synthetic", **fields}


@pytest.mark.parametrize("doc, message", [
    (minimal(cameras=[camera(id="-a")]), "cameras[0].id: '-a' must start with a letter or digit"),
    (minimal(cameras=[camera(id="../etc")]), "cameras[0].id: '../etc' must start with a letter or digit"),
    (minimal(cameras=[camera(id="a/b")]), "cameras[0].id: 'a/b' must start with a letter or digit"),
    (minimal(cameras=[camera(id="x" * 65)]), "cameras[0].id: "),
    (minimal(cameras=[camera(tcp_port=70000)], sockets={"remote": {"host": "h", "server_key": "s", "client_key": "c"}},
             dispatch={"enabled": False}),
     "cameras[0].tcp_port: 70000 must be <= 65535"),
    (minimal(cameras=[camera(tcp_port=5599)], sockets={"remote": {"host": "h", "server_key": "s", "client_key": "c"}},
             dispatch={"enabled": False}),
     "cameras[0].tcp_port: 5599 is already used"),
    (minimal(cameras=[camera(tcp_port=5601)], sockets={"remote": {"host": "h", "server_key": "s", "client_key": "c"}}),
     "cameras[0].tcp_port: only for dispatch.enabled: false"),
    (minimal(dispatch={"port": 5601}), "dispatch.port: set sockets.remote too"),
    (minimal(dispatch={"port": 5599}, sockets={"remote": {"host": "h", "server_key": "s", "client_key": "c"}}),
     "dispatch.port: 5599 is already used"),
    (minimal(dispatch={"worker_timeout_ms": 300, "heartbeat_ms": 250}),
     "dispatch.worker_timeout_ms: 300 must be at least twice heartbeat_ms"),
    (minimal(publisher={"backup_host": "10.0.0.2"}), "publisher.backup_host: set sockets.remote too"),
    (minimal(publisher={"backup_host": "10.0.0.2"}, dispatch={"enabled": False},
             sockets={"remote": {"host": "h", "server_key": "s", "client_key": "c"}}),
     "publisher.backup_host: needs dispatch.enabled"),
    (minimal(publisher={"backup_host": "10.0.0.2", "takeover_ms": 500},
             sockets={"remote": {"host": "h", "server_key": "s", "client_key": "c"}}),
     "publisher.takeover_ms: 500 must be at least 4 x dispatch.heartbeat_ms"),
    (minimal(dispatch={"max_frame_age_ms": 1}), "dispatch.max_frame_age_ms: 1"),
    (minimal(sockets={"remote": {"host": "h", "server_key": "s", "client_key": "c", "results_port": 0}}),
     "sockets.remote.results_port: 0 must be >= 1"),
    (minimal(metrics={"listen": "127.0.0.1:99999"}), "metrics.listen: '127.0.0.1:99999' must be host:port with a port"),
    (minimal(sockets={"frames_hwm": 10**30}), "sockets.frames_hwm: 1000000000000000000000000000000 must be <= 1000000"),
    (minimal(sockets={"publish_hwm": 0}), "sockets.publish_hwm: 0 must be >= 1"),
    (minimal(worker={"max_wait_ms": 1e300}), "worker.max_wait_ms: 1e+300 must be <= 60000"),
    (minimal(worker={"batch_timeout_s": float("inf")}), "worker.batch_timeout_s: inf must be a finite number"),
    (minimal(worker={"batch_size": 10**6}), "worker.batch_size: 1000000 must be <= 256"),
    (minimal(alerts={"n": 10**9, "k": 1}), "alerts.n: 1000000000 must be <= 1000"),
    (minimal(cameras=[camera(read_timeout_s=1e300)]), "cameras[0].read_timeout_s: 1e+300 must be <= 3600"),
    (minimal(cameras=[camera(fps=float("nan"))]), "cameras[0].fps: nan must be a finite number"),
    (minimal(cameras=[camera(roi=[0, 0, 10, 0])]), "cameras[0].roi[3]: 0 must be >= 1"),
    (minimal(cameras=[camera(synthetic={"width": 10**9})]), "cameras[0].synthetic.width: 1000000000 must be <= 4096"),
    (minimal(supervisor={"max_restarts": -1}), "supervisor.max_restarts: -1 must be >= 0"),
    (minimal(limits={"max_image_pixels": 0}), "limits.max_image_pixels: 0 must be >= 1"),
    (minimal(limits={"max_pixels": 5}), "limits.max_pixels: unknown key (known: max_image_pixels)"),
    (minimal(engine={"model_dir": "m", "settings": {"iters": 10**12}}), "engine.settings.iters: 1000000000000 must be in"),
    (minimal(engine={"model_dir": "m", "settings": {"size": 8192}}), "engine.settings.size: 8192 must be a multiple of 64 in"),
    (minimal(cameras=[]), "cameras: list at least one"),
    (minimal(worker={"count": "2"}), "worker.count: '2' must be an integer"),
])
def test_numbers_and_ids_are_bounded(doc, message):
    with pytest.raises(ConfigError) as err:
        parse_config(doc)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_key_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        parse_config(minimal(worker={"batch": 2}))
    assert str(err.value) == ("worker.batch: unknown key (known: count, batch_size, max_wait_ms, batch_timeout_s, "
                              "torch_threads)")


def test_limits_section_and_json_schema():
    assert parse_config(minimal()).limits.max_image_pixels == 100_000_000
    assert parse_config(minimal(limits={"max_image_pixels": 5_000_000})).limits.max_image_pixels == 5_000_000
    schema = config_json_schema()
    assert schema["additionalProperties"] is False and set(schema["required"]) == {"state_dir", "engine", "cameras"}
    camera_schema = schema["$defs"]["CameraConfig"]
    assert camera_schema["properties"]["id"]["pattern"] == CAMERA_ID_PATTERN
    assert camera_schema["properties"]["tcp_port"]["anyOf"][0] == {"maximum": 65535, "minimum": 1, "type": "integer"}
    assert schema["$defs"]["EngineConfig"]["properties"]["settings"]["additionalProperties"] is False
    assert schema["$defs"]["LimitsConfig"]["properties"]["max_image_pixels"]["default"] == 100_000_000


def billion_laughs() -> str:
    lines = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        previous = chr(ord("a") + i - 1)
        lines.append(f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [{', '.join(['*' + previous] * 10)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, message", [
    (billion_laughs(), "the YAML expands to more than 100000 nodes"),
    ("a: " + "[" * 20_000 + "]" * 20_000 + "\n", "invalid YAML: exceeded maximum nesting depth"),
    ("a:\n" + "".join("  " * i + f"- k{i}:\n" for i in range(1, 40)) + "  " * 40 + "- x\n", "YAML nested deeper than 32"),
    ("# padding\n" * 110_000, "config is larger than 1000 kB"),
])
def test_hostile_yaml_is_refused_quickly(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - started < 5.0  # generous: CI shares two cores
    assert message in str(err.value) and str(err.value).startswith(str(path)), str(err.value)
    assert "\n" not in str(err.value)


def test_pure_python_yaml_depth_guard(monkeypatch):
    monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        parse_config_text("a: " + "[" * 20_000 + "]" * 20_000 + "\n", "deep.yaml")
    assert time.perf_counter() - started < 5.0  # generous: CI shares two cores
    assert str(err.value) == "deep.yaml: line 1 YAML nested deeper than 32 levels"


def test_validate_config_exit_codes_for_hostile_files(tmp_path):
    cases = {"laughs.yaml": billion_laughs(), "deep.yaml": "a: " + "[" * 20_000 + "]" * 20_000 + "\n",
             "dash.yaml": "state_dir: s\nengine: {model_dir: m}\ncameras: [{id: -x, source: synthetic}]\n",
             "port.yaml": "state_dir: s\nengine: {model_dir: m}\ncameras: [{id: a, source: synthetic}]\n"
                          "metrics: {listen: '127.0.0.1:65536'}\n",
             "huge.yaml": "state_dir: s\nengine: {model_dir: m}\ncameras: [{id: a, source: synthetic}]\n"
                          "worker: {max_wait_ms: 1e400}\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        done = run_cli("validate-config", str(tmp_path / name))
        assert done.returncode == 1 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, (name, done.stderr)
    schema = run_cli("validate-config", "--schema")
    assert schema.returncode == 0 and json.loads(schema.stdout)["title"] == "DaemonConfig"
