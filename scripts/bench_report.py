"""A benchmark's JSON report that is never lost: saved atomically whenever it changes,
with each section in it before its work starts.

A device run may be cut short at any moment (a section's budget, the command's time
limit, an OOM, a failed capture). So a section's dict is put in the report, and the
report written, before the section does anything; the section then fills that same dict
(batch by batch) and calls `save()` after each step; an exception, or the section
running past its budget, is recorded in that dict with its full traceback and printed
whole, and the next section runs. Every write goes to a temporary file that is then
renamed over the report, so a reader (or a kill -9) never sees half a file.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TRACEBACK_KEEP = 40_000
"""Characters of a traceback kept in the JSON: all of it up to this, else its start and its end."""


class SectionTimeout(Exception):
    """A section ran past its time budget."""


def now() -> str:
    """UTC wall-clock time as ISO 8601."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def plain(value: Any) -> Any:
    """`value` as strict JSON: numpy scalars and arrays become Python numbers and lists,
    NaN and infinities become None, paths and other objects become strings."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "tolist"):
        return plain(value.tolist())
    return str(value)


def keep_ends(text: str, limit: int = TRACEBACK_KEEP) -> str:
    """The text whole when short enough, else its first and last halves of `limit` (the
    cause of a chained error is at the start, the failing line at the end)."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit} characters left out ...]\n{text[-half:]}"


class Report:
    """The JSON report at `path`, rewritten atomically on every `save()`."""

    def __init__(self, path: Path, **fields: Any) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data: dict[str, Any] = {"started": now(), **fields, "sections": {}}
        self.save()

    def save(self) -> None:
        """Write the whole report to a temporary file and rename it over the report."""
        text = json.dumps(plain(self.data), indent=2, allow_nan=False) + "\n"
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        partial.write_text(text)
        os.replace(partial, self.path)

    @contextmanager
    def section(self, name: str, budget_s: float) -> Iterator[dict[str, Any]]:
        """Run the body as section `name`: its dict is in the report (status "running") before
        the body starts; the body fills it and calls save(). An exception, or the budget
        running out (SIGALRM, main thread), is recorded with its full traceback as status
        "error" or "timeout", printed whole, and not raised further. A body that sets
        entry["skipped"] (the reason) ends as status "skipped"."""
        entry: dict[str, Any] = {"status": "running", "started": now(), "budget_s": budget_s}
        self.data["sections"][name] = entry
        self.save()
        print(f"[gpu_bench] {name}: started (budget {budget_s:g} s)", flush=True)
        started = time.perf_counter()

        def expire(_signum: int, _frame: Any) -> None:
            raise SectionTimeout(f"section {name} ran past its budget of {budget_s:g} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, budget_s)
        try:
            yield entry
            entry["status"] = "skipped" if "skipped" in entry else "ok"
        except Exception as error:  # recorded; the next section still runs
            signal.setitimer(signal.ITIMER_REAL, 0)
            trace = traceback.format_exc()
            entry["status"] = "timeout" if isinstance(error, SectionTimeout) else "error"
            entry["error"] = f"{type(error).__name__}: {error}"
            entry["traceback"] = keep_ends(trace)
            print(f"[gpu_bench] {name}: {entry['status'].upper()}: {entry['error']}\n{trace}", flush=True)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            entry["seconds"] = round(time.perf_counter() - started, 2)
            self.save()
            print(f"[gpu_bench] {name}: {entry['status']} in {entry['seconds']} s", flush=True)

    def failed(self) -> list[str]:
        """Names of the sections that did not finish ok (or skipped, with the reason in "skipped")."""
        return [name for name, entry in self.data["sections"].items() if entry.get("status") not in ("ok", "skipped")]


@contextmanager
def alarm_deferred() -> Iterator[None]:
    """Hold a section's budget alarm back while cleanup that must finish runs (stopping a
    daemon); a budget that ran out meanwhile is raised once the block is done."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
