"""Benchmark harness: what it measures and where it writes — never how fast anything is."""

import importlib.util
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from models import save_unet2

from volinfer.bench.cli import choose_methods, parse_sizes
from volinfer.bench import harness
from volinfer.bench.harness import Spawner, predict_rss
from volinfer.bench.worker import argmax_uint8, overlap_fraction
from volinfer.cli import main
from volinfer.errors import VolinferError

HAS_TORCH_PEERS = all(importlib.util.find_spec(m) for m in ("torch", "monai"))


def _files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """A fresh system temporary directory, so that the test sees everything bench puts there."""
    tmp = tmp_path / "systmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


def test_bench_rows_fields_and_exact_naive_on_tiny_sizes(tmp_path, private_tmp, monkeypatch):
    """The model stores a z-score normalisation and the bench's volumes hold raw intensities (~1000 ± 700): naive
    OpenVINO z-scores the volume itself, volinfer applies the stored normalisation; crop equals naive exactly."""
    save_unet2(tmp_path / "m.xml", normalization=json.dumps({"kind": "zscore"}))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "report"
    r = CliRunner().invoke(main, ["bench", "-s", "40x36x28", "-m", str(tmp_path / "m.xml"), "--tile", "32",
                                  "--overlap", "24", "-o", str(out), "--name", "tiny", "--json", "-q"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    rows = data["results"]
    assert sorted((tuple(x["size"]), x["method"]) for x in rows) == sorted(
        (s, m) for s in [(40, 36, 28)] for m in ["naive", "crop", "gaussian", "infer-only"])
    for row in rows:
        assert row["status"] == "ok", row
        assert row["peak_rss_mb"] > 50 and row["wall_s"] > 0 and row["cpu_s"] > 0
        assert row["process_cpu_s"] >= row["cpu_s"] and row["process_wall_s"] >= row["wall_s"]
    # margin 12 covers this model's receptive field (10): crop equals naive whole-volume inference voxel for voxel
    assert all(row["agreement"] == 1.0 for row in rows if row["method"] == "crop")
    assert {x["method"] for x in data["ratios"]} == {"crop", "gaussian"}
    assert all("throughput_vs_infer_only" in x and "rss_naive_over_this" in x for x in data["ratios"])
    md = (out / "tiny.md").read_text()
    assert "| 40×36×28 | volinfer crop |" in md and "| 40×36×28 | naive OpenVINO (whole volume) |" in md
    assert "precision **f32**" in md and "tile 32³, overlap 24" in md and data["machine"]["cpu"] in md
    assert "z-scored with the whole volume's mean and std by every method" in md
    assert data["machine"]["openvino"] in md
    # bench writes its report into -o and nothing anywhere else (its work directory is removed at the end)
    expected = {Path("tiny.md"), Path("tiny.json")}
    if importlib.util.find_spec("matplotlib"):
        expected.add(Path("tiny_peak_rss.png"))
    assert _files(out) == expected
    assert _files(cwd) == set() and _files(private_tmp) == set()


def test_bench_default_output_is_a_new_temporary_directory(tmp_path, private_tmp, monkeypatch):
    save_unet2(tmp_path / "m.xml")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["bench", "-s", "20", "-m", "m.xml", "--tile", "32", "--methods", "crop", "-q",
                                  "--json"])
    assert r.exit_code == 0, r.output
    files = [Path(p) for p in json.loads(r.stdout)["files"]]
    assert files and all(p.parent.parent == private_tmp for p in files)
    assert {p.name for p in tmp_path.iterdir()} == {"m.xml", "m.bin", "systmp"}


@pytest.mark.skipif(not HAS_TORCH_PEERS, reason="needs torch and monai")
def test_torch_peer_workers_label_like_the_network(tmp_path):
    """The PyTorch peers' workers, in this process (one torch import): naive PyTorch gives exactly the network's own
    argmax on the z-scored volume; MONAI's and nnU-Net's sliding windows (Gaussian blending, tile 32 on a 36×28×20
    volume, each z-scoring with its own transform) nearly. Raw intensities ~1000: without the z-score the labels
    differ."""
    import torch

    from volinfer.bench.reference_unet import build_small_unet
    from volinfer.bench.worker import main as worker_main

    vol = (1000 + 300 * np.random.default_rng(5).normal(0, 1, (36, 28, 20))).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    wide = vol.astype(np.float64)  # independent z-score: numpy's mean and std in float64
    z = ((vol - np.float32(wide.mean())) / np.float32(wide.std())).astype(np.float32)
    with torch.no_grad():  # the multiple is 2: no padding needed
        ref = build_small_unet()(torch.from_numpy(z)[None, None])[0].argmax(0).numpy()
    assert 0.1 < ref.mean() < 0.9  # both labels present: agreement below means something

    def labels(method: str, normalize: str) -> np.ndarray:
        worker_main([method, "--volume", str(tmp_path / "v.nii"), "--tile", "32", "--overlap", "8", "--multiple",
                     "2", "--torch-factory", "volinfer.bench.reference_unet:build_small_unet", "--normalize",
                     normalize, "--out", str(tmp_path / f"{method}.nii"), "--result", str(tmp_path / f"{method}.json")])
        res = json.loads((tmp_path / f"{method}.json").read_text())
        assert res["wall_s"] > 0 and res["cpu_s"] > 0 and res["infer_s"] > 0
        out = np.asarray(nib.load(str(tmp_path / f"{method}.nii")).dataobj)
        assert out.dtype == np.uint8 and out.shape == vol.shape
        return out

    peers = ["naive-torch", "monai"] + (["nnunet"] if importlib.util.find_spec("nnunetv2") else [])
    for method in peers:
        got = labels(method, "zscore")
        if method == "naive-torch":
            np.testing.assert_array_equal(got, ref)
        else:
            assert (got == ref).mean() > 0.9, method
    assert (labels("naive-torch", "none") == ref).mean() < 0.8  # raw intensities: another segmentation


def test_peak_rss_and_cpu_time_of_a_known_child(tmp_path):
    with Spawner() as s:
        base = s.run_full(["alloc", "--result", str(tmp_path / "a.json"), "--mb", "0"], 1e9, 120)
        big = s.run_full(["alloc", "--result", str(tmp_path / "b.json"), "--mb", "400", "--burn", "0.6"], 1e9, 120)
        assert not big["killed"] and big["rc"] == 0
        assert abs((big["peak_mb"] - base["peak_mb"]) - 400) < 40
        assert big["cpu_s"] - base["cpu_s"] > 0.5
        assert json.loads((tmp_path / "b.json").read_text())["cpu_s"] > 0.5
        rc, _, killed = s.run(["alloc", "--result", str(tmp_path / "c.json"), "--mb", "3000"], cap_mb=base["peak_mb"]
                              + 300, timeout_s=120)
        assert killed and rc != 0


def test_argmax_uint8_matches_numpy_and_crops():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 21, 12, 9)).astype(np.float32)
    labels = argmax_uint8(scores, (19, 10, 7), slab=4)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, scores.argmax(0)[:19, :10, :7])


