"""`iseg eval` on a small labelled folder and `iseg bench` JSON (not timed: benchmarks are scripts)."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.results import SegmentResult
from engine.settings import IsegSettings
from engine.tools.evaluate import confusion, evaluate, iou_from_confusion
from engine.tools.samples import sample_paths
from tests.engine_cli import run_iseg


def test_confusion_and_iou_by_hand():
    truth = np.array([0, 0, 1, 1, 2, 255])
    predicted = np.array([0, 1, 1, 1, 0, 2])
    matrix = confusion(truth, predicted, 3)
    # background: TP 1, FN 1 (→1), FP 1 (2→0) → 1/3; class 1: TP 2, FP 1 → 2/3; class 2: TP 0 → 0.
    assert matrix.sum() == 5
    assert np.allclose(iou_from_confusion(matrix), [1 / 3, 2 / 3, 0.0])


def _dataset(folder):
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "classes.txt").write_text("scratch\ndent\ncrack\n")
    for index, path in enumerate(sample_paths()):
        image = cv2.imread(str(path))
        cv2.imwrite(str(folder / "images" / path.name), image)
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[100:200, 150:300] = index + 1
        mask[:5] = 255
        indexed = Image.fromarray(mask, mode="P")
        indexed.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (252 * 3))
        indexed.save(folder / "masks" / (path.stem + ".png"))


class ShiftedBoxSegmenter:
    """Stands in for the engine: labels each image's one class on the true box moved 50 px
    right (rows 100–199, columns 200–349), so every IoU is known in advance."""

    settings = IsegSettings()

    def __init__(self):
        self.class_sets = []

    def segment(self, frames, class_sets, keep_maps=True):
        results = []
        for frame, class_set in zip(frames, class_sets):
            self.class_sets.append(class_set.classes)
            labels = np.zeros(frame.shape[:2], np.uint8)
            labels[100:200, 200:350] = 1
            results.append(SegmentResult(class_set.classes, labels, None, np.zeros(1, np.float32)))
        return results


def test_eval_miou_on_a_known_answer(tmp_path):
    _dataset(tmp_path / "data")
    segmenter = ShiftedBoxSegmenter()
    report = evaluate(segmenter, tmp_path / "data", batch_size=2, progress=False)
    # Each image has its own class on a 100×150 box; the prediction overlaps it on 100×100:
    # IoU = 10000 / (15000 + 15000 − 10000) = 0.5 per class. Background (top 5 rows ignored):
    # true positives = valid − 20000, union = valid − 10000, summed over the images.
    assert segmenter.class_sets == [("scratch",), ("dent",), ("crack",)]
    valid = [cv2.imread(str(path)).shape[1] * (cv2.imread(str(path)).shape[0] - 5) for path in sample_paths()]
    background = sum(v - 20000 for v in valid) / sum(v - 10000 for v in valid)
    assert report["iou"] == pytest.approx({"background": background, "scratch": 0.5, "dent": 0.5, "crack": 0.5})
    assert report["miou"] == pytest.approx((background + 1.5) / 4)
    assert report["pixel_accuracy"] == pytest.approx(sum(v - 10000 for v in valid) / sum(valid))


@pytest.mark.slow
def test_eval_reports_miou_per_class_and_json(tiny_sd21, tmp_path):
    _dataset(tmp_path / "data")
    report_path = tmp_path / "report.json"
    result = run_iseg("eval", "--model", str(tiny_sd21), "--data", str(tmp_path / "data"), "--size", "256",
                      "--json", str(report_path), cache_dir=tmp_path / "c")
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["images"] == 3
    assert set(report["iou"]) == {"background", "scratch", "dent", "crack"}
    assert 0.0 <= report["miou"] <= 1.0
    assert "mIoU" in result.stdout and "3/3" in result.stderr


@pytest.mark.slow
def test_bench_writes_the_promised_keys(tiny_sd21, tmp_path):
    out = tmp_path / "bench.json"
    result = run_iseg("bench", "--model", str(tiny_sd21), "--size", "256", "--frames", "2", "--batch", "1", "2",
                      "--backend", "both", "--json", str(out), cache_dir=tmp_path / "c")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    for key in ("fast_fps", "naive_fps", "speedup_vs_naive"):
        assert report[key] > 0
    for batch in ("1", "2"):
        stages = report["backends"]["torch"][batch]["stage_ms_per_frame"]
        assert {"vae_ms", "unet_ms", "refine_ms", "total_ms"} <= set(stages)
        assert report["backends"]["torch"][batch]["peak_host_mb"] > 0
    assert report["naive_label_agreement"] >= 0.999
    assert set(report["backends"]) == {"torch", "onnx"}
    assert report["onnx_over_torch_time"] > 0
    assert set(report["onnx_over_torch_time_by_batch"]) == {"1", "2"}
    assert report["gflop_per_frame"] > 0
