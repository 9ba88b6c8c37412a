"""The ONNX export's on-disk format, shared by the exporter and the runtime backend.

An export folder holds two graphs and `manifest.json`; the manifest records what the
graphs were made for (model, dtype, size, self-attention heads), and the runtime refuses
an export whose record does not match the run. Torch-free, so the CLI can offer the
export dtypes without loading torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ModelLoadError
from engine.settings import DTYPE_NAMES, IsegSettings

if TYPE_CHECKING:
    from engine.model.loader import LoadedModel

MANIFEST = "manifest.json"
VAE_FILE = "vae_encoder.onnx"
UNET_FILE = "unet_attention.onnx"
FORMAT_VERSION = 1
EXPORT_DTYPES = tuple(name for name in DTYPE_NAMES if name != "bfloat16")
"""ONNX Runtime has few bfloat16 kernels, so exports are float32 or float16."""
IDENTITY_NAMES = {"dtype": "dtype", "fingerprint": "text encoder fingerprint", "weights": "UNet/VAE weights signature",
                  "family": "model family", "size": "size", "self_heads": "self-attention heads"}


def weights_signature(model_dir: Path) -> str:
    """sha256 over the UNet/VAE configs and weight file names and sizes.

    The text fingerprint does not see the UNet or the VAE; hashing gigabytes of weights
    on every load would be slow, and a swapped checkpoint changes its size or config.
    """
    digest = hashlib.sha256()
    for component in ("unet", "vae"):
        folder = Path(model_dir) / component
        digest.update((folder / "config.json").read_bytes())
        for file in sorted(folder.iterdir()):
            if file.is_file() and file.suffix in (".safetensors", ".bin"):
                digest.update(f"{component}/{file.name}:{file.stat().st_size}".encode())
    return digest.hexdigest()[:24]


def dtype_name(model: LoadedModel) -> str:
    """The model's weight dtype as the manifest and the command line write it (e.g. float16)."""
    return str(model.dtype).removeprefix("torch.")


def heads_label(self_heads: list[int] | None) -> str | list[int]:
    """How a resolved self-head selection is written in the manifest ("all" or the indices)."""
    return "all" if self_heads is None else list(self_heads)


def export_identity(model: LoadedModel, size: int, self_heads: list[int] | None) -> dict[str, Any]:
    """The manifest fields an export must match to be used with this model and these settings."""
    return {"dtype": dtype_name(model), "fingerprint": model.fingerprint,
            "weights": weights_signature(model.path), "family": model.family, "size": size,
            "self_heads": heads_label(self_heads)}


def export_command(model: LoadedModel, settings: IsegSettings, onnx_dir: Path | None) -> str:
    """The `iseg export-onnx` line that creates an export matching this model and these settings."""
    heads = settings.self_heads
    heads_text = heads if isinstance(heads, str) else ",".join(map(str, heads))
    heads_option = "" if heads == "auto" else f" --self-heads {heads_text}"
    dtype = dtype_name(model)
    dtype_option = "" if dtype == "float32" else f" --dtype {dtype}"
    return (f"`iseg export-onnx --model {model.path} --out {onnx_dir or 'DIR'} --size {settings.size}"
            f"{heads_option}{dtype_option}`")


def check_export(onnx_dir: Path | None, model: LoadedModel, settings: IsegSettings,
                 self_heads: list[int] | None) -> dict[str, Any]:
    """The export's manifest, or a one-line error when the folder is missing, incomplete or made for another setup."""
    command = export_command(model, settings, onnx_dir)
    if onnx_dir is None:
        raise ModelLoadError(f"onnx_dir: the onnx backend needs an export folder (--onnx-dir); "
                             f"create one with {command}")
    if not onnx_dir.is_dir():
        raise ModelLoadError(f"onnx_dir: {onnx_dir} does not exist; create it with {command}")
    manifest_path = onnx_dir / MANIFEST
    if not manifest_path.is_file():
        raise ModelLoadError(f"onnx_dir: {onnx_dir} lacks {MANIFEST} (no finished export); create it with {command}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ModelLoadError(f"onnx_dir: {manifest_path} is not readable JSON; export again with {command}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise ModelLoadError(f"onnx_dir: {manifest_path} is not a format-{FORMAT_VERSION} iseg export; "
                             f"export again with {command}")
    files = manifest.get("files") or {}
    for role in ("vae", "unet"):
        name = files.get(role)
        if not name or not (onnx_dir / name).is_file():
            raise ModelLoadError(f"onnx_dir: {onnx_dir} lacks {name or role + ' graph'}; export again with {command}")
    for key, value in export_identity(model, settings.size, self_heads).items():
        if manifest.get(key) != value:
            raise ModelLoadError(f"onnx_dir: {onnx_dir} was exported for {IDENTITY_NAMES[key]} {manifest.get(key)!r} "
                                 f"but this run has {value!r}; export again with {command}")
    return manifest
