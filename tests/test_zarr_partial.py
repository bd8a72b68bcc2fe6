"""Zarr outputs are written hidden until complete, as NIfTI and TIFF outputs are: an interrupted or failed run leaves
nothing under the output's name (``.out.zarr.partial.zarr`` beside it, kept only where ``--resume`` can continue
it), a resumed store equals an uninterrupted one, and a finished run leaves nothing beside the store. Every route
that writes a store: the in-process writer (NIfTI in, or a Zarr store the planner streams), block by block (Zarr
in, ``--engine tiles``), ``to-zarr``."""

import os

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from models import save_unet2

zarr = pytest.importorskip("zarr")

import volinfer.run.distributed as dist  # noqa: E402
from volinfer.cli import main  # noqa: E402
from volinfer.io.zarr_writer import ZarrWriter  # noqa: E402

SHAPE = (27, 21, 37)  # NIfTI (x, y, z), odd on every axis
RUN = ["--kind", "raw", "--chunks", "8", "-q"]
TILES = ["--tile", "16", "--overlap", "8"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args):
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zpart")
    vol = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([0.5, 0.75, 2.0, 1.0])), str(tmp / "v.nii.gz"))
    ok("to-zarr", tmp / "v.nii.gz", "-o", tmp / "v.zarr", "--chunks", "8")
    return tmp, save_unet2(tmp / "m.xml")


def level0(path):
    return zarr.open_group(str(path), mode="r")["0"][:]


def beside(d, name):
    """What lies in ``d`` beside the output ``name`` (its hidden partial store, journal, markers, lock)."""
    return sorted(p for p in os.listdir(d) if p.startswith(f".{name}"))


def _stop_nth(monkeypatch, target, n, error=KeyboardInterrupt):
    """Make ``target`` (module, name) raise ``error`` on its ``n``-th call."""
    module, name = target
    real, calls = getattr(module, name), [0]

    def wrapped(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise error() if isinstance(error, type) else error
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)


def _route(tmp, route):
    """The input and options of each way a run writes a store: the in-process writer fed by tiles (NIfTI in) or by
    the layer stream (a Zarr store, as the planner streams it), or block by block."""
    if route == "writer":
        return tmp / "v.nii.gz", TILES
    if route == "stream":
        return tmp / "v.zarr", ["--engine", "stream"]
    return tmp / "v.zarr", [*TILES, "--engine", "tiles", "--block", "16"]


@pytest.mark.parametrize("route", ["writer", "stream", "blocks"])
def test_interrupted_zarr_run_hides_its_store_and_resumes_identical(env, tmp_path, monkeypatch, route):
    """SIGINT part-way: exit 130, nothing at the output's name (the old code left a complete-looking all-zero
    store there), the partial store hidden beside it; --resume gives the uninterrupted run's array and leaves
    nothing beside the finished store (no markers, no fingerprint, no journal)."""
    tmp, xml = env
    src, extra = _route(tmp, route)
    args = ["-m", xml, *RUN, *extra]
    ok("run", src, "-o", tmp_path / "whole.zarr", *args)
    assert beside(tmp_path, "whole.zarr") == []
    out = tmp_path / "cut.zarr"
    _stop_nth(monkeypatch, (dist, "run_block") if route == "blocks" else (ZarrWriter, "write"), 3)
    r = invoke("run", src, "-o", out, *args)
    monkeypatch.undo()
    assert r.exit_code == 130 and "--resume" in r.output, r.output
    assert not os.path.lexists(out)
    assert ".cut.zarr.partial.zarr" in beside(tmp_path, "cut.zarr")
    ok("run", src, "-o", out, *args, "--resume")
    np.testing.assert_array_equal(level0(out), level0(tmp_path / "whole.zarr"))
    assert beside(tmp_path, "cut.zarr") == []


