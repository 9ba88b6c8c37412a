"""The daemon's one YAML config, validated into frozen dataclasses before any role starts.

Every field is typed; unknown keys, wrong types and out-of-range values are a
ConfigError whose message is one line starting with the key path
(`cameras[1].source: ...`), so an operator never sees a traceback for a typo.
Strings may use `${VAR}` or `${VAR:-default}`: secrets (camera passwords) come from the
environment, never from the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from daemon.sinks.config import SinkConfigError, SinkList, check_sinks, parse_sinks
from engine.errors import EngineError
from engine.settings import DEFAULT_BG_CONTEXT, IsegSettings


class ConfigError(Exception):
    """A config that cannot run; the message is one line naming the key path."""


@dataclass(frozen=True)
class SyntheticSource:
    """Generated frames: parts moving on a belt, some with injected defects (deterministic per seed)."""

    seed: int = 0
    width: int = 320
    height: int = 240
    defect_every: int = 3
    corrupt_every: int = 0


@dataclass(frozen=True)
class CameraConfig:
    """One camera: where frames come from, what to look for, and how sure to be."""

    id: str
    source: str
    fps: float = 2.0
    roi: tuple[int, int, int, int] | None = None
    classes: tuple[str, ...] = ("scratch", "dent")
    bg_context: str = DEFAULT_BG_CONTEXT
    thresholds: dict[str, float] = field(default_factory=dict)
    loop: bool = True
    synthetic: SyntheticSource = field(default_factory=SyntheticSource)
    open_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    stall_timeout_s: float = 10.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    tcp_port: int | None = None

    @property
    def source_kind(self) -> str:
        """synthetic, rtsp, http, usb or file: decides which reader opens the source."""
        return source_kind(self.source)


@dataclass(frozen=True)
class EngineConfig:
    """What `engine.segmenter.Segmenter.load` gets; `settings` override ISEG_SPEC defaults."""

    model_dir: str
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    backend: Literal["torch", "onnx"] = "torch"
    onnx_dir: str | None = None
    compile: bool = False
    cuda_graphs: bool = False
    build_tiny_if_missing: bool = False
    settings: IsegSettings = field(default_factory=IsegSettings)


@dataclass(frozen=True)
class WorkerConfig:
    """Batching of the detection worker and how many local workers `run` starts."""

    count: int = 1
    batch_size: int = 2
    max_wait_ms: float = 50.0
    batch_timeout_s: float = 120.0
    torch_threads: int | None = None


@dataclass(frozen=True)
class AlertConfig:
    """Debouncing: a class alerts when flagged in k of the last n frames, then rests for cooldown_s."""

    k: int = 2
    n: int = 3
    cooldown_s: float = 30.0
    default_threshold: float = 0.5
    min_area_px: int = 16
    max_boxes: int = 8


@dataclass(frozen=True)
class RecorderConfig:
    """Where flagged frames go and how long they stay."""

    enabled: bool = True
    retention_days: float = 30.0
    min_free_mb: float = 1024.0
    retention_check_s: float = 30.0
    jpeg_quality: int = 85


@dataclass(frozen=True)
class CalibrationConfig:
    """Threshold = `quantile` of the known-good presence scores plus `margin`."""

    quantile: float = 0.99
    margin: float = 0.02


@dataclass(frozen=True)
class RemoteConfig:
    """TCP endpoints for workers on other hosts, secured with CurveZMQ.

    The main host binds on `bind_host`; a remote worker (`iseg worker --remote`) connects to
    `host`. Key files are those written by `iseg gen-keys` (zmq.auth certificates).
    """

    host: str
    bind_host: str = "127.0.0.1"
    results_port: int = 5599
    server_key: str = ""
    client_key: str = ""
    authorized_clients_dir: str = ""


@dataclass(frozen=True)
class SocketConfig:
    """ZeroMQ endpoints; `{run_dir}` and `{camera}` are filled in. Default: ipc:// under the run dir."""

    run_dir: str | None = None
    frames: str = "ipc://{run_dir}/frames-{camera}.sock"
    results: str = "ipc://{run_dir}/results.sock"
    publish: str = "ipc://{run_dir}/publish.sock"
    replay: str = "ipc://{run_dir}/replay.sock"
    telemetry: str = "ipc://{run_dir}/telemetry.sock"
    frames_hwm: int = 1
    results_hwm: int = 64
    publish_hwm: int = 256
    remote: RemoteConfig | None = None


