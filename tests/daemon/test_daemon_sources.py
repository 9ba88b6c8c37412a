"""Frame sources: synthetic is deterministic, files loop (or end), ROI crops, absent devices say so."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from daemon.config import parse_config
from daemon.sources import EndOfStream, SourceError, SyntheticSource, apply_roi, open_source


def camera(**fields):
    doc = {"state_dir": "s", "engine": {"model_dir": "m"}, "cameras": [{"id": "a", "source": "synthetic", **fields}]}
    return parse_config(doc).cameras[0]


def test_synthetic_is_deterministic_and_has_defects():
    cam = camera(synthetic={"seed": 5, "width": 200, "height": 120, "defect_every": 2})
    one, two = SyntheticSource(cam), SyntheticSource(cam)
    frames = [one.read() for _ in range(60)]
    assert all(np.array_equal(f, two.read()) for f in frames)
    assert frames[0].shape == (120, 200, 3) and frames[0].dtype == np.uint8
    assert not np.array_equal(frames[0], frames[5]), "parts move"
    other = SyntheticSource(camera(synthetic={"seed": 6, "width": 200, "height": 120}))
    assert not np.array_equal(frames[10], other.frame(10))
    # part 1 (frames 24..47) carries a defect: dark pixels appear on the part
    assert frames[36].min() < 90 <= frames[12].min()


def test_synthetic_corrupt_frames():
    source = SyntheticSource(camera(synthetic={"corrupt_every": 3}))
    shapes = [source.read().shape for _ in range(6)]
    assert shapes[2] == shapes[5] == (4, 4, 3) and shapes[0] == (240, 320, 3)


def write_clip(path, frames=5):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), (i * 40, 0, 255 - i * 40), np.uint8))
    writer.release()


def test_video_file_loops_or_ends(tmp_path):
    clip = tmp_path / "clip.avi"
    write_clip(clip)
    looping = open_source(camera(source=str(clip), loop=True))
    looping.open()
    frames = [looping.read() for _ in range(12)]
    assert all(f.shape == (48, 64, 3) for f in frames)
    assert frames[0][..., 0].mean() > 200 and frames[0][..., 2].mean() < 50, "BGR red (0, 0, 255) must arrive as RGB red"
    assert np.abs(frames[0].astype(int) - frames[5].astype(int)).mean() < 3, "wrapped around to the first frame"
    once = open_source(camera(source=str(clip), loop=False))
    once.open()
    for _ in range(5):
        once.read()
    with pytest.raises(EndOfStream):
        once.read()


def test_missing_sources_give_reasons(tmp_path):
    with pytest.raises(SourceError, match="USB camera /dev/video98 is absent"):
        open_source(camera(source="/dev/video98")).open()
    with pytest.raises(SourceError, match="does not exist"):
        open_source(camera(source=str(tmp_path / "none.mp4"))).open()
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 100)
    with pytest.raises(SourceError, match="cannot open"):
        open_source(camera(source=str(junk))).open()


def test_roi_crops_and_rejects_outside():
    frame = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    assert np.array_equal(apply_roi(frame, (5, 2, 10, 8)), frame[2:10, 5:15])
    assert apply_roi(frame, None) is frame
    with pytest.raises(SourceError, match="outside"):
        apply_roi(frame, (40, 0, 5, 5))
