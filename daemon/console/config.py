"""The `console:` config section (pydantic v2: unknown keys are an error, the model is frozen)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator, model_validator


class ConsoleConfig(BaseModel):
    """Where the console listens, who may log in, and how long a session lasts."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: StrictBool = False
    listen: StrictStr = "127.0.0.1:8080"
    tls_cert: StrictStr | None = None
    tls_key: StrictStr | None = None
    users_file: Annotated[StrictStr, Field(min_length=1)] = "console-users.json"
    anonymous_role: Literal["viewer"] | None = None
    session_hours: Annotated[StrictFloat | StrictInt, Field(gt=0, le=24 * 365)] = 12.0
    login_attempts_per_minute: Annotated[StrictInt, Field(ge=1, le=1000)] = 5
    stats_url: StrictStr | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError(f"{value!r} must be host:port, e.g. 127.0.0.1:8080")
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> "ConsoleConfig":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together (give both for HTTPS, or neither)")
        return self

    @property
    def host(self) -> str:
        """The address to bind."""
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        """The TCP port to bind (0: any free one, written to run/console.url)."""
        return int(self.listen.rpartition(":")[2])

    @property
    def tls(self) -> bool:
        """True when serving HTTPS (cookies then carry Secure)."""
        return bool(self.tls_cert)
