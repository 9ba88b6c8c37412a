"""CurveZMQ for workers on other hosts: the main host's sockets are Curve servers that accept
only clients whose public keys sit in `authorized_clients_dir`; a remote worker is a Curve client.

ZeroMQ copies socket options at bind/connect time, so one socket can bind a plain ipc://
endpoint for local roles first and a Curve-secured tcp:// endpoint for remote ones after.
"""

from __future__ import annotations

import logging
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from daemon.config import ConfigError, DaemonConfig

_authenticators: dict[int, ThreadAuthenticator] = {}
log = logging.getLogger("iseg.security")


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret_key = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"sockets.remote: cannot load key file {path}: {err}") from None
    if secret and not secret_key:
        raise ConfigError(f"sockets.remote: {path} holds no secret key (give the .key_secret file)")
    return public, secret_key


def _start_authenticator(ctx: zmq.Context, config: DaemonConfig) -> None:
    remote = config.sockets.remote
    assert remote is not None
    if id(ctx) in _authenticators:
        return
    auth = ThreadAuthenticator(ctx)
    auth.start()
    if remote.authorized_clients_dir:
        clients = config.resolve(remote.authorized_clients_dir)
        if not clients.is_dir():
            raise ConfigError(f"sockets.remote.authorized_clients_dir: {clients} is not a directory")
        auth.configure_curve(domain="*", location=str(clients))
    else:
        auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        log.warning("sockets.remote.authorized_clients_dir is empty: any client with the server key may connect")
    _authenticators[id(ctx)] = auth


def bind_curve_server(ctx: zmq.Context, sock: zmq.Socket, config: DaemonConfig, port: int) -> str:
    """Make `sock` a Curve server and bind it on the remote TCP port; returns the endpoint."""
    remote = config.sockets.remote
    assert remote is not None
    _start_authenticator(ctx, config)
    public, secret = _load(config.resolve(remote.server_key), secret=True)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    endpoint = f"tcp://{remote.bind_host}:{port}"
    sock.bind(endpoint)
    return endpoint


def connect_curve_client(sock: zmq.Socket, config: DaemonConfig, port: int, host: str | None = None) -> str:
    """Make `sock` a Curve client of `host` (default: the main host, sockets.remote.host) and connect
    it; returns the endpoint."""
    remote = config.sockets.remote
    assert remote is not None
    server_public, _ = _load(config.resolve(remote.server_key), secret=False)
    public, secret = _load(config.resolve(remote.client_key), secret=True)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    endpoint = f"tcp://{host or remote.host}:{port}"
    sock.connect(endpoint)
    return endpoint


def connect_endpoint(sock: zmq.Socket, config: DaemonConfig, endpoint: str) -> str:
    """Connect to an endpoint: a tcp:// one (another host) as a Curve client, ipc:// as it is."""
    if endpoint.startswith("tcp://"):
        host, port = endpoint[len("tcp://"):].rsplit(":", 1)
        return connect_curve_client(sock, config, int(port), host=host)
    sock.connect(endpoint)
    return endpoint


def stop_authenticators() -> None:
    """Stop ZAP threads before the context terminates."""
    for auth in _authenticators.values():
        auth.stop()
    _authenticators.clear()


def generate_keys(directory: Path) -> list[Path]:
    """A server and a client key pair (zmq.auth certificate files) in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("server", "client"):
        public, secret = zmq.auth.create_certificates(str(directory), name)
        written += [Path(public), Path(secret)]
    return written
