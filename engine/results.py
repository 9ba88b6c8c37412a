"""What the engine takes per frame (a class set) and gives back (maps, labels, presence)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.errors import InputError
from engine.settings import DEFAULT_BG_CONTEXT


@dataclass(frozen=True)
class ClassSet:
    """The defect classes asked for one frame, in the user's order, plus the background context.

    Hashable, so it keys the text-embedding cache. Names are stripped; an empty list or a
    duplicate name is an InputError (a duplicate would make two labels for one thing).
    """

    classes: tuple[str, ...]
    bg_context: str = DEFAULT_BG_CONTEXT

    def __post_init__(self) -> None:
        names = tuple(str(name).strip() for name in self.classes)
        if not names or any(not name for name in names):
            raise InputError("classes: give at least one non-empty class name, e.g. scratch,dent")
        seen: set[str] = set()
        for name in names:
            if name.lower() in seen:
                raise InputError(f"classes: {name!r} is listed twice; each class name must be unique")
            seen.add(name.lower())
        object.__setattr__(self, "classes", names)


@dataclass
class SegmentResult:
    """One frame's output.

    labels: uint8 [H, W] at the frame's size; 0 = background, k = classes[k-1].
    maps: float32 [K, H, W] per-class maps in [0, 1] before labelling (docs/method.md §7);
        None when segment() was asked not to keep them.
    presence: float32 [K]; see engine.method.presence for what it measures (range [0, 1]).
    timings_ms: per-stage milliseconds of the batch this frame was in, divided per frame.
    """

    classes: tuple[str, ...]
    labels: np.ndarray
    maps: np.ndarray | None
    presence: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)

    def presence_by_class(self) -> dict[str, float]:
        """Presence scores keyed by class name, for JSON output."""
        return {name: float(score) for name, score in zip(self.classes, self.presence)}
