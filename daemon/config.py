"""The daemon's one YAML config, validated into frozen pydantic models before any role starts.

Every field is typed and every number bounded; unknown keys, wrong types and
out-of-range values are a ConfigError whose message is one line starting with the key
path (`cameras[1].fps: ...`), so an operator never sees a traceback for a typo.
Strings may use `${VAR}` or `${VAR:-default}`: secrets (camera passwords) come from the
environment, never from the file. The YAML text itself is bounded (size, nesting,
alias expansion) before it is parsed, so a hostile file fails fast with one line too.

A config section is one `Section` subclass plus one field on `DaemonConfig`;
`config_json_schema()` gives the JSON Schema of the whole file (for editors and the console).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt,
                      StrictStr, TypeAdapter, ValidationError, WithJsonSchema, field_validator, model_validator)
from pydantic_core import ErrorDetails, PydanticCustomError

from daemon.console.config import ConsoleConfig
from daemon.sinks.config import MAX_SINKS, SinkConfig, SinkConfigError, check_sinks, sink_models
from daemon.linestats.config import HealthConfig, ShiftConfig, StatsConfig, check_linestats, check_shifts
from engine import DEFAULT_BG_CONTEXT, DtypeName, EngineError, IsegSettings

MAX_CONFIG_BYTES = 1_000_000
"""A config file larger than this is refused before it is parsed (real configs are a few kB)."""
MAX_YAML_DEPTH = 32
"""Deepest nesting of mappings and lists accepted (the schema needs 5)."""
MAX_YAML_NODES = 100_000
"""Most YAML nodes after alias expansion (a billion-laughs file expands to ~10^9)."""

CAMERA_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
"""Camera ids name topics, files and metric labels: no leading '-', no dots or slashes."""


class ConfigError(Exception):
    """A config that cannot run; the message is one line naming the key path."""


def _rule(key: str, message: str) -> PydanticCustomError:
    """A cross-field rule broken at `key` (relative to the model that checks it)."""
    return PydanticCustomError("config_rule", "{text}", {"config_key": key, "text": message})


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None:
            if default is None:
                raise _rule("", f"environment variable {name} is not set (use ${{{name}:-default}} for a default)")
            return default
        return value

    return _ENV_PATTERN.sub(replace, text)


def _text(value: Any) -> Any:
    """YAML scalars to str (a USB index `0` is a source string) with ${VAR} expanded."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return _expand_env(value) if isinstance(value, str) else value


Text = Annotated[StrictStr, BeforeValidator(_text), Field(max_length=4096)]
Name = Annotated[StrictStr, BeforeValidator(_text), Field(min_length=1, max_length=200)]
Port = Annotated[StrictInt, Field(ge=1, le=65535)]
Seconds = Annotated[StrictFloat, Field(gt=0, le=86_400)]
Score = Annotated[StrictFloat, Field(ge=0.0, le=1.0)]
Hwm = Annotated[StrictInt, Field(ge=1, le=1_000_000)]
Offset = Annotated[StrictInt, Field(ge=0, le=65_535)]
Extent = Annotated[StrictInt, Field(ge=1, le=65_535)]


class Section(BaseModel):
    """Base of every config section: frozen, strict types, finite numbers, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, protected_namespaces=())

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if data is None:
            return {}
        if not isinstance(data, Mapping):
            raise PydanticCustomError("mapping_type", "expected a mapping, got {got}", {"got": _show(data)})
        for key in data:
            if key not in cls.model_fields:
                raise PydanticCustomError("unknown_key", "unknown key (known: {known})",
                                          {"config_key": str(key), "known": ", ".join(cls.model_fields)})
        return data


def _settings(value: Any) -> Any:
    """engine.settings → IsegSettings, with the engine's own checks as key-path errors."""
    if isinstance(value, IsegSettings):
        return value
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise PydanticCustomError("mapping_type", "expected a mapping of method settings, got {got}", {"got": _show(value)})
    try:
        return IsegSettings.from_mapping(value, where="")
    except EngineError as err:
        match = re.fullmatch(r"\.?(\w+): (.*)", str(err))
        key, text = (match.group(1), match.group(2)) if match else ("", str(err))
        raise _rule(key, text) from None


