"""CUDA graphs for the fixed-shape part of a frame batch (VAE encode, truncated UNet).

At batch 1 an eager SD UNet pass launches a few thousand small kernels and the GPU waits
on Python between them; replaying a captured graph launches them all at once. A graph
has fixed shapes and addresses, so `StaticGraphs`:

- captures one graph per batch *bucket* (powers of two up to the largest batch, plus the
  largest batch itself) and pads a smaller batch up to its bucket by repeating its last
  frame: every sample of a batch is computed independently, so the padding changes
  nothing in the real rows, and a daemon whose partial batches come in every size does
  not capture (and hold memory for) each of them;
- copies the inputs into the graph's own input tensors before each replay;
- returns copies of the outputs sliced to the real batch, because the next replay
  overwrites the graph's output tensors in place. Because of that copy, every graph can
  draw on one shared memory pool whatever order they are replayed in.

How a graph is captured is a parameter (`capture`): `CudaGraphCapture` on a GPU; the
tests, which run on CPU, hand in an emulation of the same in-place semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

from engine.errors import SettingsError

GraphFn = Callable[..., tuple[torch.Tensor, ...]]


class Replayable(Protocol):
    """A captured graph: replaying it recomputes its outputs, in place, from its inputs."""

    def replay(self) -> None: ...


class GraphCapture(Protocol):
    """Captures `fn(*inputs)` once; returns the graph and the output tensors it rewrites."""

    def __call__(self, fn: GraphFn, inputs: Sequence[torch.Tensor]) -> tuple[Replayable, tuple[torch.Tensor, ...]]: ...


class CudaGraphCapture:
    """torch.cuda.CUDAGraph capture after a warm-up on a side stream (cuBLAS/cuDNN set-up
    and any lazy allocation must happen before capture); all graphs share one memory pool."""

    def __init__(self, device: torch.device, warmup: int = 2) -> None:
        if device.type != "cuda":
            raise SettingsError(f"cuda_graphs: needs a CUDA device, the model is on {device}; "
                                "turn cuda_graphs off or load the model with device cuda")
        self.device = device
        self.warmup = warmup
        self.pool: Any = None

    def __call__(self, fn: GraphFn, inputs: Sequence[torch.Tensor]) -> tuple[Replayable, tuple[torch.Tensor, ...]]:
        with torch.cuda.device(self.device):
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    fn(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outputs = fn(*inputs)
            return graph, tuple(outputs)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes graphs are captured for: 1, 2, 4, … below `max_batch`, then `max_batch`."""
    if max_batch < 1:
        raise SettingsError(f"max_batch: {max_batch} must be >= 1")
    sizes = []
    size = 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (max_batch,)


def bucket_for(batch: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `batch`; the batch itself when it is larger than all."""
    return next((size for size in buckets if size >= batch), batch)


def _batch_of(tensors: tuple[torch.Tensor, ...]) -> int:
    batch = tensors[0].shape[0]
    if any(t.shape[0] != batch for t in tensors):
        raise ValueError(f"inputs disagree on the batch size: {[t.shape[0] for t in tensors]}")
    return batch


class PaddedBatches:
    """`fn` run eagerly on batches padded up to their bucket (last row repeated), outputs
    sliced back: torch.compile'd blocks (static shapes) then meet a handful of batch sizes
    instead of recompiling for every partial batch a worker forms."""

    def __init__(self, fn: GraphFn, max_batch: int) -> None:
        self.fn = fn
        self.buckets = batch_buckets(max_batch)

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = _batch_of(tensors)
        size = bucket_for(batch, self.buckets)
        if size > batch:
            tensors = tuple(torch.cat([t, t[-1:].expand(size - batch, *t.shape[1:])]) for t in tensors)
        return tuple(output[:batch] for output in self.fn(*tensors))


@dataclass
class _Captured:
    graph: Replayable
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


class StaticGraphs:
    """`fn` replayed from a graph captured per batch bucket.

    `fn` takes tensors whose first dimension is the batch (all the same size) and returns
    a tuple of tensors whose first dimension is the batch. A batch larger than every
    bucket gets a graph of its own exact size.
    """

    def __init__(self, fn: GraphFn, capture: GraphCapture, max_batch: int) -> None:
        self.fn = fn
        self.capture = capture
        self.buckets = batch_buckets(max_batch)
        self.graphs: dict[tuple, _Captured] = {}

    @property
    def captured_sizes(self) -> list[int]:
        """Batch sizes a graph has been captured for so far."""
        return sorted({key[0] for key in self.graphs})

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = _batch_of(tensors)
        size = bucket_for(batch, self.buckets)
        key = (size,) + tuple((tuple(t.shape[1:]), t.dtype, t.device) for t in tensors)
        captured = self.graphs.get(key)
        if captured is None:
            inputs = tuple(torch.empty((size, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in tensors)
            self._fill(inputs, tensors)
            graph, outputs = self.capture(self.fn, inputs)
            captured = self.graphs[key] = _Captured(graph, inputs, outputs)
        else:
            self._fill(captured.inputs, tensors)
        captured.graph.replay()
        return tuple(output[:batch].clone() for output in captured.outputs)

    @staticmethod
    def _fill(static: tuple[torch.Tensor, ...], tensors: tuple[torch.Tensor, ...]) -> None:
        """Copy the batch in; pad rows repeat the last frame so they stay ordinary inputs."""
        for target, source in zip(static, tensors):
            batch = source.shape[0]
            target[:batch].copy_(source)
            if target.shape[0] > batch:
                target[batch:].copy_(source[-1:].expand(target.shape[0] - batch, *source.shape[1:]))
