"""Benchmark harness smoke test: end to end on tiny sizes, and the peak-RSS figure checked against a known allocation."""

import importlib.util
import json

from click.testing import CliRunner
from models import save_unet2

from volinfer.bench.harness import Spawner, predict_rss
from volinfer.cli import main


def test_bench_end_to_end_on_tiny_sizes(tmp_path):
    save_unet2(tmp_path / "m.xml")
    out = tmp_path / "results"
    r = CliRunner().invoke(main, ["bench", "--sizes", "24,40x36x28", "--model", str(tmp_path / "m.xml"),
                                  "--tile", "32", "--overlap", "24", "--work-dir", str(tmp_path / "work"),
                                  "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    table = (out / "results.md").read_text()
    assert "| 24³ | volinfer crop |" in table and "| 40×36×28 | naive OpenVINO (whole volume) |" in table
    data = json.loads((out / "results.json").read_text())
    assert data["machine"]["cores"] >= 1 and data["machine"]["openvino"]
    rows = data["results"]
    assert len(rows) == 6 and all(row["status"] == "ok" and row["peak_rss_mb"] > 50 for row in rows)
    # margin 12 covers this model's receptive field (10): crop equals naive whole-volume inference
    assert all(row["agreement"] == 1.0 for row in rows if row["method"] == "crop")
    assert (out / "peak_rss.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_peak_rss_of_a_known_allocation_is_right_within_10_percent(tmp_path):
    with Spawner() as s:
        _, base, _ = s.run(["alloc", "--result", str(tmp_path / "a.json"), "--mb", "0"], 1e9)
        _, peak, killed = s.run(["alloc", "--result", str(tmp_path / "b.json"), "--mb", "400"], 1e9)
        assert not killed
        assert abs((peak - base) - 400) < 40
        rc, _, killed = s.run(["alloc", "--result", str(tmp_path / "c.json"), "--mb", "3000"], cap_mb=base + 300)
        assert killed and rc != 0


def test_memory_prediction_extrapolates_from_smaller_runs():
    assert predict_rss([], 10) is None
    assert predict_rss([(100, 50.0)], 400) == 200.0
    assert predict_rss([(100, 300.0), (200, 310.0)], 1000) == 390.0
