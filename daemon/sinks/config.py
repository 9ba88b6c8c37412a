"""The `sinks:` config section as pydantic v2 models: a list discriminated on `type`.

Every sink has a `name` (it labels metrics and its cursor), optional filters (cameras,
classes, minimum presence) and retry/circuit-breaker settings; the rest depends on
`type: mqtt | webhook | modbus`. Secrets are never inline: `password_file` and
`secret_file` name files read when the sink starts.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Iterable, Literal, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

SINK_TYPES = ("mqtt", "webhook", "modbus")
MAX_SINKS = 12
"""Each sink's live state takes 5 of the 64 keys a role's heartbeat may carry."""


class SinkConfigError(ValueError):
    """A `sinks:` rule across entries is broken; `key` is relative to `sinks` (e.g. `[1].name`)."""

    def __init__(self, key: str, text: str) -> None:
        super().__init__(f"sinks{key}: {text}")
        self.key = key
        self.text = text


class _Model(BaseModel):
    """Frozen, finite numbers, unknown keys refused with the list of known ones (like every config section)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            known = [f.alias or name for name, f in cls.model_fields.items()]
            for key in data:
                if key not in known:
                    raise PydanticCustomError("unknown_key", "unknown key (known: {known})",
                                              {"config_key": str(key), "known": ", ".join(known)})
        return data


class SinkBase(_Model):
    """What every sink has: a name, filters, and how hard to retry."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=64)
    cameras: tuple[str, ...] = ()
    classes: tuple[str, ...] = ()
    min_presence: float = Field(0.0, ge=0.0, le=1.0)
    retry_initial_s: float = Field(0.5, gt=0)
    retry_max_s: float = Field(30.0, gt=0)
    breaker_failures: int = Field(5, ge=1)
    breaker_open_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _retry_bounds(self) -> "SinkBase":
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(f"retry_max_s ({self.retry_max_s:g}) must be >= retry_initial_s ({self.retry_initial_s:g})")
        return self

    def accepts(self, alert: dict[str, Any]) -> bool:
        """True when the alert passes this sink's camera, class and presence filters."""
        if self.cameras and alert.get("camera") not in self.cameras:
            return False
        name = alert.get("class")
        if self.classes and name not in self.classes:
            return False
        if self.min_presence > 0.0:
            presence = (alert.get("classes") or {}).get(name, {}).get("presence", 0.0)
            return float(presence) >= self.min_presence
        return True


