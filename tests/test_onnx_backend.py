"""ONNX backend on the tiny SD2.1 model: export, parity with the torch backend, batching, export checks."""

import argparse
import json
import shutil
import sys

import numpy as np
import onnx
import pytest
import torch

from engine.backends.onnx_backend import OnnxBackend, onnx_backend_factory
from engine.backends.onnx_export import export_onnx
from engine.backends.onnx_format import MANIFEST, UNET_FILE, VAE_FILE
from engine.errors import ModelLoadError
from engine.model.layers import GROUPS
from engine.results import ClassSet
from engine.segmenter import Segmenter
from engine.settings import IsegSettings
from engine.tools.cli import register
from engine.tools.image_io import read_image
from engine.tools.samples import sample_paths

pytestmark = pytest.mark.slow

SMALL = IsegSettings(size=256)
CLASSES = ClassSet(("scratch", "fire hydrant"), "metal surface, table, background")


@pytest.fixture(scope="module")
def export(tiny_sd21, tmp_path_factory):
    """The tiny model exported at size 256, and the progress lines the export printed."""
    out = tmp_path_factory.mktemp("onnx") / "export"
    lines: list[str] = []
    export_onnx(tiny_sd21, out, size=SMALL.size, progress=lines.append)
    return out, lines


@pytest.fixture(scope="module")
def pair(tiny_sd21, export, tmp_path_factory):
    """Torch and ONNX segmenters, each on its own copy of the model (a model holds one set of processors)."""
    cache = tmp_path_factory.mktemp("text-cache")
    torch_segmenter = Segmenter.load(tiny_sd21, settings=SMALL, cache_dir=cache)
    onnx_segmenter = Segmenter.load(tiny_sd21, settings=SMALL, cache_dir=cache, backend="onnx", onnx_dir=export[0])
    return torch_segmenter, onnx_segmenter


@pytest.fixture(scope="module")
def frames():
    images = [read_image(path) for path in sample_paths()]
    return images + [images[0][::-1].copy()]


