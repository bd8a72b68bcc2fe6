"""Chunked runs: Zarr in, Zarr out, block by block, in this process or on a Dask cluster; Zarr in, NIfTI out.

The volume is split into blocks (:mod:`volinfer.tiling.blocks`). Crop runs split it along the grid's tile centres, so every
tile runs exactly once; blocks then share the output chunks their borders cross, and write those under a per-chunk
lock (a Dask lock on a cluster; a run in this process writes blocks one after another) as a read-modify-write of
their own voxels only. Blended runs, and crop runs with a pyramid, split it into blocks of whole output chunks, so no
two tasks ever write the same chunk; tiles whose extent crosses a block border run once per block they touch (the
summary reports the count, :func:`volinfer.tiling.blocks.redundancy`). Each task reads its tiles (with the halo they need)
straight from the input chunks, runs them through a model that its worker process compiled once (a per-process
cache), writes its output, then drops a completion marker. A re-run skips blocks whose marker exists; a block whose
worker died is simply run again (Dask retries it), overwriting its own voxels whatever it left (Zarr's local store
replaces chunk files atomically). Statistics for normalisation are gathered once, up front.

The store is written hidden beside the output (:func:`volinfer.io.zarr_io.partial_store`) and renamed onto it once
every block is written; the markers and the run's fingerprint (also beside it) go then. An interrupted run, or one
stopped by a full disk, keeps all three for ``--resume``; any other failure removes them.

With ``pyramid`` levels, each block is downsampled in memory once written and its footprint written into every
lower level (whose chunks divide the block's footprint there, :func:`volinfer.io.ome.level_chunks`): the pyramid
needs no second pass and no two blocks share a chunk of any level (pyramid runs use chunk-aligned blocks).

Axes: the input is read through :func:`volinfer.io.zarr_io.open_zarr_source`, which hands it on in ``(x, y, z)`` order
whatever the array's own axis order (its OME-Zarr ``axes``), like every other reader: tiles, blocks and the grid are
in ``(x, y, z)``, and blocks are transposed to the output store's ``(c, z, y, x)`` only when written. So the model sees
the same array for a Zarr input as for the NIfTI file it was converted from.

A NIfTI output from a Zarr input is written slab by slab (:func:`run_zarr_to_nifti`): blocks spanning the whole
``(x, y)`` cross-section, one or more rows of tiles thick along z, in order, through the same
:class:`volinfer.io.writer.NiftiWriter` and journal as NIfTI runs (so ``--resume`` and compression behave the same),
with the store's affine: ``run -o out.nii`` equals ``run -o out.zarr`` then ``to-nifti``.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from volinfer.progress import progress_bar
from volinfer.tiling.blocks import Block, block_tiles, make_block_stitcher, plan_blocks, plan_core_blocks, redundancy
from volinfer.run.engine import run_tiles
from volinfer.run.job import RowProgress, TileJob
from volinfer.run.report import RunReport, Work, build_report, peak_rss_mb
from volinfer.errors import Interrupted, VolinferError
from volinfer.tiling.geometry import TileGrid
from volinfer.model.tile_model import CompileOptions, TileModel
from volinfer.run.postprocess import OutputSpec
from volinfer.run.settings import RunSettings
from volinfer.run import pipeline
from volinfer.run.pipeline import JournaledOutput, fingerprint_options, run_fingerprint
from volinfer.run.setup import guard_for, make_normalizer, resolve, scan_input, verdict
from volinfer.io.journal import Journal, ResumableError, journal_path
from volinfer.io.ome import check_pyramid, downsample, downsample_method
from volinfer.io.targets import OutputLock
from volinfer.io.formats import is_zarr
from volinfer.io.zarr_io import (StoreSpec, adopt_legacy, check_zarr_output, create_output, discard_partial,
                                done_marker_dir, open_zarr_source, partial_store, publish_store, store_geometry,
                                store_write_error, sync_region, unfinished_legacy)
from volinfer.io.targets import aux_path
from volinfer.io.writer import check_target
from volinfer.io.writer import NiftiWriter


@dataclass(frozen=True)
class ModelRef:
    """How a worker opens the run's model: its file, the planned tile, layout, output and compile options."""

    path: str
    tile: tuple[int, int, int]
    layout: str
    output: int
    options: dict[str, Any]

    def key(self) -> tuple[Any, ...]:
        return (self.path, self.tile, self.layout, self.output, tuple(sorted(self.options.items())))


