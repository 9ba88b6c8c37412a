"""The torch.compile option: compiled convolution/feed-forward blocks give the eager results
(a batch of 3 runs padded to the bucket of 4 and is sliced back)."""

import numpy as np
import pytest
import torch

from engine.backends.torch_backend import COMPILED_BLOCKS
from engine.results import ClassSet
from engine.segmenter import Segmenter
from engine.settings import IsegSettings
from engine.tools.image_io import read_image
from engine.tools.samples import sample_paths

pytestmark = pytest.mark.slow


def test_compiled_blocks_match_eager(tiny_sd21, tmp_path, monkeypatch):
    # Every block must really be compiled: hitting dynamo's recompile limit would make
    # the rest run eager silently (and still give the eager results).
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    monkeypatch.setattr(torch._dynamo.config, "accumulated_recompile_limit", 256)
    settings = IsegSettings(size=128)
    frames = [read_image(p) for p in sample_paths()[:3]]
    classes = ClassSet(("scratch", "dent"))
    eager = Segmenter.load(tiny_sd21, settings=settings, cache_dir=tmp_path).segment(frames, classes)
    compiled_segmenter = Segmenter.load(tiny_sd21, settings=settings, cache_dir=tmp_path, compile_blocks=True,
                                        max_batch=4)
    wrapped = [m for m in compiled_segmenter.model.unet.modules() if isinstance(m, COMPILED_BLOCKS)]
    assert wrapped and all(hasattr(m.forward, "_torchdynamo_orig_callable") for m in wrapped)
    compiled = compiled_segmenter.segment(frames, classes)
    compiled_segmenter.segment(frames[:1], classes)
    for a, b in zip(eager, compiled):
        assert np.abs(a.maps - b.maps).max() < 1e-4
        assert np.mean(a.labels == b.labels) >= 0.999
