"""Method settings (defaults and meaning: docs/method.md §10), validated once so the hot path can trust them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

from engine.errors import SettingsError

DEFAULT_BG_CONTEXT = "ground, land, grass, tree, building, wall, sky, lake, water"

BackgroundMode = Literal["threshold", "power"]

DtypeName = Literal["float32", "float16", "bfloat16"]
"""The weight dtypes a model can be loaded with (float16/bfloat16 on a GPU)."""

DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)


@dataclass(frozen=True)
class IsegSettings:
    """Every number of the method that a config may override; defaults are the authors'.

    `self_heads` is "auto" (heads [1,2] for SD 2.x, all heads for SD 1.x), "all", or a
    tuple of head indices of the 64×64 self-attention layer.
    `background` is "threshold:<t>" (maps below t → background) or "power".
    """

    size: int = 512
    timestep: int = 100
    seed: int = 1101
    enhance: float = 1.6
    ent: float = 0.1
    iters: int = 10
    cluster: bool = True
    cluster_seeds: int = 32
    cluster_iters: int = 20
    self_heads: str | tuple[int, ...] = "auto"
    background: str = "threshold:0.45"
    bg_context: str = DEFAULT_BG_CONTEXT
    cross_weights: tuple[float, float] = (0.7, 0.3)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or not 64 <= self.size <= 2048 or self.size % 64:
            raise SettingsError(f"size: {self.size!r} must be a multiple of 64 in 64..2048 (e.g. 512)")
        if not 0 <= self.timestep < 1000:
            raise SettingsError(f"timestep: {self.timestep!r} must be in 0..999 (spec default 100)")
        if not 0 <= self.seed < 2**63:
            raise SettingsError(f"seed: {self.seed!r} must be in 0..2^63-1")
        if not 0 < self.enhance <= 100:
            raise SettingsError(f"enhance: {self.enhance!r} must be in (0, 100] (spec default 1.6)")
        if not 0 <= self.ent <= 100:
            raise SettingsError(f"ent: {self.ent!r} must be in [0, 100] (spec default 0.1)")
        if not 0 <= self.iters <= 100:
            raise SettingsError(f"iters: {self.iters!r} must be in 0..100 (spec default 10)")
        if not (1 <= self.cluster_seeds <= 1024 and 1 <= self.cluster_iters <= 1000):
            raise SettingsError("cluster_seeds and cluster_iters must be in 1..1024 and 1..1000 (spec: 32 and 20)")
        heads = self.self_heads
        if isinstance(heads, str):
            if heads not in ("auto", "all"):
                raise SettingsError(f"self_heads: {heads!r} must be 'auto', 'all' or a list of head indices like 1,2")
        elif not heads or any((not isinstance(h, int)) or not 0 <= h < 64 for h in heads):
            raise SettingsError(f"self_heads: {heads!r} must be non-negative head indices like [1, 2]")
        self.background_mode  # validates the background string
        if len(self.cross_weights) != 2 or not all(
                isinstance(w, (int, float)) and -100 <= w <= 100 for w in self.cross_weights):
            raise SettingsError(f"cross_weights: {self.cross_weights!r} must be two weights (16×16-level, 32×32-level) in [-100, 100]")

    @property
    def background_mode(self) -> BackgroundMode:
        """Labelling mode parsed from `background`."""
        return self._parse_background()[0]

    @property
    def bg_threshold(self) -> float:
        """Threshold of `threshold` mode (unused in `power` mode)."""
        return self._parse_background()[1]

    def _parse_background(self) -> tuple[BackgroundMode, float]:
        text = str(self.background).strip()
        if text == "power":
            return "power", 0.0
        if text.startswith("threshold"):
            _, _, value = text.partition(":")
            try:
                threshold = float(value) if value else 0.45
            except ValueError:
                threshold = -1.0
            if 0.0 <= threshold < 1.0:
                return "threshold", threshold
        raise SettingsError(f"background: {self.background!r} must be 'threshold:<0..1>' (e.g. threshold:0.45) or 'power'")

    def replace(self, **changes: Any) -> "IsegSettings":
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str = "engine") -> "IsegSettings":
        """Build from a config mapping; unknown keys are an error naming the key path."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise SettingsError(f"{where}.{key}: unknown setting (known: {', '.join(sorted(known))})")
        kwargs = dict(values)
        if isinstance(kwargs.get("self_heads"), list):
            kwargs["self_heads"] = tuple(kwargs["self_heads"])
        if isinstance(kwargs.get("cross_weights"), list):
            kwargs["cross_weights"] = tuple(kwargs["cross_weights"])
        for f in dataclasses.fields(cls):
            if f.name in kwargs and f.type in ("int", "float", "bool"):
                value = kwargs[f.name]
                expected = {"int": int, "float": (int, float), "bool": bool}[f.type]
                if isinstance(value, bool) and f.type != "bool" or not isinstance(value, expected):
                    raise SettingsError(f"{where}.{f.name}: {value!r} must be a {f.type}")
        return cls(**kwargs)


def parse_self_heads(text: str) -> str | tuple[int, ...]:
    """CLI form of `self_heads`: 'all', 'auto' or '1,2'."""
    text = text.strip()
    if text in ("all", "auto"):
        return text
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise SettingsError(f"--self-heads: {text!r} must be 'all', 'auto' or head indices like 1,2") from None


