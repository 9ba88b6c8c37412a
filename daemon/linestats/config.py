"""The `shifts:`, `stats:` and `health:` sections of the daemon config."""

from __future__ import annotations

import re
from typing import Annotated, Any, Optional
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, field_validator,
                      model_validator)
from pydantic_core import PydanticCustomError

Name = Annotated[StrictStr, Field(min_length=1, max_length=200)]
Path_ = Annotated[StrictStr, Field(min_length=1, max_length=4096)]


class Section(BaseModel):
    """Frozen, strict, finite numbers, unknown keys refused (as every daemon config section)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _rule(key: str, message: str) -> PydanticCustomError:
    return PydanticCustomError("config_rule", "{text}", {"config_key": key, "text": message})


class ShiftConfig(Section):
    """One shift: it starts at `start` (HH:MM local time in stats.timezone) and runs until the next one starts."""

    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    start: StrictStr

    @field_validator("start")
    @classmethod
    def _clock(cls, value: str) -> str:
        match = re.fullmatch(r"(\d{1,2}):(\d{2})", value.strip())
        if not match or int(match.group(1)) > 23 or int(match.group(2)) > 59:
            raise _rule("", f"{value!r} must be a time of day HH:MM, e.g. \"06:00\"")
        return f"{int(match.group(1)):02d}:{match.group(2)}"

    @property
    def minute_of_day(self) -> int:
        """Minutes after local midnight at which the shift starts."""
        hours, minutes = self.start.split(":")
        return int(hours) * 60 + int(minutes)


def check_shifts(shifts: tuple[ShiftConfig, ...]) -> None:
    """Distinct names and start times (a PydanticCustomError names the offending entry)."""
    names: set[str] = set()
    starts: set[str] = set()
    for i, shift in enumerate(shifts):
        if shift.name in names:
            raise _rule(f"shifts[{i}].name", f"{shift.name!r} is used by two shifts")
        if shift.start in starts:
            raise _rule(f"shifts[{i}].start", f"{shift.start} is the start of another shift")
        names.add(shift.name)
        starts.add(shift.start)


class StatsConfig(Section):
    """The per-minute summary store and how statistics are shown."""

    enabled: StrictBool = True
    timezone: Annotated[StrictStr, Field(min_length=1, max_length=64)] = "UTC"
    retention_days: Annotated[StrictFloat, Field(gt=0, le=3650)] = 90.0
    flush_s: Annotated[StrictFloat, Field(ge=0.1, le=60)] = 2.0
    queue_max: Annotated[StrictInt, Field(ge=100, le=1_000_000)] = 10_000

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise _rule("", f"{value!r} is not an IANA time zone (e.g. Europe/Berlin, America/Chicago, UTC)") from None
        return value


class GoldenConfig(Section):
    """Reference images for the self-test: `defect_image` must flag `defect_class`, `good_image` must flag nothing."""

    camera: Name
    defect_image: Path_
    good_image: Path_
    defect_class: Name


class HealthConfig(Section):
    """Camera and inspection health checks; a state must hold `hold_s` before it is reported."""

    interval_s: Annotated[StrictFloat, Field(ge=1, le=3600)] = 10.0
    hold_s: Annotated[StrictFloat, Field(ge=0, le=3600)] = 2.0
    frozen_s: Annotated[StrictFloat, Field(gt=0, le=3600)] = 10.0
    frozen_diff: Annotated[StrictFloat, Field(ge=0, le=255)] = 0.5
    defocus_ratio: Annotated[StrictFloat, Field(gt=0, lt=1)] = 0.4
    exposure_band: Annotated[StrictFloat, Field(gt=0, le=10)] = 0.35
    clipped_max: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.25
    psi_max: Annotated[StrictFloat, Field(gt=0, le=100)] = 0.25
    psi_frames: Annotated[StrictInt, Field(ge=20, le=1_000_000)] = 600
    baseline_frames: Annotated[StrictInt, Field(ge=1, le=100_000)] = 30
    window_frames: Annotated[StrictInt, Field(ge=1, le=1000)] = 5
    self_test_s: Annotated[StrictFloat, Field(ge=0, le=86_400)] = 0.0
    golden: Optional[GoldenConfig] = None

    @model_validator(mode="after")
    def _self_test(self) -> "HealthConfig":
        if self.self_test_s > 0 and self.golden is None:
            raise _rule("golden", "self_test_s is set but there is no golden sample (camera, defect_image, good_image, "
                        "defect_class)")
        return self


def check_linestats(config: Any) -> None:
    """Rules across sections, called from DaemonConfig's validator."""
    if config.shifts and "timezone" not in config.stats.model_fields_set:
        raise _rule("stats.timezone", "required when shifts are configured (the shifts' local time zone, "
                    "e.g. Europe/Berlin)")
    golden = config.health.golden
    if golden is not None:
        cameras = {c.id: c for c in config.cameras}
        if golden.camera not in cameras:
            raise _rule("health.golden.camera", f"{golden.camera!r} is not a camera (config has: {', '.join(cameras)})")
        if golden.defect_class not in cameras[golden.camera].classes:
            raise _rule("health.golden.defect_class", f"{golden.defect_class!r} is not one of camera {golden.camera}'s "
                        f"classes ({', '.join(cameras[golden.camera].classes)})")
