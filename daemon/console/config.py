"""The `console:` config section (pydantic v2: unknown keys are an error, the model is frozen)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConsoleConfig(BaseModel):
    """Where the console listens, who may log in, and how long a session lasts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    listen: str = "127.0.0.1:8080"
    tls_cert: str | None = None
    tls_key: str | None = None
    users_file: str = "console-users.json"
    anonymous_role: Literal["viewer"] | None = None
    session_hours: float = Field(default=12.0, gt=0)
    login_attempts_per_minute: int = Field(default=5, ge=1)
    stats_url: str | None = None

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
