"""iSeg as a library: training-free segmentation from a Stable Diffusion's attention.

The engine knows nothing of cameras or sockets. It loads a local diffusers-format
Stable Diffusion 1.x/2.x folder (never the network), turns RGB frames into per-class
maps, label masks and presence scores, and caches the Cat-Cross text embeddings.

`__all__` is the public API: the daemon (and any other user) imports these names from
`engine` and nothing from its subpackages, which are free to change:

- `engine/method/`   the steps of the algorithm (docs/method.md walks through them)
- `engine/model/`    loading a model folder, the attention layers read, attention capture
- `engine/backends/` torch (with CUDA graphs / compile) and ONNX Runtime execution
- `engine/tools/`    CLI, benchmark, evaluation, tiny and full-size test models, samples

Names are imported on first use, so `import engine` (e.g. by a capture process that
only needs the errors) does not load torch.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from engine.errors import EngineError, InputError, ModelLoadError, SettingsError  # noqa: E402

_LAZY = {
    "Segmenter": ("engine.segmenter", "Segmenter"),
    "ClassSet": ("engine.results", "ClassSet"),
    "SegmentResult": ("engine.results", "SegmentResult"),
    "IsegSettings": ("engine.settings", "IsegSettings"),
    "DEFAULT_BG_CONTEXT": ("engine.settings", "DEFAULT_BG_CONTEXT"),
    "DTYPE_NAMES": ("engine.settings", "DTYPE_NAMES"),
    "DtypeName": ("engine.settings", "DtypeName"),
    "tokenize_prompt": ("engine.method.prompt", "tokenize_prompt"),
    "PALETTE": ("engine.tools.overlay", "PALETTE"),
    "overlay": ("engine.tools.overlay", "overlay"),
    "read_image": ("engine.tools.image_io", "read_image"),
    "check_image_size": ("engine.tools.image_io", "check_image_size"),
    "image_dimensions": ("engine.tools.image_io", "image_dimensions"),
    "sample_paths": ("engine.tools.samples", "sample_paths"),
    "build_tiny_model": ("engine.tools.tiny_model", "build_tiny_model"),
    "register_commands": ("engine.tools.cli", "register"),
}

__all__ = ["EngineError", "InputError", "ModelLoadError", "SettingsError", *_LAZY]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
