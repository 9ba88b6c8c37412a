"""The `sinks:` section: typed per sink type, unknown keys and bad values named by key path."""

from __future__ import annotations

import pytest

from daemon.config import ConfigError, parse_config
from daemon.sinks.config import ModbusSinkConfig, MqttSinkConfig, WebhookSinkConfig, parse_sink

BASE = {"state_dir": "/tmp/state", "engine": {"model_dir": "/models/x"},
        "cameras": [{"id": "press1", "source": "synthetic"}, {"id": "press2", "source": "synthetic"}]}


def config_with(*sinks):
    return parse_config({**BASE, "sinks": list(sinks)})


def test_each_type_parses_with_defaults_from_the_issue():
    config = config_with({"type": "mqtt", "name": "plant", "host": "broker.local"},
                         {"type": "webhook", "name": "teams", "url": "https://hooks.example/x", "secret_file": "s"},
                         {"type": "modbus", "name": "plc", "host": "10.0.0.5",
                          "outputs": [{"camera": "press1", "class": "scratch", "coil": 3}], "heartbeat_coil": 0})
    mqtt, hook, plc = config.sinks
    assert isinstance(mqtt, MqttSinkConfig) and mqtt.prefix == "iseg" and mqtt.port == 1883
    assert isinstance(hook, WebhookSinkConfig) and hook.timeout_s > 0
    assert isinstance(plc, ModbusSinkConfig) and plc.outputs[0].class_name == "scratch" and plc.port == 502
    assert plc.frame_gap_s == plc.heartbeat_ms / 1000
    assert parse_config(BASE).sinks == ()
    with pytest.raises(Exception):
        mqtt.host = "other"  # frozen


@pytest.mark.parametrize("sink, message", [
    ({"type": "mqtt", "name": "m"}, "sinks[0].host: required key is missing"),
    ({"type": "kafka", "name": "k"}, "sinks[0].type: 'kafka' must be one of mqtt, webhook, modbus"),
    ({"type": "mqtt", "name": "m", "host": "h", "pasword_file": "p"}, "sinks[0].pasword_file: unknown key"),
    ({"type": "mqtt", "name": "m", "host": "h", "password": "inline"}, "sinks[0].password: unknown key"),
    ({"type": "mqtt", "name": "m", "host": "h", "port": 70000}, "sinks[0].port:"),
    ({"type": "mqtt", "name": "m", "host": "h", "prefix": "a/#"}, "sinks[0]: prefix 'a/#'"),
    ({"type": "mqtt", "name": "m", "host": "h", "password_file": "p"}, "password_file needs username"),
    ({"type": "webhook", "name": "w", "url": "ftp://x"}, "sinks[0].url:"),
    ({"type": "modbus", "name": "p", "host": "h"}, "set at least one of outputs"),
    ({"type": "modbus", "name": "p", "host": "h", "outputs": [{"camera": "press1", "coil": 2}], "heartbeat_coil": 2},
     "heartbeat_coil 2 is also an output coil"),
    ({"type": "modbus", "name": "p", "host": "h", "outputs": [{"camera": "nope", "coil": 2}]},
     "sinks[0].outputs[0].camera: 'nope' is not a camera id"),
    ({"type": "webhook", "name": "w", "url": "http://x", "cameras": ["press9"]}, "sinks[0].cameras: 'press9'"),
    ({"type": "webhook", "name": "w", "url": "http://x", "retry_initial_s": 5, "retry_max_s": 1}, "retry_max_s (1)"),
    ({"type": "webhook", "name": "bad name", "url": "http://x"}, "sinks[0].name:"),
])
def test_bad_sinks_name_the_key_path(sink, message):
    with pytest.raises(ConfigError) as err:
        config_with(sink)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sink_names_are_unique():
    with pytest.raises(ConfigError, match=r"sinks\[1\].name: 'a' is used by two sinks"):
        config_with({"type": "webhook", "name": "a", "url": "http://x"}, {"type": "webhook", "name": "a", "url": "http://y"})


def test_filters_cameras_classes_min_presence():
    sink = parse_sink({"type": "webhook", "name": "w", "url": "http://x", "cameras": ["press1"], "classes": ["dent"],
                       "min_presence": 0.4}, 0)

    def alert(camera="press1", name="dent", presence=0.5):
        return {"camera": camera, "class": name, "classes": {name: {"presence": presence}}}
    assert sink.accepts(alert())
    assert not sink.accepts(alert(camera="press2"))
    assert not sink.accepts(alert(name="scratch"))
    assert not sink.accepts(alert(presence=0.39))


def test_modbus_coils_per_camera_and_class():
    sink = parse_sink({"type": "modbus", "name": "p", "host": "h", "outputs": [
        {"camera": "press1", "coil": 1}, {"camera": "press1", "class": "dent", "coil": 2}, {"camera": "press2", "coil": 3}]},
        0)
    assert sink.coils_for({"camera": "press1", "class": "dent"}) == [1, 2]
    assert sink.coils_for({"camera": "press1", "class": "scratch"}) == [1]
    assert sink.coils_for({"camera": "press2", "class": "dent"}) == [3]


def test_readme_example_is_a_valid_sinks_section():
    import re
    from pathlib import Path

    import yaml

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Sending alerts to the plant", 1)[1]
    example = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    config = parse_config({**BASE, **example})
    assert [s.type for s in config.sinks] == ["mqtt", "webhook", "modbus"]
