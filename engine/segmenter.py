"""The iSeg pipeline: frames + class sets → maps, label masks and presence scores (docs/method.md)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from engine.backends.cuda_graphs import batch_buckets
from engine.backends.torch_backend import TorchBackend
from engine.errors import InputError, SettingsError
from engine.method.clustering import cluster_means, kl_kmeans, seed_indices
from engine.method.cross_maps import CrossLevel, class_columns, token_maps
from engine.method.ent_self import entropy_reduced_transition
from engine.method.interactive import box_column, point_columns, prompt_mask
from engine.method.masks import class_maps, label_mask
from engine.method.preprocess import check_frame, frames_to_batch
from engine.method.presence import presence_scores
from engine.method.refine import refine
from engine.method.text_cache import TextEmbeddingCache, TextEntry
from engine.model.attention_capture import AttentionRecorder
from engine.model.loader import LoadedModel, load_model
from engine.results import ClassSet, SegmentResult
from engine.settings import IsegSettings

log = logging.getLogger("engine.segmenter")


class Segmenter:
    """A loaded model and an attention backend, ready for batches of frames.

    Everything that does not change per frame (processors, fixed noise, timestep, text
    embeddings) is set up once here; `segment` runs one VAE encode and one (truncated)
    UNet forward for the whole batch. The backend (torch, or ONNX Runtime) only has to
    encode frames and return the head-mean attention of the read layers.
    """

    def __init__(self, model: LoadedModel, settings: IsegSettings | None = None, cache_dir: Path | None = None,
                 backend: Any = None, compile_blocks: bool = False, cuda_graphs: bool = False,
                 max_batch: int = 16) -> None:
        self.model = model
        self.settings = settings or IsegSettings()
        side = self.settings.size // model.vae_scale
        self.latent_hw = (side, side)
        self.text_cache_dir = cache_dir
        self.max_batch = max_batch
        self.torch_backend = TorchBackend(model, self.settings, self.latent_hw, compile_blocks, cuda_graphs, max_batch)
        self.backend = backend(model, self.settings, self.latent_hw) if backend is not None else self.torch_backend
        self.text_cache = TextEmbeddingCache(self._encode_text, model.tokenizer, model.fingerprint,
                                             self.settings.enhance, cache_dir, model.device)
        generator = torch.Generator("cpu").manual_seed(self.settings.seed)
        channels = model.vae.config.latent_channels
        self._noise = torch.randn((1, channels, *self.latent_hw), generator=generator).to(model.device, model.dtype)
        self.timestep = torch.tensor(self.settings.timestep, device=model.device)
        self._empty_embedding: torch.Tensor | None = None

    @classmethod
    def load(cls, model_dir: str | Path, device: str = "cpu", dtype: str = "float32",
             settings: IsegSettings | None = None, cache_dir: Path | None = None,
             backend: str = "torch", onnx_dir: Path | None = None, compile_blocks: bool = False,
             cuda_graphs: bool = False, max_batch: int = 16) -> "Segmenter":
        """Load a local model folder and set the method up on it.

        backend "onnx" runs the VAE encoder and the attention graph exported by
        `iseg export-onnx` (from `onnx_dir`) with ONNX Runtime instead of torch.
        compile_blocks torch.compiles the convolution/feed-forward blocks (static shapes;
        the first batch of each shape pays the compilation).
        cuda_graphs (CUDA devices, torch backend) replays the VAE encode and the UNet forward
        from graphs captured per batch size 1, 2, 4, … up to `max_batch`; smaller batches are
        padded up to the next captured size.
        """
        if cuda_graphs and backend != "torch":
            raise SettingsError(f"cuda_graphs: only the torch backend replays CUDA graphs, not {backend!r} "
                                "(ONNX Runtime's CUDA/TensorRT providers manage their own)")
        model = load_model(model_dir, device=device, dtype=dtype)
        if backend == "torch":
            return cls(model, settings, cache_dir, compile_blocks=compile_blocks, cuda_graphs=cuda_graphs,
                       max_batch=max_batch)
        if backend == "onnx":
            from engine.backends.onnx_backend import onnx_backend_factory
            return cls(model, settings, cache_dir, backend=onnx_backend_factory(onnx_dir))
        raise InputError(f"backend: {backend!r} must be torch or onnx")

    @property
    def backend_name(self) -> str:
        """Which backend runs the VAE and the UNet: "torch" or "onnx"."""
        return self.backend.name

    @property
    def cuda_graphs(self) -> bool:
        """Whether the torch backend replays captured CUDA graphs."""
        return self.torch_backend.cuda_graphs

    @property
    def fingerprint(self) -> str:
        """Identifies the text side of the model (what the embedding cache is keyed by)."""
        return self.model.fingerprint

    def prepare(self, class_set: ClassSet) -> TextEntry:
        """Compute (or fetch) the Cat-Cross embedding of a class set ahead of the first frame."""
        return self.text_cache.get(class_set)

    def warm_up(self, class_set: ClassSet) -> dict[int, float]:
        """Run each batch size the engine captures graphs for (1, 2, 4, … up to max_batch) once,
        so graph capture, compilation and kernel autotuning happen before the first real frame
        rather than as a latency spike the first time a partial batch of that size comes in.
        Returns seconds per batch size."""
        rng = np.random.default_rng(0)
        frame = rng.integers(96, 160, (self.settings.size, self.settings.size, 3), dtype=np.uint8)
        seconds = {}
        for size in batch_buckets(self.max_batch):
            started = time.perf_counter()
            self.segment([frame] * size, class_set)
            seconds[size] = time.perf_counter() - started
        return seconds

    @torch.no_grad()
    def _encode_text(self, input_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([input_ids], device=self.model.device)
        return self.model.text_encoder(ids).last_hidden_state[0]

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    @torch.no_grad()
    def encode(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """z_t [B, C, h, w]: VAE posterior mean × scaling factor, plus the fixed seeded noise at t."""
        z0 = self.backend.encode(frames_to_batch(list(frames), self.settings.size, self.model.device))
        noise = self._noise.to(z0.device, z0.dtype).expand_as(z0)
        return self.model.scheduler.add_noise(z0, noise, self.timestep.reshape(1)).to(z0.dtype)

    def attention(self, latents: torch.Tensor, embeddings: torch.Tensor, naive: bool = False) -> AttentionRecorder:
        """Head-mean attention of the read layers for one batch (naive: the reference torch path)."""
        if naive:
            return self.torch_backend.naive_attention(latents, self.timestep, embeddings)
        return self.backend.attention(latents, self.timestep, embeddings)

    def _levels(self, recorder: AttentionRecorder) -> list[CrossLevel]:
        coarse_weight, mid_weight = self.settings.cross_weights
        return [CrossLevel(recorder.mean("coarse"), recorder.hw["coarse"], coarse_weight),
                CrossLevel(recorder.mean("mid"), recorder.hw["mid"], mid_weight)]

    def _check(self, frames: Sequence[np.ndarray], class_sets: ClassSet | Sequence[ClassSet]) -> list[ClassSet]:
        if not frames:
            raise InputError("frames: the batch is empty")
        for index, frame in enumerate(frames):
            check_frame(frame, f"frame {index}")
        if isinstance(class_sets, ClassSet):
            return [class_sets] * len(frames)
        sets = list(class_sets)
        if len(sets) != len(frames):
            raise InputError(f"class_sets: {len(sets)} class sets for {len(frames)} frames; give one, or one per frame")
        return sets

    @torch.no_grad()
    def segment(self, frames: Sequence[np.ndarray], class_sets: ClassSet | Sequence[ClassSet],
                naive: bool = False, keep_maps: bool = True) -> list[SegmentResult]:
        """Segment a batch; `naive=True` takes the reference capture path (for benchmarks and tests).

        keep_maps=False leaves `maps` None: the per-class float maps at frame size are the
        largest output (25 MB for three classes at 1080p) and a service that only needs
        labels and presence should not copy them off the GPU.
        """
        sets = self._check(frames, class_sets)
        entries = [self.text_cache.get(class_set) for class_set in sets]
        start = time.perf_counter()
        latents = self.encode(frames)
        self._sync()
        after_vae = time.perf_counter()
        embeddings = torch.stack([entry.embedding for entry in entries]).to(self.model.dtype)
        recorder = self.attention(latents, embeddings, naive=naive)
        self._sync()
        after_unet = time.perf_counter()
        levels = self._levels(recorder)
        c_all, raw_all = token_maps(levels, self.latent_hw)
        transitions = entropy_reduced_transition(recorder.mean("self"), self.settings.ent)
        if self.settings.cluster:
            labels = kl_kmeans(c_all, self.latent_hw, self.settings.cluster_seeds, self.settings.cluster_iters)
            c_all = cluster_means(c_all, labels, len(seed_indices(self.latent_hw, self.settings.cluster_seeds)))
        x0 = [class_columns(c_all[index], entry.spans) for index, entry in enumerate(entries)]
        refined = list(x0)
        by_class_count: dict[int, list[int]] = {}
        for index, columns in enumerate(x0):
            by_class_count.setdefault(columns.shape[1], []).append(index)
        for indices in by_class_count.values():
            together = refine(transitions[indices], torch.stack([x0[i] for i in indices]), self.settings.iters)
            for position, index in enumerate(indices):
                refined[index] = together[position]
        self._sync()
        after_refine = time.perf_counter()
        results = []
        for index, (frame, class_set, entry) in enumerate(zip(frames, sets, entries)):
            maps = class_maps(refined[index], self.latent_hw, self.settings.size, frame.shape[:2])
            labels = label_mask(maps, self.settings.background_mode, self.settings.bg_threshold)
            presence = presence_scores(raw_all[index], entry.spans)
            results.append(SegmentResult(classes=class_set.classes, labels=labels.cpu().numpy(),
                                         maps=maps.cpu().numpy().astype(np.float32) if keep_maps else None,
                                         presence=presence.cpu().numpy().astype(np.float32)))
        end = time.perf_counter()
        per_frame = 1000.0 / len(frames)
        timings = {"vae_ms": (after_vae - start) * per_frame, "unet_ms": (after_unet - after_vae) * per_frame,
                   "refine_ms": (after_refine - after_unet) * per_frame, "masks_ms": (end - after_refine) * per_frame,
                   "total_ms": (end - start) * per_frame}
        for result in results:
            result.timings_ms = dict(timings)
        return results

    def _empty_prompt(self) -> torch.Tensor:
        if self._empty_embedding is None:
            tokenizer = self.model.tokenizer
            ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True)["input_ids"]
            self._empty_embedding = self._encode_text(list(ids))
        return self._empty_embedding

    @torch.no_grad()
    def segment_prompt(self, frame: np.ndarray, points: Sequence[tuple[float, float]] | None = None,
                       box: tuple[float, float, float, float] | None = None,
                       scribble: Sequence[tuple[float, float]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Interactive modes (docs/method.md §9): exactly one of a point list, a box or a scribble.

        Returns (mask uint8 [H, W] with 1 = selected, map float32 [H, W] in [0, 1]).
        """
        given = [name for name, value in (("points", points), ("box", box), ("scribble", scribble)) if value]
        if len(given) != 1:
            raise InputError("give exactly one of points, box or scribble")
        check_frame(frame)
        frame_hw = frame.shape[:2]
        if box is not None:
            x0 = box_column(box, frame_hw, self.latent_hw)
        else:
            x0 = point_columns(list(points or scribble or []), frame_hw, self.latent_hw)
        latents = self.encode([frame])
        recorder = self.attention(latents, self._empty_prompt()[None].to(self.model.dtype))
        transition = entropy_reduced_transition(recorder.mean("self")[0], self.settings.ent)
        refined = refine(transition, x0.to(transition.device), self.settings.iters).mean(dim=1, keepdim=True)
        refined_map = class_maps(refined, self.latent_hw, self.settings.size, frame_hw)[0]
        return prompt_mask(refined_map).cpu().numpy(), refined_map.cpu().numpy().astype(np.float32)