@pytest.mark.parametrize("route", ["writer", "stream", "blocks"])
def test_failed_zarr_run_leaves_nothing(env, tmp_path, monkeypatch, route):
    """A failure no --resume continues (an unexpected error mid-run) removes the partial store and its state: the
    output's name and its surroundings stay empty."""
    tmp, xml = env
    src, extra = _route(tmp, route)
    _stop_nth(monkeypatch, (dist, "run_block_array") if route == "blocks" else (ZarrWriter, "write"), 3,
              RuntimeError("boom"))
    r = invoke("run", src, "-o", tmp_path / "bad.zarr", "-m", xml, *RUN, *extra)
    assert r.exit_code != 0 and "boom" in r.output, r.output
    assert not os.path.lexists(tmp_path / "bad.zarr") and beside(tmp_path, "bad.zarr") == []


def test_full_disk_in_block_run_keeps_store_hidden(env, tmp_path, monkeypatch):
    """A write that fails with a full disk stays resumable, its store hidden; --overwrite keeps the store already at
    the output untouched until the new one is complete, then replaces it."""
    tmp, xml = env
    args = ["-m", xml, *RUN, *TILES, "--engine", "tiles", "--block", "16"]
    out = tmp_path / "o.zarr"
    ok("run", tmp / "v.zarr", "-o", out, *args, "--kind", "labels")
    before = level0(out)
    _stop_nth(monkeypatch, (dist, "sync_region"), 2, OSError(28, "No space left on device"))
    r = invoke("run", tmp / "v.zarr", "-o", out, *args, "--overwrite")
    monkeypatch.undo()
    assert r.exit_code == 2 and "No space left" in r.output and "--resume" in r.output, r.output
    np.testing.assert_array_equal(level0(out), before)  # the earlier output, untouched
    assert ".o.zarr.partial.zarr" in beside(tmp_path, "o.zarr")
    ok("run", tmp / "v.zarr", "-o", out, *args, "--overwrite", "--resume")
    assert level0(out).dtype == np.float32 and beside(tmp_path, "o.zarr") == []


def test_interrupted_to_zarr_leaves_nothing(env, tmp_path, monkeypatch):
    """``to-zarr`` stopped part-way leaves no store at the output's name and no partial one beside it."""
    import volinfer.io.zarr_convert as conv

    tmp, _ = env
    _stop_nth(monkeypatch, (conv, "scan_slabs"), 1)
    r = invoke("to-zarr", tmp / "v.nii.gz", "-o", tmp_path / "c.zarr", "--chunks", "8")
    assert r.exit_code == 130
    assert not os.path.lexists(tmp_path / "c.zarr") and beside(tmp_path, "c.zarr") == []


def test_finished_zarr_run_leaves_nothing_beside_it(env, tmp_path):
    """A Zarr store in, a Zarr store out, no options (the old code left ``.s.zarr.done/`` and ``.s.zarr.run.json``
    beside a block run's finished store): the output alone."""
    tmp, xml = env
    ok("run", tmp / "v.zarr", "-o", tmp_path / "s.zarr", "-m", xml, "--kind", "raw", "-q")
    assert level0(tmp_path / "s.zarr").shape == (2, *SHAPE[::-1]) and beside(tmp_path, "s.zarr") == []


def test_publishing_cleans_up_after_a_crash_between_its_renames(tmp_path):
    """Publishing moves a replaced store aside, then the finished one in: a crash between the two renames leaves no
    store under the output's name and the old one aside; the next publish (a --resume) puts the finished store in
    place and removes the one aside, which was only kept while the output existed."""
    from volinfer.io.targets import store_mark
    from volinfer.io.zarr_io import partial_store, publish_store

    def store(path, value):
        g = zarr.open_group(str(path), mode="w")
        g.attrs["volinfer"] = store_mark()
        g.create_array("0", shape=(2,), dtype="u1")[:] = value
        return path

    out = tmp_path / "seg.zarr"
    aside = tmp_path / ".seg.zarr.old.zarr"
    store(aside, 1)  # the old output, moved aside by a publish that crashed before the new store went in
    done = store(partial_store(out), 2)
    assert publish_store(done, out, overwrite=True) == out
    assert zarr.open_group(str(out), mode="r")["0"][:].tolist() == [2, 2]
    assert not aside.exists() and not done.exists()
    store(partial_store(out), 3)  # an ordinary --overwrite: the old store goes once the new one is in place
    publish_store(partial_store(out), out, overwrite=True)
    assert zarr.open_group(str(out), mode="r")["0"][:].tolist() == [3, 3] and not aside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.zarr"]