class MqttSinkConfig(SinkBase):
    """Alerts to `<prefix>/<camera>/alert` (QoS 1), health retained, availability as last will."""

    type: Literal["mqtt"]
    host: str = Field(min_length=1)
    port: int = Field(1883, ge=1, le=65535)
    prefix: str = "iseg"
    client_id: str | None = None
    username: str | None = None
    password_file: str | None = None
    tls_ca: str | None = None
    keepalive_s: int = Field(30, ge=5)
    stats_interval_s: float = Field(10.0, gt=0)
    ack_timeout_s: float = Field(5.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "MqttSinkConfig":
        if not re.fullmatch(r"[^#+/\s][^#+\s]*", self.prefix) or self.prefix.endswith("/"):
            raise ValueError(f"prefix {self.prefix!r} must be a topic level without + # or spaces, e.g. iseg or plant/line1")
        if self.password_file and not self.username:
            raise ValueError("password_file needs username too")
        return self


class WebhookSinkConfig(SinkBase):
    """Alerts POSTed as JSON, signed with HMAC-SHA256 when a secret file is given."""

    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://\S+$")
    secret_file: str | None = None
    timeout_s: float = Field(5.0, gt=0)
    tls_ca: str | None = None


class ModbusOutput(_Model):
    """A coil pulsed for each alert of one camera (and optionally one class)."""

    camera: str
    class_name: str | None = Field(None, alias="class")
    coil: int = Field(ge=0, le=65535)


class ModbusSinkConfig(SinkBase):
    """A PLC over Modbus TCP: reject coils, an alert counter register, a "vision OK" heartbeat."""

    type: Literal["modbus"]
    host: str = Field(min_length=1)
    port: int = Field(502, ge=1, le=65535)
    unit_id: int = Field(1, ge=0, le=255)
    timeout_s: float = Field(1.0, gt=0)
    outputs: tuple[ModbusOutput, ...] = ()
    pulse_ms: int = Field(500, ge=10)
    pulse_max_age_s: float = Field(10.0, gt=0)
    counter_register: int | None = Field(None, ge=0, le=65535)
    heartbeat_ms: int = Field(1000, ge=50)
    heartbeat_coil: int | None = Field(None, ge=0, le=65535)
    heartbeat_register: int | None = Field(None, ge=0, le=65535)
    max_frame_gap_ms: int | None = Field(None, ge=50)

    @model_validator(mode="after")
    def _check(self) -> "ModbusSinkConfig":
        if not (self.outputs or self.counter_register is not None or self.heartbeat_coil is not None
                or self.heartbeat_register is not None):
            raise ValueError("set at least one of outputs, counter_register, heartbeat_coil, heartbeat_register")
        coils = [o.coil for o in self.outputs]
        if self.heartbeat_coil is not None and self.heartbeat_coil in coils:
            raise ValueError(f"heartbeat_coil {self.heartbeat_coil} is also an output coil; give it its own")
        if self.heartbeat_register is not None and self.heartbeat_register == self.counter_register:
            raise ValueError("heartbeat_register and counter_register must differ")
        return self

    @property
    def frame_gap_s(self) -> float:
        """How long without a published frame before a camera counts as not inspected."""
        return (self.max_frame_gap_ms or self.heartbeat_ms) / 1000.0

    def coils_for(self, alert: dict[str, Any]) -> list[int]:
        """The output coils an alert pulses."""
        return [o.coil for o in self.outputs
                if o.camera == alert.get("camera") and o.class_name in (None, alert.get("class"))]


SinkConfig = Annotated[Union[MqttSinkConfig, WebhookSinkConfig, ModbusSinkConfig], Field(discriminator="type")]

_MODELS: dict[str, type[SinkBase]] = {"mqtt": MqttSinkConfig, "webhook": WebhookSinkConfig,
                                      "modbus": ModbusSinkConfig}

_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _relative_key(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _error_text(error: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return "required key is missing"
    if kind in _BOUNDS:
        bound = next(v for k, v in ctx.items() if k in ("gt", "ge", "lt", "le"))
        return f"{error.get('input')!r} must be {_BOUNDS[kind]} {bound}"
    if kind == "string_pattern_mismatch":
        return f"{error.get('input')!r} does not match {ctx.get('pattern')}"
    text = error["msg"].removeprefix("Value error, ")
    return text if kind in ("value_error", "unknown_key") else f"{error.get('input')!r}: {text}"


def parse_sink(data: Any, index: int) -> SinkBase:
    """One `sinks:` entry → the model its `type` names; SinkConfigError keyed like `[0].host`."""
    if isinstance(data, SinkBase):
        return data
    if not isinstance(data, Mapping):
        raise SinkConfigError(f"[{index}]", f"expected a mapping with type: {' | '.join(SINK_TYPES)}, got {data!r}")
    kind = data.get("type")
    if kind not in _MODELS:
        raise SinkConfigError(f"[{index}].type", f"{kind!r} must be one of {', '.join(SINK_TYPES)}")
    try:
        return _MODELS[kind].model_validate(data)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        loc = list(first["loc"])
        key = (first.get("ctx") or {}).get("config_key")
        if key:
            loc.append(key)
        raise SinkConfigError(f"[{index}]{_relative_key(loc)}", _error_text(first)) from None


def sink_models(value: Any) -> Any:
    """Before-validator of DaemonConfig.sinks: each entry becomes its type's model, errors keyed by index."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        return value
    try:
        return tuple(parse_sink(item, i) for i, item in enumerate(value))
    except SinkConfigError as err:
        raise PydanticCustomError("config_rule", "{text}", {"config_key": err.key, "text": err.text}) from None


def check_sinks(sinks: Iterable[SinkBase], camera_ids: Iterable[str]) -> None:
    """Rules across sinks and cameras: unique names, cameras that exist."""
    known = list(camera_ids)
    names: set[str] = set()
    for i, sink in enumerate(sinks):
        if sink.name in names:
            raise SinkConfigError(f"[{i}].name", f"{sink.name!r} is used by two sinks")
        names.add(sink.name)
        for camera in sink.cameras:
            if camera not in known:
                raise SinkConfigError(f"[{i}].cameras", f"{camera!r} is not a camera id (config has: {', '.join(known)})")
        if isinstance(sink, ModbusSinkConfig):
            for j, output in enumerate(sink.outputs):
                if output.camera not in known:
                    raise SinkConfigError(f"[{i}].outputs[{j}].camera",
                                          f"{output.camera!r} is not a camera id (config has: {', '.join(known)})")
