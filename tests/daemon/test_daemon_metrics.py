"""Metrics: Prometheus text format, and totals that merge across roles."""

from __future__ import annotations

from daemon.metrics import Registry, parse_labels, quantile_from_histogram, render_prometheus


def test_render_counters_gauges_histograms_merged():
    capture, worker_a, worker_b = Registry(), Registry(), Registry()
    capture.inc("iseg_capture_frames_total", 5, camera="a")
    capture.set("iseg_capture_fps", 2.5, camera="a")
    worker_a.inc("iseg_worker_frames_total", 3, camera="a")
    worker_b.inc("iseg_worker_frames_total", 4, camera="a")
    for value in (7, 40, 400):
        worker_a.observe("iseg_inference_ms", value, camera="a")
    text = render_prometheus([capture.snapshot(), worker_a.snapshot(), worker_b.snapshot()])
    assert "# TYPE iseg_capture_frames_total counter" in text
    assert 'iseg_capture_frames_total{camera="a"} 5' in text
    assert 'iseg_worker_frames_total{camera="a"} 7' in text
    assert 'iseg_capture_fps{camera="a"} 2.5' in text
    assert "# TYPE iseg_inference_ms histogram" in text
    assert 'iseg_inference_ms_bucket{camera="a",le="10"} 1' in text
    assert 'iseg_inference_ms_bucket{camera="a",le="50"} 2' in text
    assert 'iseg_inference_ms_bucket{camera="a",le="+Inf"} 3' in text
    assert 'iseg_inference_ms_count{camera="a"} 3' in text and 'iseg_inference_ms_sum{camera="a"} 447' in text
    assert text.endswith("\n")


def test_labels_and_quantiles():
    registry = Registry()
    registry.inc("x_total", camera='we"ird', **{"class": "dent"})
    key = next(iter(registry.snapshot()["counters"]["x_total"]))
    assert parse_labels(key) == {"camera": 'we"ird', "class": "dent"}
    for value in range(1, 101):
        registry.observe("lat", value * 10)
    hist = registry.snapshot()["histograms"]["lat"][""]
    assert quantile_from_histogram(hist, 0.5) == 500 and quantile_from_histogram(hist, 0.99) == 1000
