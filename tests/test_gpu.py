"""GPU-only checks (skipped without CUDA; scripts/gpu_bench.sh runs them first on the GPU host):
real CUDA-graph capture gives the eager results, in float32 and float16, on partial
batches padded to their bucket, with the compiled blocks too."""

import numpy as np
import pytest
import torch

from engine.results import ClassSet
from engine.segmenter import Segmenter
from engine.settings import IsegSettings
from engine.tools.image_io import read_image
from engine.tools.samples import sample_paths

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SETTINGS = IsegSettings(size=256)
CLASSES = ClassSet(("scratch", "dent"), "metal surface, background")


@pytest.fixture(scope="module")
def frames():
    return [read_image(path) for path in sample_paths()[:3]]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_graphs_equal_eager_on_the_gpu(tiny_sd21, tmp_path, frames, dtype):
    eager = Segmenter.load(tiny_sd21, device="cuda", dtype=dtype, settings=SETTINGS, cache_dir=tmp_path)
    graphed = Segmenter.load(tiny_sd21, device="cuda", dtype=dtype, settings=SETTINGS, cache_dir=tmp_path,
                             cuda_graphs=True, max_batch=4)
    tolerance = 1e-4 if dtype == "float32" else 2e-3
    for chunk in ([frames[0]], frames, frames[1:], frames[:1]):
        for want, got in zip(eager.segment(chunk, CLASSES), graphed.segment(chunk, CLASSES)):
            assert np.abs(want.maps - got.maps).max() < tolerance
            assert np.mean(want.labels == got.labels) >= 0.999
    assert graphed.torch_backend.captured_sizes == [1, 2, 4]


def test_cuda_graphs_over_compiled_blocks(tiny_sd21, tmp_path, frames):
    eager = Segmenter.load(tiny_sd21, device="cuda", dtype="float16", settings=SETTINGS, cache_dir=tmp_path)
    both = Segmenter.load(tiny_sd21, device="cuda", dtype="float16", settings=SETTINGS, cache_dir=tmp_path,
                          compile_blocks=True, cuda_graphs=True, max_batch=2)
    for chunk in (frames[:2], frames[2:]):
        for want, got in zip(eager.segment(chunk, CLASSES), both.segment(chunk, CLASSES)):
            assert np.abs(want.maps - got.maps).max() < 5e-3
            assert np.mean(want.labels == got.labels) >= 0.99
