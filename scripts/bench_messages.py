"""Cost of checking the hot-path messages (frames into a worker, results into the publisher) at
the socket boundary: the hand-written schemas of daemon/messages.py against the same header
checks expressed as pydantic v2 models, plus the bare json.loads both need. Writes JSON.

    python scripts/bench_messages.py --json out/bench_messages.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: E402

from daemon.messages import MAX_FRAME_PIXELS, MIN_TS, Boundary  # noqa: E402
from tests.hostile_messages import good_frame, good_result  # noqa: E402

Side = Annotated[int, Field(strict=True, ge=1, le=65535)]
Score = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class FrameHeader(BaseModel):
    """The frame header as a pydantic model (what the hand-written check does, for comparison)."""

    model_config = ConfigDict(extra="ignore")
    camera: Literal["belt1"]
    seq: Annotated[int, Field(strict=True, ge=0, le=2 ** 53)]
    ts: Annotated[float, Field(ge=MIN_TS, le=time.time() + 86400, allow_inf_nan=False)]
    session: Annotated[str, Field(max_length=128)] = ""
    roi: tuple[Annotated[int, Field(strict=True, ge=0)], Annotated[int, Field(strict=True, ge=0)]] = (0, 0)
    shape: tuple[Side, Side, Literal[3]]
    dtype: Literal["uint8"]

    @field_validator("shape")
    @classmethod
    def pixels(cls, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        if shape[0] * shape[1] > MAX_FRAME_PIXELS:
            raise ValueError("too many pixels")
        return shape


class ArraySpec(BaseModel):
    shape: list[Side]
    dtype: Literal["uint8"]


class ResultHeader(BaseModel):
    """The ok-result header as a pydantic model."""

    model_config = ConfigDict(extra="ignore")
    camera: Literal["belt1"]
    seq: Annotated[int, Field(strict=True, ge=0, le=2 ** 53)]
    ts: Annotated[float, Field(ge=MIN_TS, allow_inf_nan=False)]
    session: Annotated[str, Field(max_length=128)] = ""
    roi: tuple[int, int] = (0, 0)
    worker: Annotated[str, Field(max_length=128)] = ""
    ok: bool
    classes: list[str]
    presence: dict[str, Score]
    thresholds: dict[str, Score]
    flagged: list[str]
    infer_ms: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    frame: ArraySpec
    labels: ArraySpec


def per_call_us(fn, repeat: int) -> float:
    """Median of 5 runs of `repeat` calls, microseconds per call."""
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeat):
            fn()
        runs.append((time.perf_counter() - started) / repeat * 1e6)
    return sorted(runs)[2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    boundary = Boundary({"belt1": ("scratch", "dent")})
    out: dict[str, dict[str, float]] = {}
    for name, (h, w) in {"frame_1080p": (1080, 1920), "frame_160x120": (120, 160)}.items():
        header, payload = good_frame(h=h, w=w)
        parts = [b"frame.belt1", json.dumps(header).encode(), payload]
        out[name] = {"schema_us": per_call_us(lambda: boundary.frame(parts), args.repeat),
                     "json_loads_us": per_call_us(lambda: json.loads(parts[1]), args.repeat),
                     "pydantic_us": per_call_us(lambda: FrameHeader.model_validate_json(parts[1]), args.repeat)}
    for name, (h, w) in {"result_1080p": (1080, 1920), "result_160x120": (120, 160)}.items():
        header, payloads = good_result(h=h, w=w)
        parts = [b"result", json.dumps(header).encode(), *payloads]
        out[name] = {"schema_us": per_call_us(lambda: boundary.result(parts), args.repeat),
                     "json_loads_us": per_call_us(lambda: json.loads(parts[1]), args.repeat),
                     "pydantic_us": per_call_us(lambda: ResultHeader.model_validate_json(parts[1]), args.repeat)}
    text = json.dumps({k: {m: round(v, 2) for m, v in f.items()} for k, f in out.items()}, indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
