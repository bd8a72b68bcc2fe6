"""Zarr outputs are written hidden until complete, as NIfTI and TIFF outputs are: an interrupted or failed run leaves
nothing under the output's name (``.out.zarr.partial.zarr`` beside it, kept only where ``--resume`` can continue
it), a resumed store equals an uninterrupted one, and a finished run leaves nothing beside the store. Every route
that writes a store: the in-process writer (NIfTI in, or a Zarr store the planner streams), block by block (Zarr
in, ``--engine tiles``), ``to-zarr``."""

import os

import nibabel as nib
import numpy as np
import pytest
from cli_runs import invoke, level, ok, stop_nth
from models import save_unet2

zarr = pytest.importorskip("zarr")

import volinfer.run.distributed as dist  # noqa: E402
from volinfer.io.zarr_writer import ZarrWriter  # noqa: E402

SHAPE = (27, 21, 37)  # NIfTI (x, y, z), odd on every axis
RUN = ["--kind", "raw", "--chunks", "8", "-q"]
TILES = ["--tile", "16", "--overlap", "8"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zpart")
    vol = np.random.default_rng(3).standard_normal(SHAPE).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([0.5, 0.75, 2.0, 1.0])), str(tmp / "v.nii.gz"))
    ok("to-zarr", tmp / "v.nii.gz", "-o", tmp / "v.zarr", "--chunks", "8")
    return tmp, save_unet2(tmp / "m.xml")


def beside(d, name):
    """What lies in ``d`` beside the output ``name`` (its hidden partial store, journal, markers, lock)."""
    return sorted(p for p in os.listdir(d) if p.startswith(f".{name}"))


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
    stop_nth(monkeypatch, (dist, "run_block") if route == "blocks" else (ZarrWriter, "write"), 3)
    r = invoke("run", src, "-o", out, *args)
    monkeypatch.undo()
    assert r.exit_code == 130 and "--resume" in r.output, r.output
    assert not os.path.lexists(out)
    assert ".cut.zarr.partial.zarr" in beside(tmp_path, "cut.zarr")
    ok("run", src, "-o", out, *args, "--resume")
    np.testing.assert_array_equal(level(out), level(tmp_path / "whole.zarr"))
    assert beside(tmp_path, "cut.zarr") == []