@dataclass(frozen=True)
class ZarrJob:
    """Everything a task needs, small and picklable (sent to every Dask worker): where to read and write, the
    model, the tile loop's job (grid, normalisation, padding, requests, mirroring), how tiles are stitched and
    post-processed, and the pyramid levels written beside level 0."""

    input: str
    output: str
    model: ModelRef
    tiles: TileJob
    stitch: str
    sigma: float
    spec: OutputSpec
    levels: int = 0
    method: str = "nearest"
    markers: str = ""  # where the blocks' completion markers lie (default: beside ``output``)


_MODELS: dict[tuple, TileModel] = {}  # per worker process: compiled once, reused by every task


def _model(ref: ModelRef) -> TileModel:
    key = ref.key()
    if key not in _MODELS:
        _MODELS[key] = TileModel(ref.path, tile=ref.tile, layout=ref.layout, output=ref.output,
                                 options=CompileOptions(**ref.options))
    return _MODELS[key]


def _marker(job: ZarrJob, block: Block) -> Path:
    return Path(job.markers or done_marker_dir(job.output)) / "_".join(map(str, block.index))


def run_block_array(job: ZarrJob, block: Block) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the tiles touching ``block``; its output (C, *block.shape) and what it cost."""
    tm = _model(job.model)
    source, _ = open_zarr_source(job.input)
    grid = job.tiles.grid
    stitcher, array = make_block_stitcher(grid, block, job.spec, job.stitch, job.sigma)
    busy, n, reused = run_tiles(source, tm, stitcher, job.tiles, tiles=list(block_tiles(grid, block)),
                                rows=RowProgress(progress=False))
    return array.out, {"block": block.index, "skipped": False, "tiles": n, "reused": reused, "busy_s": busy,
                          "pid": os.getpid(), "peak_rss_mb": _own_peak_mb()}


def run_block(job: ZarrJob, block: Block) -> dict[str, Any]:
    """One task: run the tiles touching ``block``, write its chunks (every level), mark it done. Skips finished
    blocks."""
    marker = _marker(job, block)
    if marker.exists():
        return {"block": block.index, "skipped": True, "tiles": 0, "reused": 0, "busy_s": 0.0, "pid": os.getpid()}
    out, info = run_block_array(job, block)
    try:
        _write_levels(job, block, out)  # the data first, durably; only then the marker that says it is done
        marker.parent.mkdir(parents=True, exist_ok=True)
        with open(marker, "w") as f:
            f.write("done")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise store_write_error(Path(job.output), e) from None
    info["peak_rss_mb"] = _own_peak_mb()
    return info


def _write_levels(job: ZarrJob, block: Block, out: np.ndarray) -> None:
    """Write ``out`` (C, *block.shape), in ``(x, y, z)``, into level 0 of the ``(c, z, y, x)`` store and its
    downsampled copies into the lower levels; fsync them."""
    import zarr

    group = zarr.open_group(job.output, mode="r+")
    box = block.box[::-1]
    out = out.transpose(0, 3, 2, 1)
    if not job.levels:
        with _shared_chunk_locks(job, box, group["0"]):
            _write_box(group["0"], box, out)
        return
    for lev in range(job.levels + 1):
        if lev:
            out = downsample(out, job.method)
            box = tuple((a >> 1, (a >> 1) + n) for (a, _), n in zip(box, out.shape[1:]))  # type: ignore[assignment]
        _write_box(group[str(lev)], box, out)


def _write_box(arr: Any, box: Any, out: np.ndarray) -> None:
    """``out`` (C, *box shape) into ``arr`` at ``box``, then fsync its chunks."""
    region = tuple(slice(a, b) for a, b in box)
    if out.shape[0] == 1 and arr.ndim == 3:
        arr[region] = out[0]
    else:
        arr[(slice(None), *region)] = out
    sync_region(arr, box)


def shared_chunks(box: Sequence[tuple[int, int]], chunks: Sequence[int], shape: Sequence[int]) -> list[tuple]:
    """Indices of the chunks that ``box`` covers only in part (a neighbouring block writes the rest of them)."""
    axes = []
    for (a, b), c, n in zip(box, chunks, shape):
        axes.append([(k, k * c < a or min((k + 1) * c, n) > b) for k in range(a // c, -(-b // c))])
    return [tuple(k for k, _ in combo) for combo in product(*axes) if any(p for _, p in combo)]


@contextmanager
def _shared_chunk_locks(job: ZarrJob, box: Any, arr: Any) -> Iterator[None]:
    """Hold a lock on every output chunk ``box`` shares with another block while writing it (Dask tasks only:
    blocks run in this process are written one after another). Locks are taken in sorted order: no deadlock; a
    lock held by a worker that died is released by the scheduler when its lease times out."""
    keys = shared_chunks(box, arr.chunks[-3:], arr.shape[-3:])
    worker = None
    if keys:
        try:
            from distributed import get_worker

            worker = get_worker()
        except (ImportError, ValueError):
            worker = None
    if worker is None:
        yield
        return
    from distributed import Lock

    locks = [Lock(f"volinfer:{os.path.abspath(job.output)}:{'.'.join(map(str, k))}") for k in sorted(keys)]
    held = []
    try:
        for lock in locks:
            lock.acquire()
            held.append(lock)
        yield
    finally:
        for lock in reversed(held):
            lock.release()


def _own_peak_mb() -> float:
    """This process's own peak RSS: VmHWM belongs to the current address space, whereas ru_maxrss also carries the
    high-water mark of whatever process forked this one before exec (a Dask worker spawned from a big client)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration):
        return peak_rss_mb()


