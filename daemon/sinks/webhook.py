"""Webhook sink: POST each alert as JSON, signed, with an idempotency key.

Headers: `X-Iseg-Timestamp` (unix seconds), `X-Iseg-Signature: sha256=<hex>` — HMAC-SHA256
with the secret file's contents over `<timestamp>.<body>` (the receiver recomputes it
and rejects old timestamps, which stops replays) — and `Idempotency-Key:
<instance>:<alert id>`. 2xx is delivered; 4xx other than 408/429 means the receiver
will never take this alert (dead-lettered, re-sendable); anything else is retried.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx

from daemon.sinks.config import WebhookSinkConfig
from daemon.sinks.delivery import DeliveryError, Rejected, Sink, SinkContext, SinkSetupError, read_secret

RETRYABLE_4XX = (408, 429)


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Iseg-Signature value for a body sent at `timestamp`."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


class WebhookSink(Sink):
    """httpx client with one connection pool; each alert is one POST."""

    config: WebhookSinkConfig

    def __init__(self, config: WebhookSinkConfig, context: SinkContext) -> None:
        super().__init__(config, context)
        self.secret: bytes | None = None
        self.client: httpx.Client | None = None
        logging.getLogger("httpx").setLevel(logging.WARNING)

    def describe(self) -> str:
        """The URL without credentials or query."""
        url = httpx.URL(self.config.url)
        return f"POST {url.scheme}://{url.host}{':' + str(url.port) if url.port else ''}{url.path}"

    def start(self) -> None:
        """Read the secret, build the client."""
        if self.config.secret_file:
            self.secret = read_secret(self.context, self.config.secret_file, "secret_file").encode()
        else:
            self.context.log.warning("sink %s: no secret_file, alerts are sent unsigned", self.name)
        verify: Any = True
        if self.config.tls_ca:
            ca = self.context.resolve(self.config.tls_ca)
            if not ca.is_file():
                raise SinkSetupError(f"tls_ca {ca} is not a file")
            verify = str(ca)
        self.client = httpx.Client(timeout=self.config.timeout_s, verify=verify,
                                   headers={"User-Agent": "iseg-inspect sinks"})

    def deliver(self, alert: dict[str, Any], key: str, seq: int | None) -> None:
        """One signed POST; raises by the rules above."""
        assert self.client is not None
        body = json.dumps({**alert, "instance": self.context.instance}, separators=(",", ":")).encode()
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Iseg-Timestamp": timestamp, "Idempotency-Key": key,
                   "X-Iseg-Alert-Id": str(alert.get("id"))}
        if self.secret is not None:
            headers["X-Iseg-Signature"] = signature(self.secret, timestamp, body)
        try:
            response = self.client.post(self.config.url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise DeliveryError(f"no answer from {self.describe()} within {self.config.timeout_s:g}s") from None
        except httpx.ConnectError as err:
            raise DeliveryError(f"cannot connect to {self.describe()}: {err}") from None
        except httpx.RemoteProtocolError:
            raise DeliveryError(f"{self.describe()} closed the connection before answering") from None
        except httpx.HTTPError as err:
            raise DeliveryError(f"{self.describe()}: {type(err).__name__}: {err}") from None
        code = response.status_code
        if 200 <= code < 300:
            return
        text = response.text.strip().replace("\n", " ")[:200]
        if 400 <= code < 500 and code not in RETRYABLE_4XX:
            raise Rejected(f"HTTP {code} {text}".strip())
        raise DeliveryError(f"HTTP {code} {text}".strip())

    def close(self) -> None:
        """Close the connection pool."""
        if self.client is not None:
            self.client.close()
