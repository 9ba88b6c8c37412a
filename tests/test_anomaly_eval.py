"""`iseg eval --format mvtec|visa`: loaders on tiny synthetic layouts, metrics on hand-made cases,
the resume from the per-image cache, and `iseg calibrate --from-eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from daemon.calibration import calibrate_from_eval
from daemon.config import ConfigError, load_config
from daemon.linestats.overrides import effective_thresholds
from engine.results import SegmentResult
from engine.settings import IsegSettings
from engine.tools.anomaly_data import read_mvtec, read_visa, default_classes
from engine.tools.anomaly_eval import evaluate_anomaly
from engine.tools.anomaly_metrics import auroc, average_precision, binary_miou, operating_point, pro
from tests.engine_cli import run_iseg

SIDE = 64
DEFECTS = {"broken_edge": (10, 30, 12, 28), "scratch": (40, 52, 8, 56)}
"""Per defect type, the dark box (rows r0..r1, columns c0..c1) its images carry."""


def _texture(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (150 + rng.integers(-20, 20, (SIDE, SIDE, 3))).astype(np.uint8)


def _save(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_mvtec(root, categories=("widget",), good=2, per_defect=1):
    """<category>/test/{good,<defect>}/NNN.png and ground_truth/<defect>/NNN_mask.png; the first good
    image is grayscale, as whole MVTec categories (grid, screw, zipper) are."""
    seed = 0
    for category in categories:
        for index in range(good):
            seed += 1
            image = _texture(seed)
            _save(root / category / "test" / "good" / f"{index:03d}.png", image[..., 0] if index == 0 else image)
        for defect, (r0, r1, c0, c1) in DEFECTS.items():
            for index in range(per_defect):
                seed += 1
                image = _texture(seed)
                image[r0:r1, c0:c1] = 20
                mask = np.zeros((SIDE, SIDE), np.uint8)
                mask[r0:r1, c0:c1] = 255
                _save(root / category / "test" / defect / f"{index:03d}.png", image)
                _save(root / category / "ground_truth" / defect / f"{index:03d}_mask.png", mask)
        _save(root / category / "train" / "good" / "000.png", _texture(999))
    return root


def make_visa(root):
    """Data/Images/{Normal,Anomaly}, Data/Masks/Anomaly and split_csv/1cls.csv (train rows skipped)."""
    rows = ["object,split,label,image,mask"]
    for index in range(2):
        _save(root / "candle" / "Data" / "Images" / "Normal" / f"{index:03d}.JPG", _texture(index))
        rows.append(f"candle,test,normal,candle/Data/Images/Normal/{index:03d}.JPG,")
    image = _texture(7)
    image[10:30, 12:28] = 20
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[10:30, 12:28] = 1
    _save(root / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG", image)
    _save(root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png", mask)
    rows.append("candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png")
    rows.append("candle,train,normal,candle/Data/Images/Normal/000.JPG,")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


# -- metrics on hand-made cases ---------------------------------------------------------------------------


def test_auroc_and_ap_of_perfect_and_inverted_rankings():
    truth = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    assert auroc(truth, scores) == 1.0
    assert auroc(truth, -scores) == 0.0
    assert average_precision(truth, scores) == 1.0
    # Inverted: the two defects rank 4th and 5th → precision 1/4 at the first, 2/5 at the second.
    assert average_precision(truth, -scores) == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert auroc(np.zeros(3), scores[:3]) is None


def test_pro_by_hand():
    # 2×4 image: region A = (0,0),(0,1), region B = (1,3) (not 8-connected to A); five normal pixels.
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 1]], bool)
    score = np.array([[0.9, 0.5, 0.7, 0.1], [0.1, 0.1, 0.1, 0.8]])
    # Thresholds high to low: 0.9 → PRO ½·½ = 0.25, FPR 0; 0.8 → B covered, PRO 0.75; 0.7 → FPR 1/5;
    # 0.5 → A whole, PRO 1; 0.1 → FPR 1. Area up to FPR 0.3: 0.2·0.75 + 0.1·1 = 0.25; / 0.3.
    assert pro([mask], [score]) == pytest.approx(0.25 / 0.3)
    assert pro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    assert pro([np.zeros((2, 2), bool)], [np.zeros((2, 2))]) is None


def test_pro_weighs_every_region_the_same_across_images():
    # A 1-pixel region found and a 9-pixel region missed score ½ however different their sizes.
    small = np.zeros((5, 5), bool)
    small[0, 0] = True
    large = np.zeros((5, 5), bool)
    large[1:4, 1:4] = True
    found = np.where(small, 1.0, 0.5)
    missed = np.where(large, 0.0, 0.5)
    # Above 0.5 only the small region (FPR 0, PRO ½); at 0.5 every normal pixel (FPR 1).
    # Curve (0,0)→(0,½)→(1,½)→(1,1): area up to 0.3 is 0.3·½.
    assert pro([small, large], [found, missed]) == pytest.approx(0.5)


def test_operating_point_counts_flagged_as_strictly_above():
    truth = np.array([0] * 100 + [1] * 4, bool)
    good = np.linspace(0.0, 0.99, 100)
    scores = np.r_[good, [0.985, 0.975, 0.5, 0.995]]
    one = operating_point(truth, scores, 0.01)
    # One false alarm allowed among 100: threshold = second-highest good score 0.98.
    assert one == {"threshold": pytest.approx(0.98), "fpr": pytest.approx(0.01), "recall": pytest.approx(0.5)}
    five = operating_point(truth, scores, 0.05)
    assert five["threshold"] == pytest.approx(0.94) and five["fpr"] == pytest.approx(0.05)
    assert five["recall"] == pytest.approx(0.75)


def test_binary_miou():
    # Truth rows, prediction columns: background 6 right 2 wrong; defect 3 right 1 missed.
    matrix = np.array([[6, 2], [1, 3]])
    assert binary_miou(matrix) == pytest.approx((6 / 9 + 3 / 6) / 2)


# -- loaders -----------------------------------------------------------------------------------------------


def test_mvtec_loader_reads_defects_masks_and_classes(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", categories=("widget", "bottle"))
    data = read_mvtec(root)
    assert list(data) == ["bottle", "widget"]
    samples = data["widget"]
    assert sorted(s.defect for s in samples) == ["broken_edge", "good", "good", "scratch"]
    assert all((s.mask is None) == (s.defect == "good") for s in samples)
    assert default_classes(samples, "mvtec") == ("broken edge", "scratch")
    assert list(read_mvtec(root / "widget")) == ["widget"]
    assert list(read_mvtec(root, "bottle")) == ["bottle"]
    with pytest.raises(Exception, match="--category: 'nut' is not in .*known: bottle, widget"):
        read_mvtec(root, "nut")
    (root / "widget" / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(Exception, match="no ground-truth mask"):
        read_mvtec(root)


def test_visa_loader_reads_the_split_csv(tmp_path):
    root = make_visa(tmp_path / "visa")
    data = read_visa(root)
    assert list(data) == ["candle"]
    assert [(s.defect, s.mask is not None) for s in data["candle"]] == [("good", False), ("good", False),
                                                                      ("anomaly", True)]
    assert default_classes(data["candle"], "visa") == ("defect",)
    with pytest.raises(Exception, match="no split_csv/1cls.csv"):
        read_visa(tmp_path)


# -- the run: metrics end to end with a stand-in segmenter, and the resume ---------------------------------


class DarkBoxSegmenter:
    """Stands in for the engine: the map is the image's darkness, presence the darkest pixel's,
    so dark-box defects are found perfectly. Counts the frames it is given; `fail_after`
    raises once that many have been segmented (an interrupted run)."""

    settings = IsegSettings(size=64)
    fingerprint = "dark-box"

    def __init__(self, fail_after: int | None = None):
        self.frames = 0
        self.fail_after = fail_after

    def segment(self, frames, class_set, keep_maps=True):
        if self.fail_after is not None and self.frames + len(frames) > self.fail_after:
            raise KeyboardInterrupt
        self.frames += len(frames)
        results = []
        for frame in frames:
            dark = 1.0 - (frame if frame.ndim == 2 else frame.mean(axis=2)).astype(np.float32) / 255.0
            maps = np.stack([dark] * len(class_set.classes))
            labels = (dark > 0.5).astype(np.uint8)
            results.append(SegmentResult(class_set.classes, labels, maps,
                                         np.full(len(class_set.classes), dark.max(), np.float32)))
        return results


def test_evaluate_scores_a_perfect_detector_and_resumes_from_the_cache(tmp_path):
    root = make_mvtec(tmp_path / "mvtec", good=3)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        evaluate_anomaly(DarkBoxSegmenter(fail_after=2), root, "mvtec", out, batch_size=2, progress=False)
    assert len(list((out / "cache" / "widget").glob("*/*.npz"))) == 2
    resumed = DarkBoxSegmenter()
    report = evaluate_anomaly(resumed, root, "mvtec", out, batch_size=2, progress=False, save_maps=True)
    assert resumed.frames == 3, "the two cached images must not be segmented again"
    again = DarkBoxSegmenter()
    assert evaluate_anomaly(again, root, "mvtec", out, batch_size=2, progress=False) == report
    assert again.frames == 0
    widget = report["categories"]["widget"]
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pro", "miou"):
        assert widget[key] == pytest.approx(1.0), key
    assert widget["operating_points"]["0.01"]["recall"] == 1.0
    assert widget["classes"] == ["broken edge", "scratch"]
    assert report["mean"]["image_auroc"] == pytest.approx(1.0)
    assert len(list((out / "maps" / "widget").glob("*.png"))) == 3
    other = DarkBoxSegmenter()
    evaluate_anomaly(other, root, "mvtec", out, classes=("dent",), progress=False)
    assert other.frames == 5, "a different prompt must not reuse the cached results"


# -- the command, with the tiny model, and calibration from its result -------------------------------------


@pytest.mark.slow
def test_iseg_eval_mvtec_writes_every_key_and_calibrate_takes_its_threshold(tiny_sd21, tmp_path):
    root = make_mvtec(tmp_path / "mvtec", good=2)
    result_path = tmp_path / "result.json"
    done = run_iseg("eval", "--model", str(tiny_sd21), "--data", str(root), "--format", "mvtec", "--size", "128",
                    "--out", str(tmp_path / "out"), "--save-maps", "--json", str(result_path),
                    cache_dir=tmp_path / "c")
    assert done.returncode == 0, done.stderr
    report = json.loads(result_path.read_text())
    assert set(report) == {"categories", "mean"}
    for row in (report["categories"]["widget"], report["mean"]):
        for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "pro", "miou"):
            assert 0.0 <= row[key] <= 1.0, key
        assert set(row["operating_points"]) == {"0.01", "0.05"}
    point = report["categories"]["widget"]["operating_points"]["0.01"]
    assert 0.0 <= point["threshold"] <= 1.0 and 0.0 <= point["recall"] <= 1.0
    assert "4/4" in done.stderr and "img AUROC" in done.stdout and "widget" in done.stdout
    assert len(list((tmp_path / "out" / "maps" / "widget").glob("*.png"))) == 4

    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "engine": {"model_dir": str(tiny_sd21)},
        "cameras": [{"id": "belt1", "source": "synthetic", "classes": ["broken edge", "scratch"]}]}))
    calibrated = run_iseg("calibrate", "--config", str(config_path), "--camera", "belt1",
                          "--from-eval", str(result_path), "--fpr", "0.01", cache_dir=tmp_path / "c")
    assert calibrated.returncode == 0, calibrated.stderr
    config = load_config(str(config_path))
    chosen = effective_thresholds(config, config.camera("belt1"))
    expected = (point["threshold"], "override")
    assert chosen == {"broken edge": expected, "scratch": expected}


def test_calibrate_from_eval_refuses_what_it_cannot_use(tmp_path):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump({"state_dir": str(tmp_path / "state"), "engine": {"model_dir": "m"},
                                           "cameras": [{"id": "belt1", "source": "synthetic"}]}))
    config = load_config(str(config_path))
    result = tmp_path / "r.json"
    point = {"threshold": 0.4, "fpr": 0.0, "recall": 0.9}
    result.write_text(json.dumps({"categories": {"a": {"operating_points": {"0.01": point}},
                                                 "b": {"operating_points": {"0.01": point}}}, "mean": {}}))
    with pytest.raises(ConfigError, match="holds 2 categories; pick one with --category"):
        calibrate_from_eval(config, "belt1", result, 0.01, report=lambda _: None)
    with pytest.raises(ConfigError, match="--fpr 0.02: .* no operating point there for a .*it has: 0.01"):
        calibrate_from_eval(config, "belt1", result, 0.02, "a", report=lambda _: None)
    calibrate_from_eval(config, "belt1", result, 0.01, "b", report=lambda _: None)
    assert set(effective_thresholds(config, config.camera("belt1")).values()) == {(0.4, "override")}


def test_iseg_eval_names_a_wrong_layout_in_one_line(tmp_path):
    make_visa(tmp_path / "visa")
    done = run_iseg("eval", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "visa"),
                    "--format", "mvtec", cache_dir=tmp_path / "c", timeout=120)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "is not in MVTec AD layout" in done.stderr, done.stderr


def test_iseg_eval_masks_refuses_the_anomaly_only_options(tmp_path):
    done = run_iseg("eval", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path), "--save-maps",
                    cache_dir=tmp_path / "c", timeout=120)
    assert done.returncode == 1
    assert done.stderr == "error: --save-maps: only for --format mvtec or visa (a masks folder's classes.txt " \
                          "names the classes and nothing is written but the report)\n"