@dataclass(frozen=True)
class MetricsConfig:
    """Where the supervisor serves /healthz, /readyz, /metrics and /stats (localhost by default)."""

    listen: str = "127.0.0.1:9108"


@dataclass(frozen=True)
class SupervisorConfig:
    """Restart policy and hang detection for the roles `run` starts."""

    max_restarts: int = 5
    restart_window_s: float = 300.0
    heartbeat_timeout_s: float = 15.0
    stop_timeout_s: float = 15.0
    restart_backoff_s: float = 1.0


@dataclass(frozen=True)
class DaemonConfig:
    """The whole config; `path` is the file it came from (relative paths resolve against its folder)."""

    state_dir: str
    engine: EngineConfig
    cameras: tuple[CameraConfig, ...]
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    alerts: AlertConfig = field(default_factory=AlertConfig)
    recorder: RecorderConfig = field(default_factory=RecorderConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    sockets: SocketConfig = field(default_factory=SocketConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    sinks: SinkList = ()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    path: str = ""

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


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(text: str, where: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name)
        if value is None:
            if default is None:
                raise ConfigError(f"{where}: environment variable {name} is not set (use ${{{name}:-default}} for a default)")
            return default
        return value

    return _ENV_PATTERN.sub(replace, text)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check and convert one YAML value to the annotated type; ConfigError names `where`."""
    if tp == SinkList:
        try:
            return parse_sinks(value, where)
        except SinkConfigError as err:
            raise ConfigError(str(err)) from None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if tp is IsegSettings:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping of method settings, got {value!r}")
        try:
            return IsegSettings.from_mapping(value, where=where)
        except EngineError as err:
            message = str(err)
            raise ConfigError(message if message.startswith(where) else f"{where}.{message}") from None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} must be one of {', '.join(map(str, args))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {value!r} must be a number")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {value!r} must be a string")
        return _expand_env(value, where)
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    prefix = f"{where}." if where else ""
    for key in data:
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, spec in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: required key is missing")
    return cls(**kwargs)


def _check(config: DaemonConfig) -> None:
    """Cross-field rules the types alone cannot say."""
    if not config.cameras:
        raise ConfigError("cameras: list at least one camera")
    seen: set[str] = set()
    ports: set[int] = set()
    for i, cam in enumerate(config.cameras):
        where = f"cameras[{i}]"
        if not re.fullmatch(r"[A-Za-z0-9_-]+", cam.id):
            raise ConfigError(f"{where}.id: {cam.id!r} may use only letters, digits, '-' and '_' (it names topics and files)")
        if cam.id in seen:
            raise ConfigError(f"{where}.id: {cam.id!r} is used by two cameras")
        seen.add(cam.id)
        if not cam.source.strip():
            raise ConfigError(f"{where}.source: empty; give rtsp://, http(s)://, a file, /dev/videoN, an index or synthetic")
        if not cam.fps > 0:
            raise ConfigError(f"{where}.fps: {cam.fps} must be > 0")
        if cam.roi is not None and (cam.roi[0] < 0 or cam.roi[1] < 0 or cam.roi[2] <= 0 or cam.roi[3] <= 0):
            raise ConfigError(f"{where}.roi: {list(cam.roi)} must be [x, y, width, height] with x, y >= 0 and a positive size")
        if not cam.classes:
            raise ConfigError(f"{where}.classes: list at least one defect class")
        lowered = [c.strip().lower() for c in cam.classes]
        if any(not c for c in lowered) or len(set(lowered)) != len(lowered):
            raise ConfigError(f"{where}.classes: class names must be non-empty and unique")
        for name, value in cam.thresholds.items():
            if name not in cam.classes:
                raise ConfigError(f"{where}.thresholds.{name}: not one of this camera's classes ({', '.join(cam.classes)})")
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{where}.thresholds.{name}: {value} must be in [0, 1] (presence scores are)")
        for key in ("open_timeout_s", "read_timeout_s", "stall_timeout_s", "reconnect_initial_s", "reconnect_max_s"):
            if not getattr(cam, key) > 0:
                raise ConfigError(f"{where}.{key}: must be > 0")
        if cam.synthetic.width < 64 or cam.synthetic.height < 64:
            raise ConfigError(f"{where}.synthetic: width and height must be >= 64")
        if cam.tcp_port is not None:
            if config.sockets.remote is None:
                raise ConfigError(f"{where}.tcp_port: set sockets.remote too (remote workers need CurveZMQ keys)")
            if cam.tcp_port in ports or not 0 < cam.tcp_port < 65536:
                raise ConfigError(f"{where}.tcp_port: {cam.tcp_port} must be a free port number used by one camera only")
            ports.add(cam.tcp_port)
    e = config.engine
    if e.backend == "onnx" and not e.onnx_dir:
        raise ConfigError("engine.onnx_dir: backend onnx needs the folder written by `iseg export-onnx`")
    if e.onnx_dir and e.backend != "onnx":
        raise ConfigError("engine.onnx_dir: only used with backend: onnx (set backend: onnx or drop onnx_dir)")
    if (e.cuda_graphs or e.compile) and e.backend != "torch":
        raise ConfigError("engine.cuda_graphs/compile: apply to backend torch only (ONNX Runtime optimises its own graph)")
    if e.cuda_graphs and not e.device.startswith("cuda"):
        raise ConfigError(f"engine.cuda_graphs: needs device cuda or cuda:N, not {e.device!r}")
    w = config.worker
    if w.count < 0 or w.batch_size < 1 or w.max_wait_ms < 0 or w.batch_timeout_s <= 0:
        raise ConfigError("worker: count >= 0, batch_size >= 1, max_wait_ms >= 0 and batch_timeout_s > 0 are required")
    a = config.alerts
    if not 1 <= a.k <= a.n:
        raise ConfigError(f"alerts.k: {a.k} must be between 1 and alerts.n ({a.n})")
    if a.cooldown_s < 0 or not 0.0 <= a.default_threshold <= 1.0:
        raise ConfigError("alerts: cooldown_s must be >= 0 and default_threshold in [0, 1]")
    r = config.recorder
    if r.retention_days <= 0 or r.min_free_mb < 0 or not 1 <= r.jpeg_quality <= 100:
        raise ConfigError("recorder: retention_days > 0, min_free_mb >= 0 and jpeg_quality in 1..100 are required")
    c = config.calibration
    if not 0.0 < c.quantile <= 1.0:
        raise ConfigError(f"calibration.quantile: {c.quantile} must be in (0, 1]")
    s = config.sockets
    for name in ("frames", "results", "publish", "replay", "telemetry"):
        endpoint = getattr(s, name)
        if not re.match(r"(ipc|tcp|inproc)://", endpoint):
            raise ConfigError(f"sockets.{name}: {endpoint!r} must start with ipc://, tcp:// or inproc://")
        try:
            endpoint.format(run_dir="x", camera="x")
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"sockets.{name}: {endpoint!r} may only use {{run_dir}} and {{camera}}") from None
    if "{camera}" not in s.frames:
        raise ConfigError("sockets.frames: must contain {camera} (each camera binds its own frame socket)")
    if min(s.frames_hwm, s.results_hwm, s.publish_hwm) < 1:
        raise ConfigError("sockets: the *_hwm queue bounds must be >= 1")
    if s.remote is not None and not (s.remote.server_key and s.remote.client_key):
        raise ConfigError("sockets.remote: server_key and client_key files are required (see `iseg gen-keys`)")
    host, _, port = config.metrics.listen.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"metrics.listen: {config.metrics.listen!r} must be host:port, e.g. 127.0.0.1:9108")
    sup = config.supervisor
    if sup.max_restarts < 0 or sup.restart_window_s <= 0 or sup.heartbeat_timeout_s <= 0 or sup.stop_timeout_s <= 0:
        raise ConfigError("supervisor: max_restarts >= 0 and positive restart_window_s, heartbeat_timeout_s, stop_timeout_s are required")
    try:
        check_sinks(config.sinks, [c.id for c in config.cameras])
    except SinkConfigError as err:
        raise ConfigError(str(err)) from None


def parse_config(data: Any, path: str = "") -> DaemonConfig:
    """Validate an already-loaded YAML document."""
    config = _build(DaemonConfig, data, "")
    config = dataclasses.replace(config, path=path)
    _check(config)
    return config


def load_config(path: str | Path) -> DaemonConfig:
    """Read and validate a config file; every problem is a one-line ConfigError."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config ({err.strerror or err})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from None
    return parse_config(data, str(file))