def test_option_parsing():
    assert parse_sizes("24,40x36x28") == [(24, 24, 24), (40, 36, 28)]
    with pytest.raises(VolinferError):
        parse_sizes("24x3")
    assert overlap_fraction("0.25", 128) == 0.25 and overlap_fraction("32", 128) == 0.25
    assert choose_methods("naive,crop", None) == ["naive", "crop"]
    with pytest.raises(VolinferError, match="unknown peer"):
        choose_methods("crop", "tensorflow")
    with pytest.raises(VolinferError, match="unknown method"):
        choose_methods("crop,fast", None)


def test_peers_with_a_custom_model_need_its_torch_factory(tmp_path):
    save_unet2(tmp_path / "m.xml")
    r = CliRunner().invoke(main, ["bench", "-m", str(tmp_path / "m.xml"), "--vs", "torch", "-s", "20"])
    assert r.exit_code == 2 and "--torch-factory" in r.output


def test_memory_prediction_extrapolates_from_smaller_runs():
    assert predict_rss([], 10) is None
    assert predict_rss([(100, 50.0)], 400) == 200.0
    assert predict_rss([(100, 300.0), (200, 310.0)], 1000) == 390.0


def test_only_the_peers_are_skipped_by_an_extrapolated_peak(tmp_path, monkeypatch):
    """A peak measured at one size, extrapolated in proportion to the voxels, skips naive inference and the peers at a
    larger size; volinfer's own runs plan within their budget and still run (`scale.py --sizes 512,2048` skipped
    volinfer's 2048³ run of 0.6 GB as "would need ~31.2 GB")."""
    class NoSpawner:
        def __init__(self, cwd):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    ran = []

    def measure(spawner, cfg, m, vol, out, cap, tiles):
        ran.append((m.method, m.size[0]))
        m.peak_rss_mb = 0.2 * harness.total_ram_mb()  # the larger size extrapolates to 8x this: over the 0.85 cap

    monkeypatch.setattr(harness, "Spawner", NoSpawner)
    monkeypatch.setattr(harness, "byte_compile", lambda: None)
    monkeypatch.setattr(harness, "make_volume", lambda path, size: path)
    monkeypatch.setattr(harness, "_measure", measure)
    monkeypatch.setattr(harness, "_agreements", lambda results, size, outputs: None)  # (no label files written)
    cfg = harness.BenchConfig(sizes=[(8, 8, 8), (16, 16, 16)], methods=["naive", "crop", "auto", "monai"],
                              model=tmp_path / "m.xml", work_dir=tmp_path)
    results, _ = harness.run_benchmark(cfg, log=lambda line: None)
    status = {(r.method, r.size[0]): r.status for r in results}
    assert status == {("naive", 8): "ok", ("crop", 8): "ok", ("auto", 8): "ok", ("monai", 8): "ok",
                      ("naive", 16): "skipped", ("crop", 16): "ok", ("auto", 16): "ok", ("monai", 16): "skipped"}
    assert ("auto", 16) in ran and ("naive", 16) not in ran