def _settings_schema() -> dict[str, Any]:
    schema = TypeAdapter(IsegSettings).json_schema()
    schema["additionalProperties"] = False
    return schema


Settings = Annotated[IsegSettings, BeforeValidator(_settings), WithJsonSchema(_settings_schema())]


class SyntheticSource(Section):
    """Generated frames: parts moving on a belt, some with injected defects (deterministic per seed)."""

    seed: Annotated[StrictInt, Field(ge=0, le=2**32 - 1)] = 0
    width: Annotated[StrictInt, Field(ge=64, le=4096)] = 320
    height: Annotated[StrictInt, Field(ge=64, le=4096)] = 240
    defect_every: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = 3
    corrupt_every: Annotated[StrictInt, Field(ge=0, le=1_000_000)] = 0
    fault_cue: Optional[Annotated[Text, Field(min_length=1)]] = None
    """A file whose content (freeze, blur, dark, or empty for none) switches a camera fault on, for
    health demos and tests; read at most 4 times a second."""


class CameraConfig(Section):
    """One camera: where frames come from, what to look for, and how sure to be."""

    id: Annotated[StrictStr, BeforeValidator(_text), Field(json_schema_extra={"pattern": CAMERA_ID_PATTERN})]
    source: Annotated[Text, Field(min_length=1)]
    fps: Annotated[StrictFloat, Field(gt=0, le=1000)] = 2.0
    roi: Optional[tuple[Offset, Offset, Extent, Extent]] = None
    classes: Annotated[tuple[Name, ...], Field(min_length=1, max_length=32)] = ("scratch", "dent")
    bg_context: Annotated[Text, Field(max_length=1000)] = DEFAULT_BG_CONTEXT
    thresholds: dict[Name, Score] = Field(default_factory=dict)
    loop: StrictBool = True
    synthetic: SyntheticSource = SyntheticSource()
    open_timeout_s: Annotated[StrictFloat, Field(gt=0, le=3600)] = 5.0
    read_timeout_s: Annotated[StrictFloat, Field(gt=0, le=3600)] = 5.0
    stall_timeout_s: Annotated[StrictFloat, Field(gt=0, le=3600)] = 10.0
    reconnect_initial_s: Annotated[StrictFloat, Field(gt=0, le=3600)] = 0.5
    reconnect_max_s: Annotated[StrictFloat, Field(gt=0, le=3600)] = 30.0
    tcp_port: Optional[Port] = None

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        if not re.fullmatch(CAMERA_ID_PATTERN, value):
            raise _rule("", f"{_show(value)} must start with a letter or digit and use only letters, digits, '-' "
                        "and '_' (at most 64 characters; it names topics and files)")
        return value

    @field_validator("source")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise _rule("", "empty; give rtsp://, http(s)://, a file, /dev/videoN, an index or synthetic")
        return value

    @field_validator("roi", mode="before")
    @classmethod
    def _four_values(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) != 4:
            raise _rule("", f"expected 4 values, got {len(value)} ([x, y, width, height])")
        return value

    @model_validator(mode="after")
    def _classes_and_thresholds(self) -> "CameraConfig":
        lowered = [c.strip().lower() for c in self.classes]
        if any(not c for c in lowered) or len(set(lowered)) != len(lowered):
            raise _rule("classes", "class names must be non-empty and unique")
        for name in self.thresholds:
            if name not in self.classes:
                raise _rule(f"thresholds.{name}", f"not one of this camera's classes ({', '.join(self.classes)})")
        return self

    @property
    def source_kind(self) -> str:
        """synthetic, rtsp, http, usb or file: decides which reader opens the source."""
        return source_kind(self.source)