def run_zarr(volume: str | Path, model: str | Path, output: str | Path, settings: RunSettings | None = None, *,
             block: int = 256, scheduler: str | None = None, workers: int | None = None,
             **options: Any) -> RunReport:
    """Run a Zarr volume into a Zarr output, block by block: in this process, on a local Dask cluster of ``workers``
    processes, or on the Dask scheduler at ``scheduler``; or into a NIfTI output (``.nii``/``.nii.gz``), slab by
    slab in this process (:func:`run_zarr_to_nifti`). ``settings`` and keyword ``options`` as for
    :func:`volinfer.predict` (plus ``options=`` a dict of compile options); the output settings' ``chunks``
    (default: the input's), ``compression`` and ``pyramid`` (that many downsampled OME-Zarr levels, written as
    blocks complete) shape the store. ``block``: block edge in voxels.

    The output is checked and locked like every output (:mod:`volinfer.io.targets`); its run fingerprint (input and
    model by content, every setting that changes the output) is kept beside the store, and ``resume`` refuses a
    different run."""
    s = RunSettings.from_kwargs(settings, **options)
    if not is_zarr(output):
        if scheduler or workers:
            raise VolinferError("--scheduler/--workers write Zarr outputs (.zarr); a NIfTI output is written by "
                                "this process")
        if s.output.pyramid:
            raise VolinferError("--pyramid applies to Zarr outputs (.zarr)")
        return run_zarr_to_nifti(volume, model, output, s, block=block)
    check_pyramid(s.output.pyramid)
    check_zarr_output(output, [volume], s.overwrite or _legacy(output, s), s.resume)
    with OutputLock(Path(output)):
        return _run_zarr(volume, model, output, s, block, (scheduler, workers))


