"""The ONNX Runtime backend: the graphs written by `iseg export-onnx`, run in place of the torch modules.

It does what `TorchBackend` does (VAE encode, and the head-mean attention of the read
layers) with ONNX Runtime, for plants that deploy onnxruntime(-gpu) rather than torch
on the inspection host. Everything around it (text embeddings, noise, Ent-Self,
refinement, masks) stays in the Segmenter, so both backends share that code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from engine.backends.onnx_format import check_export
from engine.errors import ModelLoadError
from engine.model.attention_capture import AttentionRecorder, resolve_self_heads
from engine.model.layers import GROUP_DOWNSCALE, GROUPS
from engine.model.loader import LoadedModel
from engine.settings import IsegSettings

log = logging.getLogger("engine.onnx")

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(int64)": torch.int64}
NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def import_onnxruntime() -> Any:
    """onnxruntime, or a one-line error saying which extra installs it."""
    try:
        import onnxruntime
    except ImportError:
        raise ModelLoadError("backend onnx: onnxruntime is not installed; pip install '.[onnx]' "
                             "(or '.[onnx-gpu]' for the CUDA/TensorRT providers)") from None
    return onnxruntime


def cuda_index(device: torch.device) -> int:
    """The GPU ordinal a torch device names ("cuda" alone means the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def choose_providers(available: Sequence[str], device: torch.device, dtype: torch.dtype,
                     cache_dir: Path) -> list[Any]:
    """TensorRT, then CUDA, for a model on a GPU when onnxruntime has them; the CPU provider otherwise."""
    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    index = cuda_index(device)
    providers: list[Any] = []
    if "TensorrtExecutionProvider" in available:
        providers.append(("TensorrtExecutionProvider", {
            "device_id": index, "trt_fp16_enable": dtype == torch.float16,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir)}))
    if "CUDAExecutionProvider" in available:
        providers.append(("CUDAExecutionProvider", {"device_id": index}))
    if not providers:
        log.warning("the model is on %s but onnxruntime has no GPU provider (install '.[onnx-gpu]'); "
                    "running the graphs on the CPU", device)
    return providers + ["CPUExecutionProvider"]


class OnnxBackend:
    """VAE encode and head-mean attention from two ONNX Runtime sessions."""

    name = "onnx"

    def __init__(self, model: LoadedModel, settings: IsegSettings, latent_hw: tuple[int, int],
                 onnx_dir: Path | None, providers: Sequence[Any] | None = None) -> None:
        ort = import_onnxruntime()
        self.model = model
        self.latent_hw = latent_hw
        self.self_heads = resolve_self_heads(model.unet, settings.self_heads, model.family)
        self.manifest = check_export(onnx_dir, model, settings, self.self_heads)
        if providers is None:
            providers = choose_providers(ort.get_available_providers(), model.device, model.dtype,
                                         onnx_dir / "trt-cache")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Idle ORT threads would otherwise spin on the cores that torch needs for the refinement
        # that follows every run (measured: torch stages up to 10× slower on 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        files = self.manifest["files"]
        self.vae = ort.InferenceSession(str(onnx_dir / files["vae"]), options, providers=list(providers))
        self.unet = ort.InferenceSession(str(onnx_dir / files["unet"]), options, providers=list(providers))
        self.providers = self.unet.get_providers()
        self.on_gpu = model.device.type == "cuda" and self.providers[0] in GPU_PROVIDERS
        self.hw = {group: (latent_hw[0] // GROUP_DOWNSCALE[group], latent_hw[1] // GROUP_DOWNSCALE[group])
                   for group in GROUPS}
        log.info("onnx backend on %s from %s", ", ".join(self.providers), onnx_dir)

    def _run(self, session: Any, feeds: dict[str, torch.Tensor],
             shapes: dict[str, tuple[int, ...]]) -> list[torch.Tensor]:
        """Run a session; on a GPU the torch tensors are bound in place, with no host copies."""
        dtypes = {out.name: ORT_TYPES[out.type] for out in session.get_outputs()}
        if not self.on_gpu:
            arrays = session.run(list(shapes), {name: tensor.cpu().numpy() for name, tensor in feeds.items()})
            return [torch.from_numpy(array).to(self.model.device) for array in arrays]
        index = cuda_index(self.model.device)
        binding = session.io_binding()
        inputs = {name: tensor.contiguous() for name, tensor in feeds.items()}
        for name, tensor in inputs.items():
            binding.bind_input(name, "cuda", index, NUMPY_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        outputs = [torch.empty(shape, dtype=dtypes[name], device=self.model.device) for name, shape in shapes.items()]
        for name, tensor in zip(shapes, outputs):
            binding.bind_output(name, "cuda", index, NUMPY_TYPES[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())
        torch.cuda.synchronize(self.model.device)
        session.run_with_iobinding(binding)
        return outputs

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """z0 = VAE posterior mean × scaling factor, for pixels [B, 3, H, W] in [-1, 1]."""
        pixels = pixels.to(self.model.device, self.model.dtype)
        shape = (pixels.shape[0], self.manifest["latent_channels"], *self.latent_hw)
        return self._run(self.vae, {"pixels": pixels}, {"latents": shape})[0].to(self.model.dtype)

    @torch.no_grad()
    def attention(self, latents: torch.Tensor, timestep: torch.Tensor, embeddings: torch.Tensor) -> AttentionRecorder:
        """The graph's head means, in the recorder form the Segmenter reads (one 'head' per group)."""
        batch, tokens = latents.shape[0], embeddings.shape[1]
        feeds = {"latents": latents.to(self.model.dtype), "timestep": timestep.reshape(1).to(torch.int64),
                 "encoder_hidden_states": embeddings.to(self.model.dtype)}
        coarse, mid, full = (self.hw[group][0] * self.hw[group][1] for group in GROUPS)
        shapes = {"coarse": (batch, coarse, tokens), "mid": (batch, mid, tokens), "self": (batch, full, full)}
        recorder = AttentionRecorder()
        for group, tensor in zip(GROUPS, self._run(self.unet, feeds, shapes)):
            recorder.add(group, tensor, 1, self.hw[group])
        return recorder


def onnx_backend_factory(onnx_dir: str | Path | None, providers: Sequence[Any] | None = None
                         ) -> Callable[[LoadedModel, IsegSettings, tuple[int, int]], OnnxBackend]:
    """What `Segmenter(backend=...)` calls: an OnnxBackend on the export in `onnx_dir`.

    `providers` overrides the automatic choice (e.g. ["CUDAExecutionProvider"] to skip a
    TensorRT engine build).
    """
    folder = Path(onnx_dir) if onnx_dir is not None else None

    def make(model: LoadedModel, settings: IsegSettings, latent_hw: tuple[int, int]) -> OnnxBackend:
        return OnnxBackend(model, settings, latent_hw, folder, providers)

    return make
