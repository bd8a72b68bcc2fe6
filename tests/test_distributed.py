"""Chunked Zarr runs, locally and on a Dask LocalCluster: the same bytes as a single-process run, whatever the split."""

import os
import signal
import threading
import time

import nibabel as nib
import numpy as np
import pytest
from models import save_unet2

zarr = pytest.importorskip("zarr")

from volinfer import predict  # noqa: E402
from volinfer.run.distributed import run_zarr  # noqa: E402
from volinfer.io.zarr_convert import nifti_to_zarr, zarr_to_nifti
from volinfer.io.zarr_io import done_marker_dir  # noqa: E402

SHAPE = (70, 61, 53)  # not a multiple of the 16-voxel chunks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zarr")
    xml = save_unet2(tmp / "m.xml")
    vol = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    z = zarr.create_array(store=str(tmp / "in.zarr"), shape=SHAPE, chunks=(16, 16, 16), dtype="float32",
                          dimension_names=["x", "y", "z"])  # stored (x, y, z), named so
    z[:] = vol
    return tmp, xml, vol


def _read(path, level=0):
    return zarr.open_group(str(path))[str(level)][:]


OPTS = dict(tile=32, overlap=24, kind="raw")


@pytest.mark.parametrize("stitch", ["crop", "gaussian"])
def test_local_zarr_run_equals_single_process_bitwise(data, stitch):
    tmp, xml, vol = data
    ref = predict(vol, str(xml), stitch=stitch, **OPTS)
    rep = run_zarr(tmp / "in.zarr", xml, tmp / f"local_{stitch}.zarr", stitch=stitch, block=32, overwrite=True, **OPTS)
    out = _read(tmp / f"local_{stitch}.zarr")
    assert out.shape == (2, *SHAPE[::-1]) and int(rep.extra["blocks"].split()[0]) >= 8  # several blocks on each axis
    np.testing.assert_array_equal(np.moveaxis(out.transpose(0, 3, 2, 1), 0, -1), ref)  # store: (c, z, y, x)


def test_dask_cluster_of_two_workers_gives_identical_output(data):
    tmp, xml, _ = data
    for stitch in ("crop", "gaussian"):
        local = tmp / f"l2_{stitch}.zarr"
        dist = tmp / f"d2_{stitch}.zarr"
        run_zarr(tmp / "in.zarr", xml, local, stitch=stitch, block=48, overwrite=True, **OPTS)
        rep = run_zarr(tmp / "in.zarr", xml, dist, stitch=stitch, block=32, overwrite=True, workers=2, **OPTS)
        assert "2 process(es)" in rep.extra["blocks"]  # both workers did work, each compiling the model once
        np.testing.assert_array_equal(_read(dist), _read(local))