class EngineConfig(Section):
    """What `engine.segmenter.Segmenter.load` gets; `settings` override the method defaults (docs/method.md §10)."""

    model_dir: Annotated[Text, Field(min_length=1)]
    device: Annotated[Text, Field(min_length=1, max_length=64)] = "cpu"
    dtype: DtypeName = "float32"
    backend: Literal["torch", "onnx"] = "torch"
    onnx_dir: Optional[Text] = None
    compile: StrictBool = False
    cuda_graphs: StrictBool = False
    build_tiny_if_missing: StrictBool = False
    settings: Settings = IsegSettings()

    @model_validator(mode="after")
    def _backend_options(self) -> "EngineConfig":
        if self.backend == "onnx" and not self.onnx_dir:
            raise _rule("onnx_dir", "backend onnx needs the folder written by `iseg export-onnx`")
        if self.onnx_dir and self.backend != "onnx":
            raise _rule("onnx_dir", "only used with backend: onnx (set backend: onnx or drop onnx_dir)")
        if (self.cuda_graphs or self.compile) and self.backend != "torch":
            raise _rule("cuda_graphs/compile", "apply to backend torch only (ONNX Runtime optimises its own graph)")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise _rule("cuda_graphs", f"needs device cuda or cuda:N, not {self.device!r}")
        return self


class WorkerConfig(Section):
    """Batching of the detection worker and how many local workers `run` starts."""

    count: Annotated[StrictInt, Field(ge=0, le=64)] = 1
    batch_size: Annotated[StrictInt, Field(ge=1, le=256)] = 2
    max_wait_ms: Annotated[StrictFloat, Field(ge=0, le=60_000)] = 50.0
    batch_timeout_s: Seconds = 120.0
    torch_threads: Optional[Annotated[StrictInt, Field(ge=1, le=1024)]] = None


class AlertConfig(Section):
    """Debouncing: a class alerts when flagged in k of the last n frames, then rests for cooldown_s."""

    k: Annotated[StrictInt, Field(ge=1, le=1000)] = 2
    n: Annotated[StrictInt, Field(ge=1, le=1000)] = 3
    cooldown_s: Annotated[StrictFloat, Field(ge=0, le=86_400)] = 30.0
    default_threshold: Score = 0.5
    min_area_px: Annotated[StrictInt, Field(ge=0, le=100_000_000)] = 16
    max_boxes: Annotated[StrictInt, Field(ge=0, le=1000)] = 8

    @model_validator(mode="after")
    def _k_of_n(self) -> "AlertConfig":
        if self.k > self.n:
            raise _rule("k", f"{self.k} must be between 1 and alerts.n ({self.n})")
        return self


class RecorderConfig(Section):
    """Where flagged frames go and how long they stay."""

    enabled: StrictBool = True
    retention_days: Annotated[StrictFloat, Field(gt=0, le=36_500)] = 30.0
    min_free_mb: Annotated[StrictFloat, Field(ge=0, le=1_000_000_000_000)] = 1024.0
    retention_check_s: Seconds = 30.0
    keep_recent_h: Annotated[StrictFloat, Field(ge=0, le=87_600)] = 24.0
    delete_confirmed: StrictBool = False
    jpeg_quality: Annotated[StrictInt, Field(ge=1, le=100)] = 85
    context_frames: Annotated[StrictInt, Field(ge=0, le=9)] = 2


class CalibrationConfig(Section):
    """Threshold = `quantile` of the known-good presence scores plus `margin`."""

    quantile: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 0.99
    margin: Annotated[StrictFloat, Field(ge=-1.0, le=1.0)] = 0.02


class RemoteConfig(Section):
    """TCP endpoints for workers on other hosts, secured with CurveZMQ.

    The main host binds on `bind_host`; a remote worker (`iseg worker --remote`) connects to
    `host`. Key files are those written by `iseg gen-keys` (zmq.auth certificates).
    """

    host: Annotated[Text, Field(min_length=1, max_length=253)]
    bind_host: Annotated[Text, Field(min_length=1, max_length=253)] = "127.0.0.1"
    results_port: Port = 5599
    server_key: Text = ""
    client_key: Text = ""
    authorized_clients_dir: Text = ""

    @model_validator(mode="after")
    def _keys(self) -> "RemoteConfig":
        if not (self.server_key and self.client_key):
            raise _rule("", "server_key and client_key files are required (see `iseg gen-keys`)")
        return self


ENDPOINTS = ("frames", "intake", "dispatch", "results", "publish", "replay", "telemetry")


