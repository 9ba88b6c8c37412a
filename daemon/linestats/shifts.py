"""Which shift and which local hour a capture time falls in, in the configured time zone."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from daemon.linestats.config import ShiftConfig


class ShiftCalendar:
    """Shifts start at local times of day and last until the next one starts (the last wraps past midnight)."""

    def __init__(self, shifts: tuple[ShiftConfig, ...], timezone: str) -> None:
        self.zone = ZoneInfo(timezone)
        self.shifts = sorted(shifts, key=lambda s: s.minute_of_day)

    def local(self, ts: float) -> dt.datetime:
        """The capture time as a local datetime."""
        return dt.datetime.fromtimestamp(ts, self.zone)

    def hour(self, ts: float) -> str:
        """The local hour, e.g. '2026-03-29 02:00' (DST-correct: a repeated hour shows its UTC offset)."""
        local = self.local(ts)
        return local.strftime("%Y-%m-%d %H:00") + ("" if local.fold == 0 else f" ({local.strftime('%z')})")

    def shift(self, ts: float) -> str:
        """The shift with the date it started on, e.g. '2026-03-02 night' (a night shift keeps its start date
        after midnight); 'all day' dates when no shifts are configured."""
        local = self.local(ts)
        if not self.shifts:
            return local.strftime("%Y-%m-%d") + " all day"
        minute = local.hour * 60 + local.minute
        current = None
        for shift in self.shifts:
            if shift.minute_of_day <= minute:
                current = shift
        day = local.date()
        if current is None:
            current = self.shifts[-1]
            day -= dt.timedelta(days=1)
        return f"{day.isoformat()} {current.name}"
