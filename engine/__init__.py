"""iSeg as a library: training-free segmentation from a Stable Diffusion's attention.

The engine knows nothing of cameras or sockets. It loads a local diffusers-format
Stable Diffusion 1.x/2.x folder (never the network), turns RGB frames into per-class
maps, label masks and presence scores, and caches the Cat-Cross text embeddings.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from engine.errors import EngineError, InputError, ModelLoadError, SettingsError  # noqa: E402

__all__ = ["EngineError", "InputError", "ModelLoadError", "SettingsError"]
