"""systemd notification (READY=1, WATCHDOG=1, STOPPING=1) over $NOTIFY_SOCKET, with a plain
datagram socket: no library, and a no-op when not run by systemd."""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends sd_notify messages; `enabled` is False outside systemd."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        watchdog = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s = int(usec) / 2e6 if watchdog else None

    @property
    def enabled(self) -> bool:
        """True when systemd (or a test standing in for it) listens."""
        return bool(self.address)

    def notify(self, message: str) -> bool:
        """Send one message; False when nobody listens or the send failed."""
        if not self.address:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect(self.address)
                sock.sendall(message.encode())
            except OSError:
                return False
        return True
