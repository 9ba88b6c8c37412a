"""The contract between the runner and a receiver: deliver one alert or say why not.

A sink raises `DeliveryError` for anything worth retrying (receiver down, timeout, 5xx)
and `Rejected` when the receiver refused this alert for good (a 4xx other than 408/429):
the runner dead-letters it and moves on. `problem()` reports a connection-level fault
(broker unreachable, login refused) during which the runner does not even try.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from daemon.sinks.inspection import InspectionMonitor


class DeliveryError(Exception):
    """This attempt failed; the same alert is tried again after a backoff."""


class Rejected(DeliveryError):
    """The receiver refused this alert for good; it is dead-lettered (kept, re-sendable)."""


class SinkSetupError(Exception):
    """A sink cannot start (unreadable secret file, bad TLS CA); it stays down and retries later."""


@dataclass
class SinkContext:
    """What a sink may use besides its own config."""

    instance: str
    resolve: Callable[[str], Path]
    cameras: tuple[str, ...]
    frame_gap_s: dict[str, float] = field(default_factory=dict)
    monitor: "InspectionMonitor | None" = None
    status: Callable[[], dict[str, Any]] = field(default=lambda: {})
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("iseg.sinks"))


class Sink:
    """A receiver of alerts; one runner thread calls start, deliver and close."""

    def __init__(self, config: Any, context: SinkContext) -> None:
        self.config = config
        self.context = context
        self.name: str = config.name
        self.probe = False
        """Set for `iseg sinks test` next to a running role: touch no shared receiver state
        (MQTT session, availability, coil resets), deliver the one alert only."""

    def describe(self) -> str:
        """Where alerts go, for logs (never secrets)."""
        raise NotImplementedError

    def start(self) -> None:
        """Connect or prepare; SinkSetupError when it cannot work as configured."""

    def problem(self) -> str | None:
        """A connection-level fault that makes delivering pointless right now, else None."""
        return None

    def deliver(self, alert: dict[str, Any], key: str, seq: int | None) -> None:
        """Hand one alert to the receiver and return once it acknowledged it.

        `key` is the idempotency key (`<instance>:<alert id>`); `seq` is this alert's
        1-based number among the sink's deliveries (None for a test alert).
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (leave the receiver in a safe state)."""


def read_secret(context: SinkContext, path: str, what: str) -> str:
    """A secret from a file named in the config (trailing newline dropped)."""
    file = context.resolve(path)
    try:
        return file.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as err:
        raise SinkSetupError(f"cannot read {what} {file}: {err.strerror or err}") from None