def test_naive_worker_labels_equal_an_independent_reference(tmp_path):
    """The lean naive worker (in-place output, per-slab argmax to uint8) against numpy's argmax of OpenVINO's output."""
    import openvino as ov
    from conftest import whole_volume_reference

    from volinfer.bench.worker import main as worker_main

    save_unet2(tmp_path / "m.xml")
    vol = np.random.default_rng(3).normal(0, 1, (22, 17, 13)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    worker_main(["naive", "--volume", str(tmp_path / "v.nii"), "--model", str(tmp_path / "m.xml"), "--tile", "16",
                 "--out", str(tmp_path / "l.nii"), "--result", str(tmp_path / "r.json")])
    got = np.asarray(nib.load(str(tmp_path / "l.nii")).dataobj)
    ref = whole_volume_reference(ov.Core().read_model(str(tmp_path / "m.xml")), vol[None], tile=16, multiple=4).argmax(0)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)


def test_naive_worker_and_volinfer_label_alike_when_both_normalise(tmp_path):
    """Raw intensities ~1000 and a model storing a z-score: the naive worker told to z-score (as the bench tells it
    for such a model) labels exactly as volinfer's crop run (tile 32, margin 12 covers the receptive field, 10); fed raw, it
    labels differently — the normalisation is what makes the comparison fair."""
    from volinfer import predict
    from volinfer.bench.worker import main as worker_main

    model = save_unet2(tmp_path / "m.xml", normalization=json.dumps({"kind": "zscore"}))
    vol = (1000 + 300 * np.random.default_rng(7).normal(0, 1, (40, 36, 28))).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    predict(str(tmp_path / "v.nii"), str(model), str(tmp_path / "vi.nii"), tile=32, overlap="24", stitch="crop",
            precision="f32", overwrite=True, progress=False)
    ours = np.asarray(nib.load(str(tmp_path / "vi.nii")).dataobj)

    def naive(normalize: str) -> np.ndarray:
        worker_main(["naive", "--volume", str(tmp_path / "v.nii"), "--model", str(model), "--tile", "32",
                     "--normalize", normalize, "--out", str(tmp_path / "l.nii"), "--result", str(tmp_path / "r.json")])
        return np.asarray(nib.load(str(tmp_path / "l.nii")).dataobj)

    assert 0 < (ours > 0).mean() < 1  # more than one label: equality below is not trivial
    np.testing.assert_array_equal(naive("zscore"), ours)
    assert (naive("none") == ours).mean() < 0.9


def test_baselines_normalise_as_the_model_stores(tmp_path):
    from volinfer.bench.cli import baseline_normalization
    from volinfer.bench.worker import zscore_inplace

    def stored(name: str, spec: dict | None) -> Path:
        return save_unet2(tmp_path / f"{name}.xml", **({"normalization": json.dumps(spec)} if spec else {}))

    z, raw = stored("z", {"kind": "zscore"}), stored("raw", None)
    pct, fixed = stored("p", {"kind": "percentile", "lower": 1, "upper": 99}), stored("f", {"kind": "zscore",
                                                                                              "mean": 5, "std": 2})
    assert baseline_normalization(z, ["naive", "crop"]) == "zscore"
    assert baseline_normalization(raw, ["naive", "monai"]) == "none"
    assert baseline_normalization(pct, ["crop", "gaussian"]) == "none"  # no baseline measured: nothing to match
    for model in (pct, fixed):
        with pytest.raises(VolinferError, match="baselines"):
            baseline_normalization(model, ["naive", "crop"])
    v = (1000 + 700 * np.random.default_rng(2).normal(0, 1, (19, 6, 5))).astype(np.float32)
    inner = v[:, 1:, :4].astype(np.float64)  # a strided view, as the workers pass (the volume inside its padding)
    ref = (inner - inner.mean()) / inner.std()
    before = v.copy()
    zscore_inplace(v[:, 1:, :4])
    np.testing.assert_allclose(v[:, 1:, :4], ref, atol=1e-5)
    v[:, 1:, :4] = before[:, 1:, :4]
    np.testing.assert_array_equal(v, before)  # nothing outside the view touched


def test_bench_names_the_precision_that_runs(tmp_path, monkeypatch):
    """`volinfer bench --precision bf16` on a CPU without bf16 runs f32 (as `volinfer run` does) and its report says
    f32 (it said bf16)."""
    from volinfer.bench.cli import resolve_precision
    from volinfer.model import precision

    xml = save_unet2(tmp_path / "m.xml")
    monkeypatch.setattr(precision, "native_reduced", lambda core, device: None)
    assert resolve_precision(xml, "bf16", "CPU") == "f32" and resolve_precision(xml, "f32", "CPU") == "f32"
    monkeypatch.setattr(precision, "native_reduced", lambda core, device: "bf16")
    assert resolve_precision(xml, "bf16", "CPU") == "bf16"
