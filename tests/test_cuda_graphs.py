"""CUDA-graph replay (engine/backends/cuda_graphs.py): buckets, padding, input copy-in, output copy-out.

This machine has no GPU, so the capture is replaced by `InPlaceReplay`, which keeps what
matters of CUDA-graph semantics: the graph's output tensors are fixed, hold nothing useful
until the first replay, and every replay rewrites them in place from whatever the graph's
input tensors hold at that moment. A wrapper that forgot to copy inputs in, to copy
outputs out, or to slice off the padding gives wrong numbers under it, as it would on a
GPU. The real capture is exercised by scripts/gpu_bench.py (graphs vs eager parity).
"""

import numpy as np
import pytest
import torch

from engine.backends.cuda_graphs import CudaGraphCapture, PaddedBatches, StaticGraphs, batch_buckets
from engine.backends.torch_backend import TorchBackend
from engine.errors import SettingsError
from engine.results import ClassSet
from engine.segmenter import Segmenter
from engine.settings import IsegSettings
from engine.tools.image_io import read_image
from engine.tools.samples import sample_paths
from tests.engine_cli import run_iseg


class InPlaceReplay:
    """Stands in for torch.cuda.graph capture on CPU with the same memory semantics."""

    def __init__(self) -> None:
        self.captured: list[int] = []
        self.replays = 0

    def __call__(self, fn, inputs):
        self.captured.append(inputs[0].shape[0])
        outputs = tuple(torch.full_like(t, float("nan")) for t in fn(*inputs))
        emulator = self

        class Graph:
            def replay(self) -> None:
                emulator.replays += 1
                for static, fresh in zip(outputs, fn(*inputs)):
                    static.copy_(fresh)

        return Graph(), outputs


def affine(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7.0
    return x @ weight + y, x.sum(dim=1)


def test_buckets_are_powers_of_two_then_the_largest_batch():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(4) == (1, 2, 4)
    assert batch_buckets(6) == (1, 2, 4, 6)
    assert batch_buckets(16) == (1, 2, 4, 8, 16)
    with pytest.raises(SettingsError, match="max_batch"):
        batch_buckets(0)


def test_replay_equals_eager_for_every_batch_size_and_captures_per_bucket():
    capture = InPlaceReplay()
    graphs = StaticGraphs(affine, capture, max_batch=4)
    generator = torch.Generator().manual_seed(0)
    for batch in (1, 3, 2, 4, 3, 5, 1):
        x = torch.randn(batch, 3, generator=generator)
        y = torch.randn(batch, 4, generator=generator)
        got = graphs(x, y)
        want = affine(x, y)
        assert [t.shape for t in got] == [t.shape for t in want]
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    assert capture.captured == [1, 4, 2, 5]
    assert capture.replays == 7


def test_results_are_not_overwritten_by_the_next_replay():
    graphs = StaticGraphs(affine, InPlaceReplay(), max_batch=2)
    first_x, first_y = torch.ones(2, 3), torch.zeros(2, 4)
    first = graphs(first_x, first_y)
    graphs(torch.full((2, 3), 5.0), torch.ones(2, 4))
    for a, b in zip(first, affine(first_x, first_y)):
        torch.testing.assert_close(a, b)


def test_padding_repeats_the_last_row():
    graphs = StaticGraphs(affine, InPlaceReplay(), max_batch=4)
    x = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
    graphs(x, torch.zeros(3, 4))
    (captured,) = graphs.graphs.values()
    assert torch.equal(captured.inputs[0][3], x[2])


def test_padded_batches_run_bucket_sizes_only_and_slice_back():
    seen = []

    def spy(x, y):
        seen.append(x.shape[0])
        return affine(x, y)

    padded = PaddedBatches(spy, max_batch=8)
    for batch in (3, 1, 5, 8, 9):
        x, y = torch.randn(batch, 3), torch.randn(batch, 4)
        for a, b in zip(padded(x, y), affine(x, y)):
            torch.testing.assert_close(a, b)
    assert seen == [4, 1, 8, 8, 9]


def test_inputs_must_agree_on_the_batch():
    graphs = StaticGraphs(affine, InPlaceReplay(), max_batch=4)
    with pytest.raises(ValueError, match="batch size"):
        graphs(torch.ones(2, 3), torch.ones(3, 4))


def test_cuda_graphs_refused_off_cuda_with_what_to_do(tiny_sd21, tmp_path):
    with pytest.raises(SettingsError, match="needs a CUDA device.*device cuda"):
        CudaGraphCapture(torch.device("cpu"))
    with pytest.raises(SettingsError, match="cuda_graphs"):
        Segmenter.load(tiny_sd21, cache_dir=tmp_path, cuda_graphs=True)
    with pytest.raises(SettingsError, match="only the torch backend"):
        Segmenter.load(tiny_sd21, cache_dir=tmp_path, backend="onnx", cuda_graphs=True)


@pytest.mark.slow
def test_graphed_segmenter_equals_eager_on_partial_batches(tiny_sd21, tmp_path):
    settings = IsegSettings(size=128)
    frames = [read_image(p) for p in sample_paths()[:3]]
    classes = ClassSet(("scratch", "dent"))
    eager = Segmenter.load(tiny_sd21, settings=settings, cache_dir=tmp_path)
    graphed = Segmenter.load(tiny_sd21, settings=settings, cache_dir=tmp_path)
    capture = InPlaceReplay()
    graphed.torch_backend = graphed.backend = TorchBackend(graphed.model, settings, graphed.latent_hw,
                                                           cuda_graphs=True, max_batch=4, capture=capture)
    assert graphed.torch_backend.cuda_graphs
    for chunk in ([frames[0]], frames, frames[1:], frames[2:]):
        want = eager.segment(chunk, classes)
        got = graphed.segment(chunk, classes)
        for a, b in zip(want, got):
            assert np.abs(a.maps - b.maps).max() < 1e-4
            assert np.mean(a.labels == b.labels) >= 0.999
            np.testing.assert_allclose(a.presence, b.presence, atol=1e-5)
    assert capture.captured == [1, 1, 4, 4, 2, 2]
    assert graphed.torch_backend.captured_sizes == [1, 2, 4]


@pytest.mark.slow
def test_cli_cuda_graphs_on_cpu_is_a_one_line_error(tiny_sd21, tmp_path):
    result = run_iseg("segment", str(sample_paths()[0]), "--model", str(tiny_sd21), "--classes", "scratch",
                      "--out", str(tmp_path / "out"), "--size", "128", "--cuda-graphs", cache_dir=tmp_path / "c")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: cuda_graphs: needs a CUDA device, the model is on cpu")


@pytest.mark.slow
def test_warm_up_captures_every_bucket_before_the_first_frame(tiny_sd21, tmp_path):
    settings = IsegSettings(size=128)
    segmenter = Segmenter.load(tiny_sd21, settings=settings, cache_dir=tmp_path, max_batch=4)
    capture = InPlaceReplay()
    segmenter.torch_backend = segmenter.backend = TorchBackend(segmenter.model, settings, segmenter.latent_hw,
                                                               cuda_graphs=True, max_batch=4, capture=capture)
    classes = ClassSet(("scratch",))
    seconds = segmenter.warm_up(classes)
    assert list(seconds) == [1, 2, 4] and all(s > 0 for s in seconds.values())
    assert capture.captured == [1, 1, 2, 2, 4, 4]
    frames = [read_image(p) for p in sample_paths()[:3]]
    segmenter.segment(frames, classes)
    segmenter.segment(frames[:1], classes)
    assert capture.captured == [1, 1, 2, 2, 4, 4]