@pytest.mark.parametrize("route", ["writer", "stream", "blocks"])
def test_failed_zarr_run_leaves_nothing(env, tmp_path, monkeypatch, route):
    """A failure no --resume continues (an unexpected error mid-run) removes the partial store and its state: the
    output's name and its surroundings stay empty."""
    tmp, xml = env
    src, extra = _route(tmp, route)
    stop_nth(monkeypatch, (dist, "run_block_array") if route == "blocks" else (ZarrWriter, "write"), 3,
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
    before = level(out)
    stop_nth(monkeypatch, (dist, "sync_region"), 2, OSError(28, "No space left on device"))
    r = invoke("run", tmp / "v.zarr", "-o", out, *args, "--overwrite")
    monkeypatch.undo()
    assert r.exit_code == 2 and "No space left" in r.output and "--resume" in r.output, r.output
    np.testing.assert_array_equal(level(out), before)  # the earlier output, untouched
    assert ".o.zarr.partial.zarr" in beside(tmp_path, "o.zarr")
    ok("run", tmp / "v.zarr", "-o", out, *args, "--overwrite", "--resume")
    assert level(out).dtype == np.float32 and beside(tmp_path, "o.zarr") == []


def test_interrupted_to_zarr_leaves_nothing(env, tmp_path, monkeypatch):
    """``to-zarr`` stopped part-way leaves no store at the output's name and no partial one beside it."""
    import volinfer.io.zarr_convert as conv

    tmp, _ = env
    stop_nth(monkeypatch, (conv, "scan_slabs"), 1)
    r = invoke("to-zarr", tmp / "v.nii.gz", "-o", tmp_path / "c.zarr", "--chunks", "8")
    assert r.exit_code == 130
    assert not os.path.lexists(tmp_path / "c.zarr") and beside(tmp_path, "c.zarr") == []


def test_finished_zarr_run_leaves_nothing_beside_it(env, tmp_path):
    """A Zarr store in, a Zarr store out, no options (the old code left ``.s.zarr.done/`` and ``.s.zarr.run.json``
    beside a block run's finished store): the output alone."""
    tmp, xml = env
    ok("run", tmp / "v.zarr", "-o", tmp_path / "s.zarr", "-m", xml, "--kind", "raw", "-q")
    assert level(tmp_path / "s.zarr").shape == (2, *SHAPE[::-1]) and beside(tmp_path, "s.zarr") == []


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


def _legacy(tmp_path, monkeypatch, src, out, args, route):
    """A store interrupted as volinfer left it before hidden partial stores: under the output's own name, with its
    journal (and, for blocks, its markers) beside it, and no partial store."""
    stop_nth(monkeypatch, (dist, "run_block") if route == "blocks" else (ZarrWriter, "write"), 3)
    assert invoke("run", src, "-o", out, *args).exit_code == 130
    monkeypatch.undo()
    os.rename(tmp_path / f".{out.name}.partial.zarr", out)
    journal = f".{out.name}.run.json" if route == "blocks" else f".{out.name}.partial.json"
    assert journal in beside(tmp_path, out.name) and f".{out.name}.partial.zarr" not in beside(tmp_path, out.name)


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
@pytest.mark.parametrize("route", ["writer", "stream", "blocks"])
def test_resume_adopts_a_store_interrupted_before_partial_stores(env, tmp_path, monkeypatch, route, overwrite):
    """A Zarr output interrupted by volinfer before its stores were written hidden lies under the output's own name
    with its journal beside it: --resume (with or without --overwrite) continues it and gives the uninterrupted
    run's array, leaving nothing beside it. The code before refused it ("already exists (pass --overwrite ...)"),
    and with --overwrite said there was nothing to resume (in this process) or started over (blocks)."""
    tmp, xml = env
    src, extra = _route(tmp, route)
    args = ["-m", xml, *RUN, *extra]
    ok("run", src, "-o", tmp_path / "whole.zarr", *args)
    out = tmp_path / "old.zarr"
    _legacy(tmp_path, monkeypatch, src, out, args, route)
    blocks, ran = [], []
    real = dist.run_block_array
    monkeypatch.setattr(dist, "run_block_array", lambda *a: ran.append(1) or real(*a))
    real_block = dist.run_block
    monkeypatch.setattr(dist, "run_block", lambda *a: blocks.append(1) or real_block(*a))
    ok("run", src, "-o", out, *args, "--resume", *overwrite)
    np.testing.assert_array_equal(level(out), level(tmp_path / "whole.zarr"))
    assert beside(tmp_path, "old.zarr") == []
    if route == "blocks":  # only the blocks the interrupted run did not finish run again
        assert len(ran) == len(blocks) - 2, (ran, blocks)


@pytest.mark.parametrize("route", ["writer", "blocks"])
def test_resume_refuses_an_adoptable_store_of_another_run_and_leaves_it(env, tmp_path, monkeypatch, route):
    """The journal decides as for any resume: other settings are refused in one line, and the store stays where it
    was, under the output's name, with its journal."""
    tmp, xml = env
    src, extra = _route(tmp, route)
    out = tmp_path / "old.zarr"
    _legacy(tmp_path, monkeypatch, src, out, ["-m", xml, *RUN, *extra], route)
    before = sorted(os.listdir(tmp_path))
    r = invoke("run", src, "-o", out, "-m", xml, *RUN, *extra, "--resume", "--pad", "edge")
    assert r.exit_code == 2 and "cannot resume" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert sorted(os.listdir(tmp_path)) == before


def test_resume_leaves_a_finished_store_of_the_old_layout_to_overwrite(env, tmp_path, monkeypatch):
    """A block run finished before partial stores left its markers and fingerprint beside the store: every block's
    marker there says it is finished, and --resume still needs --overwrite to replace it."""
    tmp, xml = env
    src, extra = _route(tmp, "blocks")
    out = tmp_path / "done.zarr"
    monkeypatch.setattr(dist, "_discard_state", lambda output: None)  # what the old code left beside the store
    ok("run", src, "-o", out, "-m", xml, *RUN, *extra)
    monkeypatch.undo()
    assert ".done.zarr.run.json" in beside(tmp_path, "done.zarr")
    before = sorted(os.listdir(tmp_path))
    r = invoke("run", src, "-o", out, "-m", xml, *RUN, *extra, "--resume")
    assert r.exit_code == 2 and "already exists (pass --overwrite to replace it)" in r.output, r.output
    assert sorted(os.listdir(tmp_path)) == before
    ok("run", src, "-o", out, "-m", xml, *RUN, *extra, "--resume", "--overwrite")
    assert beside(tmp_path, "done.zarr") == []


@pytest.mark.parametrize("written, resumed, says", [("blocks", "stream", "block by block"),
                                                    ("stream", "blocks", "--engine stream --resume")])
def test_resume_another_way_than_the_old_store_was_written_says_how(env, tmp_path, monkeypatch, written, resumed,
                                                                     says):
    """A store of the old layout resumed the other way (written block by block, resumed in this process, or the
    other way round): one line saying what to run; nothing moved."""
    tmp, xml = env
    src, extra = _route(tmp, written)
    out = tmp_path / "old.zarr"
    _legacy(tmp_path, monkeypatch, src, out, ["-m", xml, *RUN, *extra], written)
    before = sorted(os.listdir(tmp_path))
    r = invoke("run", src, "-o", out, "-m", xml, *RUN, *_route(tmp, resumed)[1], "--resume")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert says in r.output and "--overwrite without --resume" in r.output, r.output
    assert sorted(os.listdir(tmp_path)) == before