class SocketConfig(Section):
    """ZeroMQ endpoints; `{run_dir}` and `{camera}` are filled in. Default: ipc:// under the run dir."""

    run_dir: Optional[Text] = None
    frames: Text = "ipc://{run_dir}/frames-{camera}.sock"
    intake: Text = "ipc://{run_dir}/intake.sock"
    dispatch: Text = "ipc://{run_dir}/dispatch.sock"
    results: Text = "ipc://{run_dir}/results.sock"
    publish: Text = "ipc://{run_dir}/publish.sock"
    replay: Text = "ipc://{run_dir}/replay.sock"
    telemetry: Text = "ipc://{run_dir}/telemetry.sock"
    frames_hwm: Hwm = 1
    results_hwm: Hwm = 64
    publish_hwm: Hwm = 256
    remote: Optional[RemoteConfig] = None

    @field_validator(*ENDPOINTS)
    @classmethod
    def _endpoint(cls, endpoint: str) -> str:
        if not re.match(r"(ipc|tcp|inproc)://", endpoint):
            raise _rule("", f"{endpoint!r} must start with ipc://, tcp:// or inproc://")
        try:
            endpoint.format(run_dir="x", camera="x")
        except (KeyError, IndexError, ValueError):
            raise _rule("", f"{endpoint!r} may only use {{run_dir}} and {{camera}}") from None
        return endpoint

    @model_validator(mode="after")
    def _frames_per_camera(self) -> "SocketConfig":
        if "{camera}" not in self.frames:
            raise _rule("frames", "must contain {camera} (each camera binds its own frame socket)")
        return self


Host = Annotated[Text, Field(min_length=1, max_length=253)]
Millis = Annotated[StrictFloat, Field(ge=10, le=3_600_000)]


class DispatchConfig(Section):
    """Credit-based frame dispatch: one dispatcher per capture host hands each frame to a worker with a
    free batch slot, keeps it until the publisher acknowledges its result, and re-sends the frames of
    a worker that stops heartbeating. `enabled: false` is the bare PUSH/PULL of earlier versions."""

    enabled: StrictBool = True
    port: Optional[Port] = None
    """TCP port (CurveZMQ, sockets.remote keys) where remote workers and publishers reach this host's
    dispatcher; unset: local ipc only."""
    hosts: Annotated[tuple[Host, ...], Field(max_length=64)] = ()
    """Capture hosts a remote worker or publisher connects to (each on `port`); empty: sockets.remote.host."""
    worker_timeout_ms: Millis = 2000.0
    max_frame_age_ms: Millis = 5000.0
    ack_timeout_ms: Millis = 3000.0
    heartbeat_ms: Annotated[StrictFloat, Field(ge=10, le=60_000)] = 250.0
    queue_frames: Annotated[StrictInt, Field(ge=1, le=1000)] = 2
    """Frames per camera waiting for a free worker slot; beyond it the oldest waiting frame is dropped
    (a live camera wants the newest frame): dropped at admission, counted, never sent."""
    drain_s: Annotated[StrictFloat, Field(ge=0, le=3600)] = 5.0
    """On stop, how long the dispatcher waits for frames in flight to be acknowledged."""

    @model_validator(mode="after")
    def _timeouts(self) -> "DispatchConfig":
        if self.worker_timeout_ms < 2 * self.heartbeat_ms:
            raise _rule("worker_timeout_ms", f"{self.worker_timeout_ms:g} must be at least twice heartbeat_ms "
                        f"({self.heartbeat_ms:g}): one late heartbeat must not declare a worker lost")
        return self


class PublisherConfig(Section):
    """An optional backup publisher on another host, taking over when the primary stops heartbeating.

    The primary runs `iseg publish` on sockets.remote.host, the backup `iseg publish --backup` on
    `backup_host`; both bind sockets.remote.results_port and `peer_port`."""

    backup_host: Optional[Host] = None
    peer_port: Port = 5603
    takeover_ms: Annotated[StrictFloat, Field(ge=100, le=600_000)] = 2500.0
    """Silence of the primary (as every reachable dispatcher reports it) before the backup takes over."""


class MetricsConfig(Section):
    """Where the supervisor serves /healthz, /readyz, /metrics and /stats (localhost by default)."""

    listen: Text = "127.0.0.1:9108"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise _rule("", f"{value!r} must be host:port with a port in 1..65535, e.g. 127.0.0.1:9108")
        return value