def _legacy(output: str | Path, s: RunSettings) -> bool:
    """Whether ``--resume`` continues a store an earlier volinfer left unfinished under the output's name, block by
    block (:func:`volinfer.io.zarr_io.unfinished_legacy`); refused in one line when it was written in this process."""
    return s.resume and unfinished_legacy(output, run_journal(output), (journal_path(Path(output)), (
        "left this store unfinished, written in this process: continue it with --engine stream --resume")))


def _adopt_legacy(output: Path, s: RunSettings, job: ZarrJob, blocks: Sequence[Block], journal: Journal) -> None:
    """Move an unfinished store of the old layout (:func:`_legacy`) to the partial store's name once its journal
    says it is this run's; a store whose every block has its marker is finished, replaced only with --overwrite."""
    if not _legacy(output, s):
        return
    journal.check()
    if not s.overwrite and all(_marker(job, b).exists() for b in blocks):
        raise VolinferError(f"{output}: already exists (pass --overwrite to replace it)")
    adopt_legacy(output)


def run_journal(output: str | Path) -> Path:
    """Where a Zarr output keeps the fingerprint of the run that writes it: beside the store (``.<name>.zarr.run.json``),
    like the block markers (:func:`volinfer.io.zarr_io.done_marker_dir`), so that Zarr readers see a clean store."""
    return aux_path(Path(output), ".run.json")


@dataclass
class _Prepared:
    """A Zarr input opened and a run resolved for it (model not compiled yet)."""

    source: Any
    in_arr: Any
    tm: TileModel
    setup: Any
    options: dict[str, Any]
    settings: dict[str, Any]  # what the fingerprint records
    choice: Any = None  # the planner's decision (volinfer.run.setup.TilingChoice)


def _prepare(volume: Any, model: Any, s: RunSettings) -> _Prepared:
    """The Zarr input opened, its one pre-pass made, the run planned (:func:`volinfer.run.pipeline.plan`, tiles
    only: blocks stream no layers) in the precision that runs, and resolved."""
    t, rt = s.tiling, s.runtime
    options = {k: v for k, v in rt.compile_dict().items() if v is not None}
    source, in_arr = open_zarr_source(volume)
    handle = TileModel(model, tile=t.tile, layout=rt.layout, output=rt.model_output,
                       options=CompileOptions(**options), compile=False)
    scan = scan_input(handle, source, make_normalizer(handle, s, source.channels), s.input.nan_value)
    guarded = guard_for(handle, scan.input_abs_max)  # before planning: plan in the precision that runs
    if guarded is not handle:
        handle, options = guarded, {**options, "precision": guarded.precision}
    # Zarr/Dask runs freeze no normalisation statistics yet: plan as for per-tile statistics
    planned = pipeline.plan(handle, source.shape, s, norm_stats="tile", stream=False)
    tm = planned.model
    setup = resolve(tm, source.shape, source.channels, s, overlap=planned.overlap, normalizer=scan.normalizer)
    scan.apply(setup)
    settings = fingerprint_options(s, tm, setup, norm_stats="tile", norm_passes=0, engine="tiles")
    return _Prepared(source, in_arr, tm, setup, options, settings, planned.choice)


def _job(p: _Prepared, volume: Any, output: Any, model: Any, s: RunSettings, levels: int = 0) -> ZarrJob:
    st, t = p.setup, s.tiling
    ref = ModelRef(str(model), p.tm.tile, p.tm.layout, p.tm.output_index, p.options)
    tiles = TileJob(st.grid, st.normalizer, pad_mode=t.pad_mode, requests=s.runtime.requests,
                    reuse_constant=t.reuse_constant, nan_fill=st.nan_fill, mirror=tuple(sorted(t.mirror)))
    return ZarrJob(str(volume), str(output), ref, tiles, st.stitch, t.gaussian_sigma, st.spec, levels=levels,
                   method=downsample_method(s.output.kind))


