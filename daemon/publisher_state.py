"""What the publisher remembers across a restart: alert cooldowns and k-of-n windows, the last
sequence number seen per camera session (the gap counter's base) and the next alert id.

Without it a restarted publisher alerts again inside a cooldown and counts every frame
of the running capture session as a gap. The file is replaced atomically after every
result (a rename, no fsync: it must survive the process, not a power cut, and costs
tens of microseconds); a file that cannot be read is ignored with a warning.
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
        self.tmp = path.with_name(path.name + ".tmp")
        self.log = log
        self.errors = 0
        self.error = ""
        self._logged_at = 0.0

    def load(self) -> dict[str, Any]:
        """The saved document, or {} when there is none or it cannot be read."""
        try:
            document = json.loads(self.path.read_text())
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
        """Replace the file; False (counted, logged at most every 10 s) when the disk refuses."""
        try:
            with open(self.tmp, "w") as handle:
                json.dump({**document, "version": VERSION}, handle, separators=(",", ":"))
            os.replace(self.tmp, self.path)
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