class SupervisorConfig(Section):
    """Restart policy and hang detection for the roles `run` starts."""

    max_restarts: Annotated[StrictInt, Field(ge=0, le=1000)] = 5
    restart_window_s: Seconds = 300.0
    heartbeat_timeout_s: Annotated[StrictFloat, Field(gt=0, le=3600)] = 15.0
    stop_timeout_s: Annotated[StrictFloat, Field(gt=0, le=3600)] = 15.0
    restart_backoff_s: Annotated[StrictFloat, Field(ge=0, le=3600)] = 1.0


class LimitsConfig(Section):
    """Bounds on input the daemon accepts, checked before any work is done on it."""

    max_image_pixels: Annotated[StrictInt, Field(ge=1, le=2_000_000_000)] = 100_000_000
    """Images (files, HTTP/MJPEG frames, uploads) with more pixels are refused from their header, never decoded."""


class DaemonConfig(Section):
    """The whole config; `path` is the file it came from (relative paths resolve against its folder)."""

    state_dir: Annotated[Text, Field(min_length=1)]
    engine: EngineConfig
    cameras: Annotated[tuple[CameraConfig, ...], Field(min_length=1, max_length=256)]
    worker: WorkerConfig = WorkerConfig()
    alerts: AlertConfig = AlertConfig()
    recorder: RecorderConfig = RecorderConfig()
    calibration: CalibrationConfig = CalibrationConfig()
    sockets: SocketConfig = SocketConfig()
    dispatch: DispatchConfig = DispatchConfig()
    publisher: PublisherConfig = PublisherConfig()
    metrics: MetricsConfig = MetricsConfig()
    supervisor: SupervisorConfig = SupervisorConfig()
    limits: LimitsConfig = LimitsConfig()
    console: ConsoleConfig = ConsoleConfig()
    sinks: Annotated[tuple[SinkConfig, ...], Field(max_length=MAX_SINKS)] = ()
    shifts: Annotated[tuple[ShiftConfig, ...], Field(max_length=24)] = ()
    stats: StatsConfig = StatsConfig()
    health: HealthConfig = HealthConfig()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _path: str = PrivateAttr("")

    @field_validator("sinks", mode="before")
    @classmethod
    def _sink_types(cls, value: Any) -> Any:
        return sink_models(value)

    @model_validator(mode="after")
    def _across_sections(self) -> "DaemonConfig":
        seen: set[str] = set()
        ports: set[int] = set()
        remote = self.sockets.remote
        if remote is not None:
            ports.add(remote.results_port)
        for i, cam in enumerate(self.cameras):
            if cam.id in seen:
                raise _rule(f"cameras[{i}].id", f"{cam.id!r} is used by two cameras")
            seen.add(cam.id)
            if cam.tcp_port is not None:
                if self.dispatch.enabled:
                    raise _rule(f"cameras[{i}].tcp_port", "only for dispatch.enabled: false; with dispatch, remote "
                                "workers reach this host's dispatcher on dispatch.port")
                if remote is None:
                    raise _rule(f"cameras[{i}].tcp_port", "set sockets.remote too (remote workers need CurveZMQ keys)")
                if cam.tcp_port in ports:
                    raise _rule(f"cameras[{i}].tcp_port", f"{cam.tcp_port} is already used by another camera or "
                                "sockets.remote.results_port; give each its own port")
                ports.add(cam.tcp_port)
        if self.dispatch.port is not None:
            if remote is None:
                raise _rule("dispatch.port", "set sockets.remote too (remote workers need CurveZMQ keys)")
            if self.dispatch.port in ports:
                raise _rule("dispatch.port", f"{self.dispatch.port} is already used by a camera or "
                            "sockets.remote.results_port")
        if self.publisher.backup_host is not None:
            if remote is None:
                raise _rule("publisher.backup_host", "set sockets.remote too (the pair talks over CurveZMQ TCP)")
            if not self.dispatch.enabled:
                raise _rule("publisher.backup_host", "needs dispatch.enabled: the dispatchers fence a "
                            "publisher that lost its turn")
            if self.publisher.takeover_ms < 4 * self.dispatch.heartbeat_ms:
                raise _rule("publisher.takeover_ms", f"{self.publisher.takeover_ms:g} must be at least 4 x "
                            f"dispatch.heartbeat_ms ({self.dispatch.heartbeat_ms:g})")
        try:
            check_sinks(self.sinks, [cam.id for cam in self.cameras])
        except SinkConfigError as err:
            raise _rule(f"sinks{err.key}", err.text) from None
        check_shifts(self.shifts)
        check_linestats(self)
        return self

    @property
    def path(self) -> str:
        """The config file this came from ('' when built from a mapping)."""
        return self._path

    @property
    def state_path(self) -> Path:
        """The one directory all state lives in (alerts, recordings, calibration, embeddings)."""
        return self._resolve(self.state_dir)

    @property
    def run_path(self) -> Path:
        """Directory of ipc:// sockets: systemd's RuntimeDirectory when set, else state_dir/run."""
        if self.sockets.run_dir:
            return self._resolve(self.sockets.run_dir)
        runtime = os.environ.get("RUNTIME_DIRECTORY")
        if runtime:
            return Path(runtime.split(":")[0])
        return self.state_path / "run"

    @property
    def onnx_path(self) -> Path | None:
        """The exported ONNX folder for backend onnx, resolved like every config path."""
        return self._resolve(self.engine.onnx_dir) if self.engine.onnx_dir else None

    @property
    def model_path(self) -> Path:
        """The local model folder (the engine never downloads)."""
        return self._resolve(self.engine.model_dir)

    def resolve(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return self._resolve(value)

    def _resolve(self, value: str) -> Path:
        path = Path(value).expanduser()
        if not path.is_absolute() and self.path:
            path = Path(self.path).resolve().parent / path
        return path.resolve()

    def camera(self, camera_id: str) -> CameraConfig:
        """The camera with this id, or a ConfigError listing the ids there are."""
        for camera in self.cameras:
            if camera.id == camera_id:
                return camera
        raise ConfigError(f"--camera {camera_id}: no such camera (config has: {', '.join(c.id for c in self.cameras)})")

    def endpoint(self, name: str, camera: str = "") -> str:
        """A socket endpoint with {run_dir} and {camera} filled in."""
        template = getattr(self.sockets, name)
        return template.format(run_dir=self.run_path, camera=camera)

    @property
    def dispatch_hosts(self) -> tuple[str, ...]:
        """Capture hosts whose dispatchers a remote worker or publisher connects to."""
        if self.dispatch.hosts:
            return self.dispatch.hosts
        return (self.sockets.remote.host,) if self.sockets.remote is not None else ()

    def dispatcher_endpoints(self, remote: bool) -> list[str]:
        """Every capture host's dispatcher over TCP (`remote`), else this host's over ipc."""
        if remote:
            return [f"tcp://{host}:{self.dispatch.port}" for host in self.dispatch_hosts]
        return [self.endpoint("dispatch")]

    def threshold(self, camera: CameraConfig, class_name: str) -> float:
        """The config's threshold for one class (a calibrated one may replace it in the worker)."""
        return camera.thresholds.get(class_name, self.alerts.default_threshold)


def source_kind(source: str) -> str:
    """Classify a camera source string."""
    lowered = source.lower()
    if lowered == "synthetic":
        return "synthetic"
    if lowered.startswith(("rtsp://", "rtsps://")):
        return "rtsp"
    if lowered.startswith(("http://", "https://")):
        return "http"
    if re.fullmatch(r"/dev/video\d+|\d+", source):
        return "usb"
    return "file"


def config_json_schema() -> dict[str, Any]:
    """JSON Schema of the config file (draft 2020-12); cross-field rules are checked by parse_config only."""
    return DaemonConfig.model_json_schema()


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _key_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _with_key(path: str, key: str) -> str:
    if not key:
        return path
    if not path or key.startswith("["):
        return path + key
    return f"{path}.{key}"


_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}
_TYPES = {"int_type": "must be an integer", "int_from_float": "must be an integer", "float_type": "must be a number",
          "bool_type": "must be true or false", "string_type": "must be a string",
          "finite_number": "must be a finite number"}