def _report(p: _Prepared, output: Any, t0: float, results: list[dict[str, Any]], settings: RunSettings) -> RunReport:
    """The run's report (:func:`volinfer.run.report.build_report`): the blocks' work, the verdict, the largest
    per-process peak."""
    done = [r for r in results if not r["skipped"]]
    work = Work(time.perf_counter() - t0, sum(r["busy_s"] for r in done), sum(r["tiles"] for r in done),
                sum(r["reused"] for r in done))
    s = p.setup
    rep = build_report(s, p.tm, p.source, settings, work, str(output))
    if p.choice is not None:
        fid = verdict(s, p.choice, frozen=False)
        rep.set_fidelity(fid)
        if p.choice.norm_layers and not fid.exact:
            rep.not_exact.append("Zarr/Dask runs do not yet freeze whole-volume normalisation statistics")
        rep.notes.extend(p.choice.notes + s.notes)
    worker_peaks = [r["peak_rss_mb"] for r in done if "peak_rss_mb" in r]
    if worker_peaks:
        rep.extra["worker peak"] = f"{max(worker_peaks):.0f} MB (largest per-process peak RSS)"
    return rep


def chunk_shape(chunks: Any, source: Any) -> tuple[int, int, int]:
    """The output store's chunks in its ``(z, y, x)`` order: as asked, else the input's."""
    if chunks is None:
        in_chunks = tuple(source.readers[0].chunks[::-1])
        return in_chunks if max(in_chunks) >= 16 else (64, 64, 64)  # type: ignore[return-value]
    if isinstance(chunks, (int, np.integer)):
        return (int(chunks),) * 3
    return tuple(int(c) for c in chunks)  # type: ignore[return-value]


def _run_zarr(volume: Any, model: Any, output: Any, s: RunSettings, block: int,
              where: tuple[str | None, int | None]) -> RunReport:
    """:func:`run_zarr` once the output is checked and locked; ``where``: (scheduler, workers). The blocks write
    the hidden partial store, moved onto ``output`` once all are done (see module docs)."""
    t0 = time.perf_counter()
    o = s.output
    p = _prepare(volume, model, s)
    chunk3 = chunk_shape(o.chunks, p.source)  # (z, y, x), the store's order; the grid's is (x, y, z)
    per = block_extent(chunk3, (block,) * 3)
    check_pyramid(o.pyramid, per, chunk3)
    blocks, split = split_blocks(p.setup.grid, chunk3[::-1], block, o.pyramid)
    journal = Journal(Path(output), run_fingerprint([Path(volume)], p.tm.path, dict(
        p.settings, chunks=chunk3, block=block, compression=o.compression, split=split,
        **({"pyramid": o.pyramid} if o.pyramid else {}))), path=run_journal(output))
    store = partial_store(output)
    job = replace(_job(p, volume, store, model, s, levels=o.pyramid), markers=str(done_marker_dir(output)))
    _adopt_legacy(Path(output), s, job, blocks, journal)
    fresh = not (s.resume and store.is_dir())
    try:
        _create_store(p, volume, model, Path(output), s, chunk3, per, journal)
        results = _execute(job, blocks, where[0], where[1], s.progress)
        publish_store(store, Path(output), s.overwrite)
    except BaseException as e:  # damaged input, a model that fails...: nothing to resume unless interrupted
        if fresh and not isinstance(e, (ResumableError, Interrupted, KeyboardInterrupt)):
            _discard_store(Path(output))
        if isinstance(e, KeyboardInterrupt) and store.is_dir():
            raise Interrupted(f"partial output kept beside {output}; run the same command with --resume to "
                              f"continue") from None
        raise
    _discard_state(Path(output))  # the output is complete: its markers and fingerprint go
    rep = _report(p, output, t0, results, s)
    done = [r for r in results if not r["skipped"]]
    rep.extra["blocks"] = (f"{len(done)} run, {len(results) - len(done)} already complete, "
                           f"{len({r['pid'] for r in done})} process(es), split along {split}")
    rep.extra["tile runs"] = tile_runs_line(p.setup.grid, blocks)
    if o.pyramid:
        rep.extra["pyramid"] = f"{o.pyramid} downsampled level(s) ({downsample_method(o.kind)}), OME-Zarr"
    return rep


