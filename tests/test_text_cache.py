"""The Cat-Cross embedding cache: computed once, on disk, invalidated by another model."""

import pytest
import torch

from engine.method.prompt import tokenize_prompt
from engine.results import ClassSet
from engine.segmenter import Segmenter
from engine.settings import IsegSettings

pytestmark = pytest.mark.slow

SMALL = IsegSettings(size=256)
CLASSES = ClassSet(("scratch", "fire hydrant"), "metal surface, table, background")


def test_embedding_is_the_enhanced_text_encoder_output(tiny_sd21, tmp_path):
    segmenter = Segmenter.load(tiny_sd21, settings=SMALL, cache_dir=tmp_path)
    entry = segmenter.prepare(CLASSES)
    tokens = tokenize_prompt(segmenter.model.tokenizer, CLASSES)
    with torch.no_grad():
        plain = segmenter.model.text_encoder(torch.tensor([tokens.input_ids])).last_hidden_state[0]
    enhanced = [p for span in tokens.spans for p in span]
    others = [p for p in range(77) if p not in enhanced]
    assert entry.spans == tokens.spans == [[4], [6, 7, 8]]
    assert torch.allclose(entry.embedding[enhanced], plain[enhanced] * 1.6)
    assert torch.allclose(entry.embedding[others], plain[others])


def test_second_run_hits_the_disk_cache_and_another_model_misses(tiny_sd21, tiny_sd15, tmp_path):
    first = Segmenter.load(tiny_sd21, settings=SMALL, cache_dir=tmp_path)
    computed = first.prepare(CLASSES)
    assert first.text_cache.stats == {"memory_hits": 0, "disk_hits": 0, "misses": 1}
    first.prepare(CLASSES)
    assert first.text_cache.stats["memory_hits"] == 1
    assert len(list((tmp_path / "text").glob("*.safetensors"))) == 1

    second = Segmenter.load(tiny_sd21, settings=SMALL, cache_dir=tmp_path)
    loaded = second.prepare(CLASSES)
    assert second.text_cache.stats == {"memory_hits": 0, "disk_hits": 1, "misses": 0}
    assert torch.equal(loaded.embedding, computed.embedding) and loaded.spans == computed.spans

    other = Segmenter.load(tiny_sd15, settings=SMALL, cache_dir=tmp_path)
    other.prepare(CLASSES)
    assert other.text_cache.stats["misses"] == 1 and other.text_cache.stats["disk_hits"] == 0

    changed = Segmenter.load(tiny_sd21, settings=SMALL.replace(enhance=2.0), cache_dir=tmp_path)
    changed.prepare(CLASSES)
    assert changed.text_cache.stats["misses"] == 1


def test_changed_weights_invalidate_the_cache(tiny_sd21, tmp_path):
    import shutil
    copy = tmp_path / "model"
    shutil.copytree(tiny_sd21, copy)
    Segmenter.load(copy, settings=SMALL, cache_dir=tmp_path / "cache").prepare(CLASSES)
    weights = next((copy / "text_encoder").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    again = Segmenter.load(copy, settings=SMALL, cache_dir=tmp_path / "cache")
    again.prepare(CLASSES)
    assert again.text_cache.stats["misses"] == 1