def _one_line(error: ErrorDetails) -> str:
    """One pydantic error as `key.path: what is wrong and what would be right`."""
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    path = _with_key(_key_path(tuple(error["loc"])), str(ctx.get("config_key", "")))
    if kind == "missing":
        text = "required key is missing"
    elif kind in _BOUNDS:
        sign, bound = _BOUNDS[kind]
        text = f"{_show(value)} must be {sign} {ctx[bound]}"
    elif kind in _TYPES:
        text = f"{_show(value)} {_TYPES[kind]}"
    elif kind == "literal_error":
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        text = f"{_show(value)} must be one of {', '.join(choices)}"
    elif kind in ("tuple_type", "list_type"):
        text = f"expected a list, got {_show(value)}"
    elif kind in ("dict_type", "model_type", "dataclass_type"):
        text = f"expected a mapping, got {_show(value)}"
    elif kind == "string_too_short":
        text = "must not be empty"
    elif kind == "string_too_long":
        text = f"is longer than {ctx.get('max_length')} characters"
    elif kind == "too_short":
        least = ctx.get("min_length")
        text = f"list at least {'one' if least == 1 else least}"
    elif kind == "too_long":
        text = f"at most {ctx.get('max_length')} item(s), got {ctx.get('actual_length')}"
    else:
        text = error["msg"].removeprefix("Value error, ")
    return f"{path}: {text}" if path else text


