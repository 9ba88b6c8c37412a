"""What the publisher remembers across a restart: alert cooldowns and k-of-n windows, the last
sequence number seen per camera session (the gap counter's base) and the next alert id.

Without it a restarted publisher alerts again inside a cooldown and counts every frame
of the running capture session as a gap. The document is rewritten in place after every
result (one pwrite on a file kept open, about 50 us; no rename, no fsync): it must survive the
process, not a power cut, and overwriting bytes that exist needs no new disk space, so it
keeps working on a full disk. The reader takes the first JSON object in the file (a
shorter document leaves stale bytes behind it until the truncate); a file that cannot be
read is ignored with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

VERSION = 1


class PublisherState:
    """Load and save the state document in the state dir."""

    def __init__(self, path: Path, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self.errors = 0
        self.error = ""
        self._fd: int | None = None
        self._logged_at = 0.0

    def load(self) -> dict[str, Any]:
        """The saved document, or {} when there is none or it cannot be read."""
        try:
            text = self.path.read_text()
            document, _end = json.JSONDecoder().raw_decode(text)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as err:
            self.log.warning("ignoring unreadable %s (%s); cooldowns and gap counts start afresh", self.path, err)
            return {}
        if not isinstance(document, dict) or document.get("version") != VERSION:
            self.log.warning("ignoring %s: not a version %d publisher state", self.path, VERSION)
            return {}
        return document

    def save(self, document: dict[str, Any]) -> bool:
        """Overwrite the file in place; False (counted, logged at most every 10 s) when the disk refuses."""
        data = json.dumps({**document, "version": VERSION}, separators=(",", ":")).encode() + b"\n"
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            written = os.pwrite(self._fd, data, 0)
            if written != len(data):
                raise OSError(f"short write ({written} of {len(data)} bytes)")
            os.ftruncate(self._fd, len(data))
        except OSError as err:
            self.errors += 1
            self.error = str(err)
            if time.monotonic() - self._logged_at > 10.0:
                self._logged_at = time.monotonic()
                self.log.error("cannot save publisher state to %s (%s); a restart now would forget cooldowns",
                               self.path, err)
            return False
        self.error = ""
        return True

    def close(self) -> None:
        """Close the file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