def _discard_store(output: Path) -> None:
    """Remove the partial store of ``output`` with its fingerprint and block markers (kept only for resumable
    failures). The fingerprint goes first: a crash in between must not leave it beside a store already at the output
    (an ``--overwrite`` run's), which ``--resume`` would take for an unfinished store of the old layout."""
    _discard_state(output)
    discard_partial(partial_store(output))


def _discard_state(output: Path) -> None:
    """Remove a Zarr run's block markers and fingerprint beside ``output``."""
    shutil.rmtree(done_marker_dir(output), ignore_errors=True)
    run_journal(output).unlink(missing_ok=True)


def _create_store(p: _Prepared, volume: Any, model: Any, output: Path, s: RunSettings,
                  chunk3: tuple[int, int, int], per: tuple[int, int, int], journal: Journal) -> None:
    """Create ``output``'s partial store (or, resuming, reopen it after checking the fingerprint); clear stale
    markers."""
    o, store = s.output, partial_store(output)
    resuming = s.resume and store.is_dir()
    if resuming:
        journal.check()  # before touching the store: a different input, model or setting is refused
    spec = p.setup.spec
    layout = StoreSpec(chunk3, o.pyramid, downsample_method(o.kind), per, "zstd" if o.compression else None,
                       store_geometry(volume), attrs={"model": str(model), "stitch": p.setup.stitch, "kind": o.kind,
                                                      "tile": list(p.tm.tile), "overlap": list(p.setup.overlap)})
    create_output(store, p.source.shape[::-1], spec.out_channels, spec.dtype, layout, overwrite=True,
                  resume=resuming)  # not resuming: a stale partial store is started over
    if not resuming:  # a fresh store (also under --resume when there was none): no marker may survive
        journal.update(0, 0)
        marker_dir = done_marker_dir(output)
        if marker_dir.exists():
            for m in marker_dir.iterdir():
                m.unlink()


def split_blocks(grid: TileGrid, chunks: Sequence[int], block: int, pyramid: int) -> tuple[list[Block], str]:
    """The run's blocks and what their borders follow: tile centres for crop (each tile runs once), whole output
    chunks for blending and for pyramids (whose levels are downsampled block by block)."""
    if grid.mode == "crop" and not pyramid:
        return plan_core_blocks(grid, (block,) * 3), "tile centres"
    return plan_blocks(grid.shape, chunks, (block,) * 3), "output chunks"


def tile_runs_line(grid: TileGrid, blocks: Sequence[Block]) -> str:
    """The summary's count of tile inferences the split costs, e.g. ``154 computed for 125 in the grid (1.23x)``."""
    runs, tiles = redundancy(grid, blocks)
    return f"{runs} computed for {tiles} in the grid ({runs / tiles:.2f}x)"


def block_extent(chunks: Sequence[int], block: Sequence[int]) -> tuple[int, int, int]:
    """Per-axis size of the blocks :func:`volinfer.tiling.blocks.plan_blocks` makes (whole chunks)."""
    return tuple(max(1, round(b / c)) * c for b, c in zip(block, chunks))  # type: ignore[return-value]


def run_zarr_to_nifti(volume: str | Path, model: str | Path, output: str | Path,
                      settings: RunSettings | None = None, *, block: int = 256, **options: Any) -> RunReport:
    """A Zarr volume into a NIfTI file: slabs along the array's first axis, in order (see module docs)."""
    s = RunSettings.from_kwargs(settings, **options)
    check_target(Path(output), s.overwrite, [Path(volume)])
    with OutputLock(Path(output)):
        return _run_zarr_to_nifti(volume, model, Path(output), s, block)