def parse_config(data: Any, path: str = "") -> DaemonConfig:
    """Validate an already-loaded YAML document; every problem is a one-line ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config: expected a mapping of sections (state_dir, engine, cameras, ...), got {_show(data)}")
    try:
        config = DaemonConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err.errors(include_url=False)[0]).replace("\n", " ")) from None
    config._path = path
    return config


def _loader() -> type:
    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def check_yaml_shape(text: str, where: str) -> None:
    """Refuse deep nesting and alias bombs from the event stream, before anything is built.

    Each node's expanded size (its own node plus everything under it, aliases counted as
    the nodes they stand for) is summed as the events go by, so a billion-laughs file is
    refused after a few hundred events, and a 20,000-deep one at depth MAX_YAML_DEPTH.
    """
    sizes: dict[str, int] = {}
    stack: list[list[Any]] = []
    total = 0

    def close(size: int, anchor: str | None) -> None:
        nonlocal total
        if anchor:
            sizes[anchor] = size
        if stack:
            stack[-1][1] += size
        else:
            total += size
        if size > MAX_YAML_NODES or total > MAX_YAML_NODES:
            raise ConfigError(f"{where}: the YAML expands to more than {MAX_YAML_NODES} nodes "
                              "(aliases that repeat aliases?); write the config out plainly")

    try:
        for event in yaml.parse(text, Loader=_loader()):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                if len(stack) >= MAX_YAML_DEPTH:
                    line = f" line {event.start_mark.line + 1}" if event.start_mark else ""
                    raise ConfigError(f"{where}:{line} YAML nested deeper than {MAX_YAML_DEPTH} levels")
                stack.append([event.anchor, 1])
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                anchor, size = stack.pop()
                close(size, anchor)
            elif isinstance(event, yaml.ScalarEvent):
                close(1, event.anchor)
            elif isinstance(event, yaml.AliasEvent):
                close(sizes.get(event.anchor, 1), None)
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(err, where)) from None


def _yaml_problem(err: yaml.YAMLError, where: str) -> str:
    mark = getattr(err, "problem_mark", None)
    line = f" line {mark.line + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{where}:{line} invalid YAML: {problem}"


def parse_config_text(text: str, path: str = "") -> DaemonConfig:
    """Validate config YAML text (a file's, or an edit from the console) with the same bounds as a file."""
    where = path or "config"
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: config is larger than {MAX_CONFIG_BYTES // 1000} kB; is this the right file?")
    check_yaml_shape(text, where)
    try:
        data = yaml.load(text, Loader=_loader())
    except yaml.YAMLError as err:
        raise ConfigError(_yaml_problem(err, where)) from None
    return parse_config(data, path)


def load_config(path: str | Path) -> DaemonConfig:
    """Read and validate a config file; every problem is a one-line ConfigError."""
    file = Path(path)
    try:
        with open(file, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: config is larger than {MAX_CONFIG_BYTES // 1000} kB; is this the right file?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save the config as UTF-8") from None
    return parse_config_text(text, str(file))
