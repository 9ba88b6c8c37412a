"""`iseg eval` on a small labelled folder and `iseg bench` JSON (not timed: benchmarks are scripts)."""

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from engine.evaluate import confusion, iou_from_confusion
from engine.samples_index import sample_paths
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
