"""`iseg dispatch stats`: ask this host's running dispatcher for its per-camera frame accounting."""

from __future__ import annotations

import json
from typing import Any

import zmq

from daemon.config import ConfigError, DaemonConfig
from daemon.wire import encode_header

ASK_TIMEOUT_MS = 2000


def ask_stats(config: DaemonConfig, timeout_ms: int = ASK_TIMEOUT_MS) -> dict[str, Any]:
    """The dispatcher's accounting over its local ipc socket; ConfigError when none answers."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(config.endpoint("dispatch"))
        sock.send_multipart([b"stats", encode_header({})])
        if not sock.poll(timeout_ms):
            raise ConfigError(f"no dispatcher answered on {config.endpoint('dispatch')} within {timeout_ms} ms "
                              "(is `iseg dispatch` or `iseg run` running with this config?)")
        topic, header = sock.recv_multipart()[:2]
        return json.loads(header)
    finally:
        sock.close(0)


def print_stats(config: DaemonConfig, as_json: bool) -> int:
    """Print the accounting, one line per camera (or JSON)."""
    stats = ask_stats(config)
    if as_json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"dispatcher {stats['instance']}; leader {stats['leader'] or '(none)'} epoch {stats['epoch']}; "
          f"workers: {', '.join(stats['workers']) or '(none)'}")
    print(f"{'camera':<16}{'captured':>10}{'dropped':>9}{'published':>11}{'resent':>8}{'lost':>6}{'in flight':>11}")
    for camera, flow in stats["cameras"].items():
        print(f"{camera:<16}{flow['captured']:>10}{flow['dropped']:>9}{flow['published']:>11}{flow['resent']:>8}"
              f"{flow['lost']:>6}{flow['in_flight']:>11}")
        reasons = {reason: count for reason, count in flow["lost_reasons"].items() if count}
        if reasons:
            print(" " * 16 + "lost: " + ", ".join(f"{count} {reason}" for reason, count in reasons.items()))
    return 0