def nifti_slabs(grid: TileGrid, block: int) -> list[Block]:
    """Blocks spanning x and y whole, made of whole rows of tiles along z: one core per slab for crop (every tile
    runs once), about ``block`` voxels for blending (tiles straddling two slabs run for both)."""
    ax = grid.axes[2]
    if grid.mode == "crop":
        spans = list(ax.cores)
        k = 1
    else:
        ends = list(ax.starts[1:]) + [ax.size]
        spans = list(zip(ax.starts, ends))
        k = max(1, round(block / max(1, ends[0] - ax.starts[0])))
    groups = [spans[i : i + k] for i in range(0, len(spans), k)]
    X, Y = grid.shape[0], grid.shape[1]
    return [Block((0, 0, n), ((0, X), (0, Y), (g[0][0], g[-1][1]))) for n, g in enumerate(groups)]


def _run_zarr_to_nifti(volume: Any, model: Any, output: Path, s: RunSettings, block: int) -> RunReport:
    t0 = time.perf_counter()
    p = _prepare(volume, model, s)
    slabs = nifti_slabs(p.setup.grid, block)
    journal = Journal(output, run_fingerprint([Path(volume)], p.tm.path, dict(p.settings, block=block)))
    start = journal.resume_row() if s.resume else 0
    writer = NiftiWriter(output, p.source.shape, p.setup.spec.out_channels, p.setup.spec.dtype,
                         store_geometry(volume).nifti_header(), resume=s.resume)
    job = _job(p, volume, output, model, s)
    results = _write_slabs(job, slabs, start, writer, journal, s.progress)
    rep = _report(p, output, t0, results, s)
    rep.extra["slabs"] = f"{len(results)} run, {start} already complete"
    rep.extra["tile runs"] = tile_runs_line(p.setup.grid, slabs)
    return rep


def _write_slabs(job: ZarrJob, slabs: list[Block], start: int, writer: Any, journal: Journal,
                 progress: bool) -> list[dict[str, Any]]:
    """Run and write the slabs from ``start`` on, journaled slab by slab; keep a resumable output when
    interrupted, remove it on any other failure (:class:`volinfer.run.pipeline.JournaledOutput`)."""
    results: list[dict[str, Any]] = []
    bar = progress_bar(len(slabs), "volinfer", "slab", initial=start, disable=not progress)
    try:
        with JournaledOutput(Path(job.output)) as out:
            out.writer, out.journal = writer, journal
            journal.update(start, len(slabs))
            for n in range(start, len(slabs)):
                out_block, info = run_block_array(job, slabs[n])
                writer.write(out_block.transpose(0, 3, 2, 1), slabs[n].box[2][0], 0)  # (C, x, y, z) -> (C, z, y, x)
                writer.sync()
                journal.update(n + 1, len(slabs))
                results.append(info)
                bar.update(1)
            writer.commit()
            journal.remove()
    finally:
        bar.close()
    return results


def _execute(job: ZarrJob, blocks: list[Block], scheduler: str | None, workers: int | None,
             progress: bool) -> list[dict[str, Any]]:
    bar = progress_bar(len(blocks), "volinfer", "block", disable=not progress)
    if scheduler is None and not workers:
        out = []
        for b in blocks:
            out.append(run_block(job, b))
            bar.update(1)
        bar.close()
        return out
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise VolinferError("--scheduler/--workers need Dask: pip install 'volinfer[dask]'") from None
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,  # type: ignore[arg-type]
                               dashboard_address=None, host="127.0.0.1")
        client = Client(cluster)
    try:
        futures = client.map(run_block, [job] * len(blocks), blocks, pure=False, retries=3)
        out = []
        for fut in as_completed(futures):
            out.append(fut.result())
            bar.update(1)
        return out
    finally:
        bar.close()
        client.close()
        if cluster is not None:
            cluster.close()
