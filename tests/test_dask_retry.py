"""A Dask worker killed in the middle of a run: the scheduler really reschedules the block it was running (its own
transition log says so), the block runs again on the surviving worker, and the output equals a run without failures
bitwise."""

import os
import signal
import threading
import time

import numpy as np
import pytest
from models import save_unet2

zarr = pytest.importorskip("zarr")
pytest.importorskip("dask.distributed")

from volinfer.run.distributed import run_zarr  # noqa: E402
from volinfer.io.zarr_io import done_marker_dir  # noqa: E402

SHAPE = (70, 61, 53)
OPTS = dict(tile=32, overlap=24, kind="raw", stitch="crop", block=16)


def _read(path) -> np.ndarray:
    """The full-resolution array of a Zarr output (an OME-Zarr group's level 0, or a plain array)."""
    node = zarr.open(str(path), mode="r")
    return (node["0"] if isinstance(node, zarr.Group) else node)[:]


def _kill_when_busy(pid: int, out, scheduler, address: str, killed: list) -> None:
    """SIGKILL worker ``pid`` once three blocks are done and the scheduler has a block processing on it."""
    deadline = time.time() + 120
    markers = done_marker_dir(out)
    while time.time() < deadline:
        ws = scheduler.workers.get(address)
        if markers.exists() and len(list(markers.iterdir())) >= 3 and ws is not None:
            try:
                keys = sorted(str(ts.key) for ts in list(ws.processing))
            except RuntimeError:  # the scheduler's loop changed the set meanwhile: look again
                keys = []
            if keys:
                killed.append(keys)
                os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.01)


def test_killed_worker_block_is_rerun_and_output_identical(tmp_path):
    from dask.distributed import Client, LocalCluster

    xml = save_unet2(tmp_path / "m.xml")
    z = zarr.create_array(store=str(tmp_path / "in.zarr"), shape=SHAPE, chunks=(16, 16, 16), dtype="float32",
                          dimension_names=["x", "y", "z"])  # stored (x, y, z), named so
    z[:] = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    ref = tmp_path / "ref.zarr"
    run_zarr(tmp_path / "in.zarr", xml, ref, overwrite=True, **OPTS)
    out = tmp_path / "out.zarr"
    import dask

    # crop blocks share border chunks under Dask locks; one the killed worker held frees when its lease expires
    with dask.config.set({"distributed.scheduler.locks.lease-timeout": "2s",
                          "distributed.scheduler.locks.lease-validation-interval": "0.5s"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                         host="127.0.0.1") as cluster:
        with Client(cluster) as client:
            address, pid = next(iter(client.run(os.getpid).items()))
        killed: list = []
        t = threading.Thread(target=_kill_when_busy, args=(pid, out, cluster.scheduler, address, killed))
        t.start()
        rep = run_zarr(tmp_path / "in.zarr", xml, out, scheduler=cluster.scheduler_address, overwrite=True, **OPTS)
        t.join()
        log = list(cluster.scheduler.transition_log)
        assert killed and killed[0], "the worker was never seen running a block"
        assert address not in cluster.scheduler.workers  # it really died
    # a block assigned to the killed worker left "processing" without a result, was scheduled again and then
    # finished in memory: the retry happened
    stories = {key: [(tr.start, tr.finish) for tr in log if str(tr.key) == key] for key in killed[0]}
    retried = [key for key, story in stories.items() if ("processing", "released") in story
               and ("processing", "memory") in story[story.index(("processing", "released")):]]
    assert retried, stories
    ran, skipped = (int(part.split()[0]) for part in rep.extra["blocks"].split(",")[:2])
    assert ran + skipped > 20 and ran >= 1  # every block, once
    assert not done_marker_dir(out).exists()  # a finished store leaves no markers beside it
    np.testing.assert_array_equal(_read(out), _read(ref))