def test_killed_worker_is_retried_and_output_identical(data):
    from dask.distributed import Client, LocalCluster

    tmp, xml, _ = data
    ref = tmp / "kill_ref.zarr"
    run_zarr(tmp / "in.zarr", xml, ref, stitch="crop", block=16, overwrite=True, **OPTS)
    out = tmp / "kill.zarr"
    import dask

    # a chunk lock the killed worker held is freed when its lease expires: short leases keep the test quick
    with dask.config.set({"distributed.scheduler.locks.lease-timeout": "2s",
                          "distributed.scheduler.locks.lease-validation-interval": "0.5s"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         host="127.0.0.1") as cluster:
        with Client(cluster) as client:  # closed before run_zarr opens its own client on the scheduler address
            pids = list(client.run(os.getpid).values())
        killed = []

        def killer():
            markers = done_marker_dir(out)
            deadline = time.time() + 60
            while time.time() < deadline and not (markers.exists() and len(list(markers.iterdir())) >= 3):
                time.sleep(0.02)
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

        t = threading.Thread(target=killer)
        t.start()
        rep = run_zarr(tmp / "in.zarr", xml, out, stitch="crop", block=16, overwrite=True,
                       scheduler=cluster.scheduler_address, **OPTS)
        t.join()
    ran, _, skipped = rep.extra["blocks"].split(",")[:2][0].split()[0], 0, rep.extra["blocks"].split(",")[1].split()[0]
    # a block that finished on the killed worker (marker written, result lost) is skipped when retried
    assert killed and int(ran) + int(skipped) > 20
    assert not done_marker_dir(out).exists()  # a finished store leaves no markers beside it
    np.testing.assert_array_equal(_read(out), _read(ref))


def test_rerun_skips_complete_blocks_and_repairs_the_rest(data, monkeypatch):
    """A run stopped after some blocks keeps its store hidden with the finished blocks' markers; --resume runs only
    the unmarked blocks (whatever garbage their chunks hold) and the result equals an uninterrupted run."""
    import volinfer.run.distributed as dist

    tmp, xml, _ = data
    good = tmp / "resume_good.zarr"
    run_zarr(tmp / "in.zarr", xml, good, stitch="gaussian", block=32, overwrite=True, **OPTS)
    out = tmp / "resume.zarr"
    real, calls = dist.run_block, []

    def stop_after_nine(job, block):
        calls.append(block)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return real(job, block)

    monkeypatch.setattr(dist, "run_block", stop_after_nine)
    with pytest.raises(dist.Interrupted, match="--resume"):
        run_zarr(tmp / "in.zarr", xml, out, stitch="gaussian", block=32, **OPTS)
    monkeypatch.undo()
    hidden = tmp / ".resume.zarr.partial.zarr"
    assert not out.exists() and hidden.is_dir() and len(list(done_marker_dir(out).iterdir())) == 9
    (x0, x1), (y0, y1), (z0, z1) = calls[-1].box  # the block stopped: garbage in its voxels
    zarr.open_group(str(hidden), mode="r+")["0"][:, z0:z1, y0:y1, x0:x1] = 99.0
    rep = run_zarr(tmp / "in.zarr", xml, out, stitch="gaussian", block=32, resume=True, **OPTS)
    assert rep.extra["blocks"].startswith("3 run, 9 already complete")
    np.testing.assert_array_equal(_read(out), _read(good))
    assert not hidden.exists() and not done_marker_dir(out).exists()
    assert not (tmp / ".resume.zarr.run.json").exists()


def test_nifti_zarr_round_trip(tmp_path):
    data = np.random.default_rng(1).integers(0, 1000, (37, 29, 23)).astype(np.int16)
    aff = np.diag([0.5, 0.7, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "v.nii.gz"))
    nifti_to_zarr(tmp_path / "v.nii.gz", tmp_path / "v.zarr", chunks=16)
    g = zarr.open_group(str(tmp_path / "v.zarr"))
    z = g["0"]
    assert z.shape == (23, 29, 37)
    scale = g.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    np.testing.assert_allclose(scale, [2.0, 0.7, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(z[:], data.transpose(2, 1, 0))
    zarr_to_nifti(tmp_path / "v.zarr", tmp_path / "back.nii")
    back = nib.load(str(tmp_path / "back.nii"))
    np.testing.assert_array_equal(np.asarray(back.dataobj), data)
    np.testing.assert_allclose(back.affine, aff)


def test_cli_zarr_run_and_errors(data):
    from click.testing import CliRunner

    from volinfer.cli import main

    tmp, xml, vol = data
    out = tmp / "cli.zarr"
    r = CliRunner().invoke(main, ["run", str(tmp / "in.zarr"), "-m", str(xml), "-o", str(out), "--tile", "32",
                                  "--overlap", "24", "--kind", "raw", "--chunks", "24", "--block", "48",
                                  "--no-compression", "--json"])
    assert r.exit_code == 0, r.output
    assert zarr.open_group(str(out))["0"].chunks == (2, 24, 24, 24)
    np.testing.assert_array_equal(np.moveaxis(_read(out).transpose(0, 3, 2, 1), 0, -1), predict(vol, str(xml), **OPTS))
    r = CliRunner().invoke(main, ["run", str(tmp / "in.zarr"), "-m", str(xml), "-o", str(out), "--tile", "32"])
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(main, ["run", str(tmp / "in.zarr"), str(tmp / "in.zarr"), "-m", str(xml), "-o",
                                  str(tmp / "x.nii"), "--tile", "32"])
    assert r.exit_code == 2 and "one .zarr input" in r.output


def test_zarr_input_streams_layer_by_layer_with_engine_stream(data, tmp_path, monkeypatch):
    """``--engine stream`` on a Zarr input streams in this process (it used to run tiles silently): the output equals
    the stream of the same voxels read from NIfTI, each chunk of the store is read once (a chunk deep at a time,
    though the stream takes a few planes per step), and the block runners refuse it in one line."""
    import json

    from volinfer.io.zarr_io import ZarrChannel

    reads = []
    region = ZarrChannel.region
    monkeypatch.setattr(ZarrChannel, "region", lambda self, r: reads.append(r[2]) or region(self, r))

    from click.testing import CliRunner

    from models import stream_unet
    from volinfer.cli import main

    import openvino as ov

    _, _, vol = data
    xml = tmp_path / "s.xml"
    m = stream_unet()
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    ov.save_model(m, str(xml))
    nib.save(nib.Nifti1Image(vol, np.diag([0.8, 0.9, 1.1, 1.0])), tmp_path / "v.nii")
    nifti_to_zarr(tmp_path / "v.nii", tmp_path / "v.zarr", chunks=16)
    opts = ["-m", str(xml), "--engine", "stream", "--precision", "f32", "--kind", "raw", "--json", "-q"]
    r = CliRunner().invoke(main, ["run", str(tmp_path / "v.zarr"), "-o", str(tmp_path / "z.nii"), *opts])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["engine"] == "stream"
    run_reads = [z for z in reads if z[1] - z[0] < vol.shape[2]]  # the stream's (the pre-pass reads its own way)
    assert run_reads and all(z0 % 16 == 0 for z0, _ in run_reads), run_reads
    assert len(run_reads) == len(set(run_reads)) == -(-vol.shape[2] // 16), run_reads
    r = CliRunner().invoke(main, ["run", str(tmp_path / "v.nii"), "-o", str(tmp_path / "n.nii"), *opts])
    assert r.exit_code == 0, r.output
    a, b = nib.load(tmp_path / "z.nii").get_fdata(), nib.load(tmp_path / "n.nii").get_fdata()
    assert a.shape == b.shape and np.array_equal(a, b)
    # and both are whole-volume inference, computed here by OpenVINO on the whole padded volume (f32)
    from test_stream import whole_volume

    ref = np.moveaxis(whole_volume(xml, vol), 0, -1)  # (x, y, z, C), as the raw output is written
    assert np.abs(a - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())
    r = CliRunner().invoke(main, ["run", str(tmp_path / "v.zarr"), "-o", str(tmp_path / "w.zarr"), *opts,
                                  "--workers", "2"])
    assert r.exit_code != 0 and "--engine stream runs in this process" in r.output
    assert not (tmp_path / "w.zarr").exists()