def captured(segmenter: Segmenter, frames: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The head means one backend captures for these frames, from its own VAE encode."""
    embedding = segmenter.prepare(CLASSES).embedding
    with torch.no_grad():
        latents = segmenter.encode(frames)
        recorder = segmenter.attention(latents, torch.stack([embedding] * len(frames)))
    return {group: recorder.mean(group).clone() for group in GROUPS}


def test_export_writes_both_graphs_and_a_manifest(export, pair):
    out, lines = export
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["size"] == 256 and manifest["latent_hw"] == [32, 32]
    assert manifest["self_heads"] == [1, 2] and manifest["family"] == "sd2" and manifest["opset"] == 17
    assert manifest["fingerprint"] == pair[0].model.fingerprint
    for name in (VAE_FILE, UNET_FILE):
        graph = onnx.load(str(out / name), load_external_data=False)
        assert all(value.type.tensor_type.shape.dim[0].dim_param == "batch"
                   for value in list(graph.graph.input[:1]) + list(graph.graph.output))
    unet_outputs = [value.name for value in onnx.load(str(out / UNET_FILE), load_external_data=False).graph.output]
    assert unet_outputs == ["coarse", "mid", "self"]
    assert [line[:5] for line in lines if line.startswith("[")] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]


def test_captured_maps_match_the_torch_backend(pair, frames):
    torch_segmenter, onnx_segmenter = pair
    assert onnx_segmenter.backend.name == "onnx" and onnx_segmenter.backend.providers == ["CPUExecutionProvider"]
    reference = captured(torch_segmenter, frames)
    maps = captured(onnx_segmenter, frames)
    shapes = {"coarse": (4, 64, 77), "mid": (4, 256, 77), "self": (4, 1024, 1024)}
    for group in GROUPS:
        assert maps[group].shape == shapes[group]
        assert (maps[group] - reference[group]).abs().max().item() < 1e-4, group


def test_label_masks_match_the_torch_backend(pair, frames, export, tmp_path):
    # With clustering on (the default) the ~1e-6 attention differences between the backends can
    # tip a k-means near-tie in the authors' float16 distance, which moves a few pixels to another
    # cluster and shifts the maps locally: labels must still agree, and the maps on average.
    torch_segmenter, onnx_segmenter = pair
    expected = torch_segmenter.segment(frames, CLASSES)
    results = onnx_segmenter.segment(frames, CLASSES)
    same = np.mean(np.concatenate([(a.labels == b.labels).ravel() for a, b in zip(expected, results)]))
    assert same >= 0.99  # seen: 0.9967 with one torch thread, 0.999+ with two
    for a, b in zip(expected, results):
        assert np.abs(a.maps - b.maps).mean() < 0.02  # a flipped tie shifts two clusters' means (seen 0.005)
        assert np.allclose(a.presence, b.presence, atol=1e-5)
    # Without clustering nothing rounds to half, and every map value agrees.
    plain = SMALL.replace(cluster=False)
    torch_plain = Segmenter(torch_segmenter.model, plain, tmp_path)
    onnx_plain = Segmenter(onnx_segmenter.model, plain, tmp_path, backend=onnx_backend_factory(export[0]))
    for a, b in zip(torch_plain.segment(frames, CLASSES), onnx_plain.segment(frames, CLASSES)):
        assert np.abs(a.maps - b.maps).max() < 1e-3


def test_batch_of_three_equals_three_single_runs(pair, frames):
    onnx_segmenter = pair[1]
    batch = captured(onnx_segmenter, frames[:3])
    singles = [captured(onnx_segmenter, [frame]) for frame in frames[:3]]
    for group in GROUPS:
        assert (batch[group] - torch.cat([single[group] for single in singles])).abs().max().item() < 1e-5, group
    together = onnx_segmenter.segment(frames[:3], CLASSES)
    for frame, result in zip(frames[:3], together):
        alone = onnx_segmenter.segment([frame], CLASSES)[0]
        assert np.mean(alone.labels == result.labels) >= 0.999
        assert np.abs(alone.maps - result.maps).max() < 1e-3


@pytest.mark.parametrize("settings, what", [(IsegSettings(size=320), "size"),
                                             (IsegSettings(size=256, self_heads="all"), "self-attention heads"),
                                             (IsegSettings(size=256, self_heads=(0, 3)), "self-attention heads")])
def test_an_export_for_other_settings_is_refused(pair, export, settings, what):
    model = pair[1].model
    with pytest.raises(ModelLoadError) as error:
        onnx_backend_factory(export[0])(model, settings, (settings.size // 8,) * 2)
    message = str(error.value)
    assert "\n" not in message and what in message and "iseg export-onnx" in message
    assert f"--size {settings.size}" in message


@pytest.mark.parametrize("field, what", [("fingerprint", "fingerprint"), ("weights", "weights"), ("format", "format")])
def test_an_export_of_another_model_is_refused(pair, export, tmp_path, field, what):
    copy = tmp_path / "copy"
    shutil.copytree(export[0], copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest[field] = 0 if field == "format" else "0123456789abcdef"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelLoadError, match=what) as error:
        OnnxBackend(pair[1].model, SMALL, (32, 32), copy)
    assert "\n" not in str(error.value) and "iseg export-onnx" in str(error.value)


def test_a_missing_or_incomplete_export_folder_is_refused(tiny_sd21, pair, export, tmp_path):
    model = pair[1].model
    command = r"`iseg export-onnx --model .* --size 256`"
    with pytest.raises(ModelLoadError, match=r"does not exist; create it with " + command):
        Segmenter.load(tiny_sd21, settings=SMALL, backend="onnx", onnx_dir=tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="--onnx-dir"):
        OnnxBackend(model, SMALL, (32, 32), None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=f"lacks {MANIFEST}"):
        OnnxBackend(model, SMALL, (32, 32), tmp_path / "empty")
    partial = tmp_path / "partial"
    shutil.copytree(export[0], partial)
    (partial / UNET_FILE).unlink()
    with pytest.raises(ModelLoadError, match=f"lacks {UNET_FILE}") as error:
        OnnxBackend(model, SMALL, (32, 32), partial)
    assert "\n" not in str(error.value)


def test_missing_onnxruntime_says_which_extra_to_install(pair, export, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModelLoadError, match=r"pip install '\.\[onnx\]'.*\.\[onnx-gpu\]"):
        OnnxBackend(pair[1].model, SMALL, (32, 32), export[0])


def test_cli_exports_with_all_self_heads_and_matches_torch(tiny_sd21, tmp_path, frames, capsys):
    parser = argparse.ArgumentParser(prog="iseg")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "all-heads"
    args = parser.parse_args(["export-onnx", "--model", str(tiny_sd21), "--out", str(out), "--size", "128",
                              "--self-heads", "all"])
    assert args.func(args) == 0
    assert "[4/4]" in capsys.readouterr().out
    assert json.loads((out / MANIFEST).read_text())["self_heads"] == "all"
    settings = IsegSettings(size=128, self_heads="all")
    torch_segmenter = Segmenter.load(tiny_sd21, settings=settings, cache_dir=tmp_path)
    onnx_segmenter = Segmenter.load(tiny_sd21, settings=settings, cache_dir=tmp_path, backend="onnx", onnx_dir=out)
    reference, maps = captured(torch_segmenter, frames[:2]), captured(onnx_segmenter, frames[:2])
    for group in GROUPS:
        assert (maps[group] - reference[group]).abs().max().item() < 1e-4, group
