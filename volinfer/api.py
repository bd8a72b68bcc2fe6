"""Python API: :func:`predict` runs a volume (file(s) or array) through a model, tile by tile."""

from __future__ import annotations

import os
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from volinfer.run.engine import run_tiles
from volinfer.run.job import RowProgress, TileJob
from volinfer.run.report import RunReport, Work, build_report
from volinfer.errors import Interrupted, VolinferError, strip_path
from volinfer.io.batch_record import BatchRecord, check_unique
from volinfer.io.journal import Journal, journal_path
from volinfer.io.plane_store import remove_stale, spill_location
from volinfer.model.tile_model import TileModel
from volinfer.model.stream_graph import NotStreamable
from volinfer.io.reader import VolumeSource, stored_as
from volinfer.io.ome import Geometry, geometry_from_nifti
from volinfer.io.formats import is_tiff_output, is_zarr, is_zarr_output
from volinfer.io.sources import input_files
from volinfer.io.tiff_io import TiffWriter
from volinfer.run.postprocess import OutputSpec
from volinfer.run.settings import RunSettings
from volinfer.run.norm_stats import fit_norm_statistics
from volinfer.run.model_grid import ModelGrid, in_mm, plan_model_grid, run_on_model_grid, settings_for_model_grid
from volinfer.run.feeder import TileFeeder
from volinfer.run.fidelity import Fidelity
from volinfer.run.setup import (InputScan, TilingChoice, RunSetup, guard_for, make_normalizer, needs_norm_passes,
                                output_spec, resolve, scan_input, stream_verdict, verdict)
from volinfer.run.skewed_bands import run_skewed
from volinfer.run.stream import band_reader, prepare_spill, run_stream
from volinfer.run.segment_compile import CompileAhead
from volinfer.run import pipeline
from volinfer.run.pipeline import JournaledOutput, fingerprint_options, open_source, run_fingerprint
from volinfer.run.stream_stats import fit_stream_statistics, frozen_plan
from volinfer.io.targets import OutputLock
from volinfer.io.writer import ArrayWriter, NiftiWriter, check_any_output
from volinfer.io.regrid import planes_final, voxel_sizes
from volinfer.io.zarr_io import StoreSpec, adopt_legacy, open_zarr_source, unfinished_legacy
from volinfer.io.zarr_writer import ZarrWriter, row_planes, store_spec
from volinfer.tiling.stitch import make_stitcher
from volinfer.run.distributed import chunk_shape, run_journal, run_zarr
from volinfer.run import zarr_route

Overlap = float | int | str | Sequence[float | int] | None


def _row_done(writer: Any, journal: Journal, row: int, rows: int) -> None:
    """Rows ``< row`` are final: make their data durable first, only then let the journal say so (a Zarr output
    may claim fewer rows: those whose planes are all in the store)."""
    writer.sync()
    journal.update(writer.durable_row(row) if isinstance(writer, ZarrWriter) else row, rows)


def predict(volume: Any, model: str | os.PathLike | TileModel, output: str | os.PathLike | None = None,
            settings: RunSettings | None = None, *, report: bool = False, **options: Any) -> Any:
    """Run ``volume`` through ``model`` tile by tile.

    ``volume``: a path (NIfTI, TIFF stack, MHA/MHD/NRRD, Zarr: :mod:`volinfer.io.sources`), a list of paths (one per
    input channel), or a numpy array (x, y, z) — with ``channel_axis`` for 4-D arrays. ``model``: an
    ``.xml``/``.onnx`` path or a :class:`TileModel`. A model that stores an orientation or spacing has file inputs
    reoriented and resampled to them and the output mapped back (:mod:`volinfer.run.model_grid`; ``resample=False``
    keeps the volume's voxel size).
    With ``output`` (``.nii`` / ``.nii.gz`` / ``.tif`` / ``.zarr``) the result is streamed to disk and a
    :class:`RunReport` is returned;
    without, the result array is returned ((x, y, z) or (x, y, z, c)), or ``(array, report)`` when ``report=True``.
    ``settings`` (:class:`volinfer.run.settings.RunSettings`) says how to run; keyword ``options`` (``tile=``,
    ``overlap=``, ``stitch=``, ``sigma=``, ``pad_mode=``, ``kind=``, ``activation=``, ``channels=``, ``threshold=``,
    ``prob_dtype=``, ``normalize=``, ``model_output=``, ``layout=``, ``device=``, ``precision=``, ``threads=``,
    ``streams=``, ``cache_dir=``, ``requests=``, ``channel_axis=``, ``nan_value=``, ``reuse_constant=``,
    ``resume=``, ``overwrite=``, ``progress=``, ``max_memory_mb=``, ``norm_stats=``, ``mirror=``, ``zarr_output=``)
    override single fields of it (:meth:`RunSettings.from_kwargs`).
    Options default to the settings stored in the model (tile, overlap, stitching, activation, normalisation).
    Volumes with NaN/Inf voxels are refused unless ``nan_value`` says what to replace them with. File outputs are
    journaled per z-row of tiles: after an interruption, ``resume=True`` continues where the run stopped and writes
    the same bytes an uninterrupted run would.

    Unless ``tile`` is given (or ``model`` is a :class:`TileModel` built with a tile), the tile is planned for
    fidelity first: crop margins that cover the model's receptive field, growing the tile up to the whole padded
    volume within ``max_memory_mb`` (default: a quarter of the machine's RAM or cgroup limit).
    InstanceNorm/GroupNorm layers run with whole-volume statistics (``norm_stats="volume"``, found in streamed
    passes) or per tile (``"tile"``). The report says whether the run was ``exact`` and, if not, why; if so, what
    exact means for it (``exact_meaning``) and the tiled-vs-whole deviation measured at convert time
    (``tiling_deviation``, None when not stored or one tile).

    An ``output`` ending in ``.zarr`` is written as OME-Zarr (:class:`volinfer.io.zarr_writer.ZarrWriter`) with the
    input's affine; ``zarr_output`` (or the settings' ``chunks``, ``compression``, ``pyramid``) sets its layout.
    """
    t_start = time.perf_counter()
    s = RunSettings.from_kwargs(settings, **options)
    run = _Run(s, None if output is None else Path(output), _input_paths(volume))
    handle = _handle(model, s)
    grid = _model_grid(volume, handle, s)
    _lock_output(run)
    if grid.active:
        return _run_on_model_grid(run, grid, handle, report)
    run.grid_notes = grid.notes
    try:
        _plan(run, volume, handle)  # (which stops what it compiles ahead when it fails)
    except BaseException:
        if run.lock is not None:
            run.lock.release()
        raise
    try:
        _execute(run)
    finally:
        _close_ahead(run.stream)  # (taken and joined by a stream that ran; stopped if the run ended before)
        run.source.close()
        if run.lock is not None:
            run.lock.release()
    rep = _report(run, time.perf_counter() - t_start)
    if output is not None:
        return rep
    return (run.result, rep) if report else run.result


@dataclass
class _Run:
    """One :func:`predict` call's state as it goes: settings, output, model, plan, writer, counts."""

    s: RunSettings
    output: Path | None
    in_paths: list[Path]
    lock: OutputLock | None = None
    scan: InputScan | None = None  # the pre-pass's findings, made before planning
    tm: TileModel | None = None  # the model at the planned tile (compiled unless the run streams)
    choice: TilingChoice | None = None  # the planner's decision
    source: VolumeSource | None = None
    overlap: list[float] | None = None
    setup: RunSetup | None = None  # the settings resolved against the model and the volume
    passes: int = 0  # streamed normalisation-statistics passes made
    fidelity: Fidelity | None = None  # the exact / not exact verdict
    journal: Journal | None = None
    writer: NiftiWriter | ZarrWriter | ArrayWriter | None = None
    start_row: int = 0
    counts: tuple[float, int, int] = (0.0, 0, 0)  # busy seconds, tiles run, constant tiles reused
    result: np.ndarray | Path | None = None  # the array (no output file) or what the writer committed
    grid_notes: list[str] = field(default_factory=list)  # what the model's grid step said (volinfer.run.model_grid)
    adopt: bool = False  # --resume continues a store an earlier volinfer left under the output's name (_lock_output)

    @property
    def stream(self) -> Any:
        """The :class:`volinfer.run.stream.StreamPlan` when the run streams layer by layer (planned with the tiling)."""
        return self.choice.stream if self.choice is not None else None


def _input_paths(volume: Any) -> list[Path]:
    """The input files (for the output check, the lock and the fingerprint); none for arrays."""
    if isinstance(volume, (np.ndarray, VolumeSource)):
        return []
    return [Path(volume)] if isinstance(volume, (str, os.PathLike)) else [Path(p) for p in volume]


def _output_guard_paths(run: _Run) -> list[Path]:
    """The inputs an output may not be written over: the input files and the data files their headers name."""
    return input_files(run.in_paths)


def _handle(model: Any, s: RunSettings) -> TileModel:
    """The model, read but not compiled (compiled at the planned tile)."""
    t, rt = s.tiling, s.runtime
    return model if isinstance(model, TileModel) else TileModel(
        model, tile=t.tile, layout=rt.layout, output=rt.model_output, compile=False, options=rt.compile_options())


def _model_grid(volume: Any, handle: TileModel, s: RunSettings) -> ModelGrid:
    """What bringing ``volume`` to the model's stored orientation and spacing takes (headers only)."""
    settings = handle.settings
    if getattr(settings, "orientation", None) is None and getattr(settings, "spacing", None) is None:
        return plan_model_grid(None, settings, s.input.resample)
    if isinstance(volume, (np.ndarray, VolumeSource)):
        return plan_model_grid(volume if isinstance(volume, VolumeSource) else None, settings, s.input.resample)
    with open_source(volume, 1, s.input.channel_axis) as src:
        return plan_model_grid(src, settings, s.input.resample)


def _run_on_model_grid(run: _Run, grid: ModelGrid, handle: TileModel, report: bool) -> Any:
    """:func:`predict` through the model's grid (:mod:`volinfer.run.model_grid`): the output lock is held (and
    released here, whatever happens)."""
    spec: OutputSpec | None = None  # labels taken from the probabilities mapped back (set below)

    def final_writer(source: VolumeSource, channels: int, dtype: np.dtype) -> tuple[Any, np.dtype]:
        if spec is None:
            return _final_writer(run, source, channels, dtype)
        writer, _ = _final_writer(run, source, spec.out_channels, spec.dtype)
        return _Labelling(writer, spec), dtype

    try:
        inner = settings_for_model_grid(run.s)
        if run.s.output.kind == "labels" and grid.resampling is not None:
            spec, _ = output_spec(handle, run.s.output)
            spec = spec if spec.labels_from_probabilities else None
        if spec is not None:  # labels from the probabilities resampled back, not from labels resampled back
            inner = RunSettings.from_kwargs(inner, kind="probabilities", channels=None, threshold=None,
                                            activation=spec.activation)
        result, rep = run_on_model_grid(
            grid, run.in_paths, lambda src, out: predict([src], handle, out, inner), final_writer,
            resume=run.s.resume, kind="probabilities" if spec is not None else run.s.output.kind,
            near=run.output.parent if run.output is not None else None,
            back="probabilities, linear, labelled there" if spec is not None else None)
    finally:
        if run.lock is not None:
            run.lock.release()
    rep.output = str(result) if run.output is not None else None
    if spec is not None:  # (the inner run wrote probabilities; what was written is labels)
        rep.output_kind, rep.output_dtype = spec.kind, str(spec.dtype)
    if run.output is not None:
        return rep
    return (result, rep) if report else result


def _final_writer(run: _Run, source: VolumeSource, channels: int, dtype: np.dtype) -> tuple[Any, np.dtype]:
    """The output writer for the input's grid, and the type it stores (float16 where asked, for Zarr)."""
    o, output = run.s.output, run.output
    if o.kind != "labels" and o.prob_dtype == "float16" and output is not None and is_zarr_output(output):
        dtype = np.dtype(np.float16)
    if output is None:
        return _ArrayResult(source.shape, channels, dtype), dtype
    if is_zarr_output(output):
        return ZarrWriter(output, source.shape, channels, dtype, _store_spec(run, source),
                          row_planes=[0, source.shape[2]], overwrite=run.s.overwrite), dtype
    if is_tiff_output(output):
        return TiffWriter(output, source.shape, channels, dtype, voxel_mm=_voxel_mm(source)), dtype
    return NiftiWriter(output, source.shape, channels, dtype, _output_reference(source), source.affine), dtype


class _Labelling:
    """The final output of a run mapped back from the model's voxel size: takes blocks of resampled probabilities
    (C, nz, Y, X) and writes their labels (:meth:`OutputSpec.label_probabilities`) into ``writer``."""

    def __init__(self, writer: Any, spec: OutputSpec) -> None:
        self.writer, self.spec = writer, spec

    def write(self, block: np.ndarray, k0: int, j0: int = 0) -> None:
        out = np.empty((self.spec.out_channels, *block.shape[1:]), self.spec.dtype)
        self.spec.label_probabilities(block, out)
        self.writer.write(out, k0, j0)

    def planes_final(self, z: int) -> None:
        planes_final(self.writer, z)

    def commit(self) -> Any:
        return self.writer.commit()

    def abort(self) -> None:
        self.writer.abort()


class _ArrayResult(ArrayWriter):
    """An :class:`ArrayWriter` whose ``commit`` returns the array (the grid steps commit every writer)."""

    def commit(self) -> np.ndarray:
        return self.result()

    def abort(self) -> None:
        pass


#: What :func:`volinfer.io.zarr_io.unfinished_legacy` says of a store the blocks wrote, met in this process.
BLOCK_WRITTEN = ("wrote this store block by block (its progress lies beside it): run the command that wrote it "
                 "(without --engine stream) with --resume to finish it")


def _lock_output(run: _Run) -> None:
    """Check the output and lock it before anything is written: a second run fails here, at once. With ``--resume``,
    a store an earlier volinfer left unfinished under the output's name passes the check (:attr:`_Run.adopt`):
    it moves to the partial store's name once its journal says it is this run's (:func:`_open_writer`)."""
    if run.output is not None:
        run.adopt = run.s.resume and is_zarr_output(run.output) and unfinished_legacy(
            run.output, journal_path(run.output), (run_journal(run.output), BLOCK_WRITTEN))
        check_any_output(run.output, _output_guard_paths(run), run.s.overwrite or run.adopt, run.s.resume)
        run.lock = OutputLock(run.output).acquire()
        remove_stale(*spill_location(run.output))  # spill: what a killed run on this output left


def _plan(run: _Run, volume: Any, handle: TileModel) -> None:
    """The run's plan (:func:`volinfer.run.pipeline.plan`), the model at its tile (compiled unless it streams),
    and the opened volume."""
    shape, n_channels = _volume_shape(volume, run.s.input.channel_axis)
    if n_channels != handle.in_channels:
        raise VolinferError(f"the volume has {n_channels} channel(s) but the model expects {handle.in_channels} "
                            f"(give one 3-D file per channel, or one 4-D file)")
    planned = _scan_and_plan(run, volume, handle, shape)
    run.choice, run.overlap = planned.choice, planned.overlap
    try:
        if run.stream is not None:  # spill: files beside the output, disk space checked before any work
            prepare_spill(run.stream, run.output)
        run.tm = planned.model if planned.stream is not None else planned.model.at(planned.model.tile)
        run.source = open_source(volume, run.tm.tile[2], run.s.input.channel_axis)
    except BaseException:
        _close_ahead(run.stream)
        raise


def _scan_and_plan(run: _Run, volume: Any, handle: TileModel, shape: tuple[int, int, int]) -> pipeline.RunPlan:
    """The plan, then the one pre-pass over the input (:func:`volinfer.run.setup.scan_input`) while a plain
    stream's segments compile (:class:`volinfer.run.segment_compile.CompileAhead`), then the precision guard: where
    it moves the model to f32 the run plans again, so that memory and time are planned in the precision that runs.
    The plan weighs how the input is stored (bytes a voxel, what its readers hold:
    :func:`volinfer.io.reader.read_buffer`) and the planes its storage keeps together (a Zarr chunk's depth)."""
    s = run.s
    banded = run.output is None or not is_zarr_output(run.output)
    source = open_source(volume, handle.tile[2], s.input.channel_axis)
    sp = None
    try:
        stored, depth = stored_as(source.readers), source.stored_depth
        planned = pipeline.plan(handle, shape, s, banded=banded, stored=stored, stored_depth=depth)
        sp = planned.stream
        if sp is not None and sp.skew is None and not planned.choice.norm_layers:
            sp.ahead = CompileAhead(planned.model, sp.graph, sp.chunks)
        run.scan = scan_input(handle, source, make_normalizer(handle, s, source.channels), s.input.nan_value,
                              fingerprint=run.output is not None and bool(run.in_paths))
    except BaseException:
        _close_ahead(sp)
        raise
    finally:
        if source is not volume:
            source.close()
    guarded = guard_for(handle, run.scan.input_abs_max)
    if guarded is handle:
        return planned
    _close_ahead(sp)
    return pipeline.plan(guarded, shape, s, banded=banded, stored=stored, stored_depth=depth)


def _close_ahead(sp: Any) -> None:
    """Stop the segments a stream plan ``sp`` compiles ahead (:class:`CompileAhead`), if any, and wait for them."""
    if sp is not None and sp.ahead is not None:
        sp.ahead.close()


def _execute(run: _Run) -> None:
    """Resolve, pre-pass, open the writer and run the tiles; on failure keep a resumable output or discard it
    (:class:`volinfer.run.pipeline.JournaledOutput`)."""
    with JournaledOutput(run.output) as out:
        _resolve(run)
        _open_writer(run, out)
        _run_tiles(run)
        if run.output is not None:
            rows = run.setup.grid.axes[2].count
            _row_done(run.writer, run.journal, rows, rows)  # every row final: a failure while compressing stays resumable
        run.result = run.writer.commit() if run.output is not None else run.writer.result()
        if run.output is not None:
            run.journal.remove()  # type: ignore[union-attr]


def _resolve(run: _Run) -> None:
    """Settings against the model and volume, the one pre-pass, frozen normalisation statistics, the verdict."""
    s = run.s
    run.setup = resolve(run.tm, run.source.shape, run.source.channels, s, overlap=run.overlap,
                        normalizer=run.scan.normalizer, stream=run.stream)
    run.scan.apply(run.setup)  # the pre-pass ran with planning (_scan_and_plan)
    if run.stream is not None:
        if run.choice.norm_layers:
            _freeze_for_stream(run)
        run.stream.store_in(run.tm.precision)  # the guard may have moved to f32: chunks and buffers re-sized
        run.fidelity = stream_verdict(run.setup, run.choice)
        return
    run.tm, run.passes = _freeze_norm_statistics(run.tm, run.choice, run.setup, run.source, s.tiling.pad_mode,
                                                 s.progress)
    run.fidelity = verdict(run.setup, run.choice, frozen=run.passes > 0)


def _fingerprint_options(run: _Run) -> dict[str, Any]:
    """Every setting that changes a file output, as the journal records it."""
    return fingerprint_options(run.s, run.tm, run.setup, norm_stats=run.choice.norm_stats, norm_passes=run.passes,
                               engine="stream" if run.stream is not None else "tiles",
                               **_zarr_settings(run.output, run.s.output.zarr_output()))


def _open_writer(run: _Run, out: JournaledOutput) -> None:
    """An in-memory array, or a NIfTI/Zarr file output with its journal (resumed where it stopped)."""
    setup, source, output = run.setup, run.source, run.output
    spec = setup.spec
    if output is None:
        run.writer = ArrayWriter(source.shape, spec.out_channels, spec.dtype)
        return
    if run.s.resume and (run.tm.path is None or not run.in_paths):
        raise VolinferError("resume needs the model and the volume given as files")
    run.journal = Journal(output, run_fingerprint(run.in_paths, run.tm.path, setup=setup, header=source.header,
                                                  options=_fingerprint_options(run)))
    if run.s.resume:
        run.start_row = run.journal.resume_row()
        if run.adopt:
            adopt_legacy(output)
    if is_zarr_output(output):
        run.writer = _zarr_writer(run)
    elif is_tiff_output(output):
        run.writer = TiffWriter(output, source.shape, spec.out_channels, spec.dtype, voxel_mm=_voxel_mm(source),
                                resume=run.s.resume)
    else:
        run.writer = NiftiWriter(output, source.shape, spec.out_channels, spec.dtype, _output_reference(source),
                                 source.affine, resume=run.s.resume)
    out.writer, out.journal = run.writer, run.journal
    run.journal.update(run.start_row, setup.grid.axes[2].count)


def _run_tiles(run: _Run) -> None:
    """The tiles, row by row (a resumed run starts at its first unfinished row; it may only lack compression)."""
    setup, t, rows = run.setup, run.s.tiling, run.setup.grid.axes[2].count
    if run.output is not None and run.start_row >= rows:
        return
    on_row_done = None
    if run.output is not None:
        writer, journal = run.writer, run.journal
        on_row_done = lambda r: _row_done(writer, journal, r, rows)  # noqa: E731
    job = TileJob(setup.grid, setup.normalizer, pad_mode=t.pad_mode, requests=run.s.runtime.requests,
                  reuse_constant=t.reuse_constant, nan_fill=setup.nan_fill, mirror=t.mirror)
    rows_done = RowProgress(run.start_row, on_row_done, run.s.progress)
    if run.stream is not None:
        streamer = run_skewed if run.stream.skew is not None else run_stream
        busy, calls = streamer(run.source, run.tm, run.stream, job, setup.spec, run.writer, rows_done)
        run.counts = (busy, calls, 0)
        return
    stitcher = make_stitcher(setup.grid, setup.spec, run.writer, setup.stitch, t.gaussian_sigma)
    run.counts = run_tiles(run.source, run.tm, stitcher, job, rows=rows_done)


def _report(run: _Run, wall_s: float) -> RunReport:
    """The run's report (:func:`volinfer.run.report.build_report`) with its verdict and notes."""
    busy, n, reused = run.counts
    work = Work(wall_s, busy, n, reused, run.passes, "stream" if run.stream is not None else "tiles")
    rep = build_report(run.setup, run.tm, run.source, run.s, work,
                       str(run.result) if run.output is not None else None)
    rep.set_fidelity(run.fidelity)
    rep.spill = run.stream.spill_summary() if run.stream is not None else None  # spill: what went to disk
    rep.notes.extend(_notes(run))
    return rep


def _notes(run: _Run) -> list[str]:
    """The summary's notes: planning, precision, mirroring, frozen statistics and the passes over the input."""
    tm, setup, passes, mirror = run.tm, run.setup, run.passes, run.s.tiling.mirror
    notes = list(run.choice.notes + setup.notes + run.grid_notes)
    if tm.precision_reason != "asked for":  # auto, or a guard overruled it (run.setup.guard_for)
        notes.append(f"precision {tm.precision}: {tm.precision_reason}")
    if mirror:
        notes.append(f"test-time mirroring over {''.join('xyz'[a] for a in mirror)}: "
                     f"{2 ** len(mirror)} inferences per tile")
    if passes:
        notes.append(f"{len(run.choice.norm_layers)} normalisation layer(s) frozen to whole-volume statistics in "
                     f"{passes} streamed pass(es) of the model")
    notes.append(f"{setup.input_passes + passes} pass(es) over the input before the tiles "
                 f"({setup.input_passes} pre-pass: NaN/Inf, value range, statistics, fingerprint as needed"
                 f"{f'; {passes} normalisation-statistics' if passes else ''})")
    if run.output is not None and is_tiff_output(run.output) and _turned(run.source):
        notes.append("a TIFF stack records a voxel size, not where its axes point: the input's rotated or flipped "
                     "axes are not in the output (write .nii or .zarr to keep them)")
    return notes


def _turned(source: VolumeSource) -> bool:
    """Whether the input's affine rotates or flips its axes (what a TIFF output cannot say)."""
    if source.affine is None or not source.orientation_known:
        return False
    m = np.asarray(source.affine, float)[:3, :3]
    return bool(np.any(np.abs(m - np.diag(np.diag(m))) > 1e-6 * np.abs(m).max()) or np.any(np.diag(m) <= 0))


def _zarr_settings(output: Any, zarr_output: dict[str, Any] | None) -> dict[str, Any]:
    """What a Zarr output adds to the run fingerprint (nothing for NIfTI outputs)."""
    if output is None or not is_zarr_output(output):
        return {}
    z = {"chunks": 64, "compression": True, "pyramid": 0, **(zarr_output or {})}
    return {"zarr": {k: z[k] for k in ("chunks", "compression", "pyramid")}}


def _store_spec(run: _Run, source: VolumeSource) -> StoreSpec:
    """The layout of the run's Zarr output (chunks, pyramid, compression as the settings say; the input's
    geometry)."""
    o = run.s.output
    z = _zarr_settings(run.output, o.zarr_output())["zarr"]
    geometry = source.geometry  # a Zarr input's own (its unit, the NIfTI header it keeps)
    chunks = chunk_shape(o.chunks, source) if geometry is not None else z["chunks"]  # (default: the input's)
    return store_spec(o.kind, geometry or geometry_from_nifti(source.header, source.affine), chunks, z["pyramid"],
                      z["compression"])


def _output_reference(source: VolumeSource) -> Any:
    """The NIfTI header a NIfTI output copies: the input's own, a Zarr store's (in its unit, as kept), else one made
    from its affine in millimetres (TIFF and ITK readers' unit; "unknown" where it records no voxel size)."""
    if source.header is not None or source.affine is None:
        return source.header
    if source.geometry is not None:  # a Zarr input: the header it keeps, as `to-nifti` restores
        return source.geometry.nifti_header()
    return Geometry(np.asarray(source.affine, float), "millimeter" if source.spacing_known else None).nifti_header()


def _voxel_mm(source: VolumeSource) -> tuple[float, float, float] | None:
    """The input's voxel size (mm), for a TIFF output's physical size; None when the input records none (a TIFF
    output then claims none either) or in no known length unit."""
    if source.affine is None or not source.spacing_known:
        return None
    mm = in_mm(source)
    return None if mm is None else voxel_sizes(mm)


def _zarr_writer(run: _Run) -> "ZarrWriter":
    """The run's Zarr output, written row by row as the engine finishes them (resumed at ``run.start_row``)."""
    source, spec = run.source, run.setup.spec
    return ZarrWriter(run.output, source.shape, spec.out_channels, spec.dtype,  # type: ignore[arg-type]
                      _store_spec(run, source), row_planes=row_planes(run.setup.grid), overwrite=run.s.overwrite,
                      resume_row=run.start_row if run.s.resume else None)


def _volume_shape(volume: Any, channel_axis: int | None) -> tuple[tuple[int, int, int], int]:
    """The spatial shape and channel count of ``volume``, from headers only (the planner needs them before the tile
    is known)."""
    if isinstance(volume, VolumeSource):
        return tuple(volume.shape), volume.channels  # type: ignore[return-value]
    with open_source(volume, 1, channel_axis) as src:
        return tuple(src.shape), src.channels  # type: ignore[return-value]


def _freeze_norm_statistics(tm: TileModel, choice: TilingChoice, setup: RunSetup, source: VolumeSource,
                            pad_mode: str, progress: bool) -> tuple[TileModel, int]:
    """With whole-volume statistics asked for and several crop tiles, the model with its InstanceNorm/GroupNorm
    layers frozen to them (streamed passes), and the number of passes; else the model unchanged and 0."""
    if not needs_norm_passes(setup, choice):
        return tm, 0
    feeder = TileFeeder(source, setup.grid, setup.normalizer, pad_mode, 0.0, setup.nan_fill)
    frozen, passes = fit_norm_statistics(tm, feeder, setup.grid, choice.norm_layers, progress=progress)
    return tm.at(tm.tile, model=frozen), passes


def _freeze_for_stream(run: _Run) -> None:
    """A streamed run of a model with InstanceNorm/GroupNorm layers: their whole-volume statistics from streamed
    passes (:mod:`volinfer.run.stream_stats`), then the stream plan over the frozen model."""
    tm, setup, plan, t = run.tm, run.setup, run.stream, run.s.tiling

    def reader(p: Any) -> Any:
        return band_reader(run.source, tm, p, setup.normalizer, t.pad_mode, setup.nan_fill)

    bands = plan.bands(run.source.shape[1], tm.multiple)
    info: dict[str, Any] = {}
    try:
        frozen, run.passes = fit_stream_statistics(tm, plan, run.choice.norm_layers, bands, reader, run.s.progress,
                                                   info)
    except NotStreamable as e:  # found only once the passes cut the graph: a clear refusal, not an internal error
        raise VolinferError(f"this model's normalisation statistics cannot be streamed at this size ({e}); run with "
                            f"--engine tiles") from None
    if info.get("checkpointed"):
        run.choice.notes.append(f"statistics passes checkpointed: each streamed its own segment of the network from "
                                f"the tensors the pass before it left on disk ({info['written'] / 2**20:.0f} MB "
                                f"written, {info['read'] / 2**20:.0f} MB read back, at most "
                                f"{info['disk_peak'] / 2**20:.0f} MB on disk at once; deleted)")
    elif info.get("note"):
        run.choice.notes.append(info["note"])
    run.tm = tm.at(tm.tile, model=frozen, compile=False)
    run.choice.stream = frozen_plan(plan, run.tm)


# ---- every way of running one command line's inputs: NIfTI, Zarr (local or Dask), batch ----


@dataclass(frozen=True)
class BlockSettings:
    """Zarr-input runs only: block edge in voxels, and where the blocks run (a Dask scheduler address, or a local
    cluster of ``workers`` processes; neither: this process)."""

    block: int | None = None  # None: DEFAULT_BLOCK
    scheduler: str | None = None
    workers: int | None = None


#: Zarr block runs' block edge in voxels, when ``--block`` is not given.
DEFAULT_BLOCK = 256


@dataclass
class BatchResult:
    """What a batch run did: the reports of the volumes written and the (path, one-line error) of those that
    failed."""

    output: Path
    total: int
    reports: list[RunReport]
    failed: list[tuple[Path, str]]
    skipped: list[Path] = field(default_factory=list)  # volumes of other formats beside the NIfTI files

    def as_dict(self) -> dict[str, Any]:
        return {"runs": [r.as_dict() for r in self.reports],
                "failed": [{"input": str(p), "error": m} for p, m in self.failed],
                "skipped": [str(p) for p in self.skipped]}

    def summary(self) -> str:
        return "\n".join([f"{self.total - len(self.failed)} of {self.total} volume(s) written to {self.output}"]
                         + [f"failed: {p}: {m}" for p, m in self.failed]
                         + ([f"skipped (batch runs take .nii/.nii.gz; run these one by one): "
                             f"{', '.join(p.name for p in self.skipped)}"] if self.skipped else []))


def run_any(inputs: Sequence[Path], model: str | os.PathLike, output: Path, settings: RunSettings, *,
            blocks: BlockSettings = BlockSettings(), note: str | None = None,
            notify: Any = None) -> RunReport | BatchResult:
    """What ``volinfer run`` does with its inputs: a Zarr input block by block (:func:`volinfer.run.distributed.run_zarr`),
    one NIfTI volume (:func:`predict`), or a batch (one directory or glob of NIfTI files into a directory output,
    :func:`run_batch`). ``note`` is added to every report; ``notify`` receives the batch's per-volume lines."""
    refuse_unused_store_options(inputs, output, settings, blocks)
    if any(is_zarr(p) for p in inputs):
        if len(inputs) != 1:
            raise VolinferError("Zarr runs take one .zarr input (several channels: one (c, z, y, x) array)")
        distributed = bool(blocks.scheduler or blocks.workers)
        route = zarr_route.decide(inputs[0], lambda: _handle(model, settings), settings, output, distributed)
        if route.way == "process":
            return _with_note(predict(list(inputs), model, output, settings), note)
        if route.way == "stream":
            rep = predict(list(inputs), route.handle, output, settings)
            return _with_note(_with_note(rep, zarr_route.STREAMED_NOTE if rep.engine == "stream" else None), note)
        if route.way == "bands":
            return _with_note(_zarr_in_bands(inputs[0], route.handle, Path(output), settings), note)
        return _with_note(run_zarr(inputs[0], model, output, settings, block=blocks.block or DEFAULT_BLOCK,
                                   scheduler=blocks.scheduler, workers=blocks.workers), note)
    if blocks.scheduler or blocks.workers:
        raise VolinferError("--scheduler/--workers run Zarr volumes (.zarr input and output)")
    batch = batch_inputs(inputs)
    rt = settings.runtime
    tm = TileModel(model, tile=settings.tiling.tile, layout=rt.layout, output=rt.model_output,
                   options=rt.compile_options(), compile=False)  # compiled at the planned tile
    if is_zarr_output(output) and batch is not None:
        raise VolinferError("batch runs write NIfTI files into a directory; give one volume for a .zarr output")
    if batch is None:
        return _with_note(predict(list(inputs), tm, output, settings), note)
    result = run_batch(batch, tm, output, settings, note=note, notify=notify)
    result.skipped = batch_skipped(inputs[0])
    return result


def refuse_unused_store_options(inputs: Sequence[Path], output: Path, settings: RunSettings,
                                blocks: BlockSettings) -> None:
    """The Zarr store options a run cannot use, refused in one line before any work rather than ignored: the output
    store's layout (``--chunks``, ``--no-compression``, ``--pyramid``) without a .zarr output, ``--block`` without a
    .zarr input (only Zarr inputs run block by block)."""
    o = settings.output
    if not is_zarr_output(output):
        for name, given in (("--chunks", o.chunks is not None), ("--no-compression", not o.compression),
                            ("--pyramid", bool(o.pyramid))):
            if given:
                raise VolinferError(f"{name} applies to Zarr outputs (-o out.zarr); {output} is not one")
    if blocks.block is not None and not any(is_zarr(p) for p in inputs):
        raise VolinferError("--block applies to Zarr inputs, which run block by block (a .zarr input)")


def _zarr_in_bands(volume: Path, handle: TileModel, output: Path, settings: RunSettings) -> RunReport:
    """A Zarr store into a Zarr output through a banded stream (:func:`volinfer.run.zarr_route.via_nifti`), the
    output chunked as asked, else as the input."""
    source, _ = open_zarr_source(volume)
    with source:
        chunks = chunk_shape(settings.output.chunks, source)
    return zarr_route.via_nifti(volume, output, settings, lambda tmp, s: predict([volume], handle, tmp, s), chunks)


def _with_note(report: RunReport, text: str | None) -> RunReport:
    if text and text not in report.notes:
        report.notes.append(text)
    return report


#: Volume formats volinfer reads that batch runs do not take (they write NIfTI files named as their inputs).
OTHER_VOLUMES = (".tif", ".tiff", ".mha", ".mhd", ".nrrd", ".nhdr", ".zarr")


def batch_skipped(pattern: Path) -> list[Path]:
    """The volumes of other formats a batch directory or glob holds, which the batch leaves out (said, not silent)."""
    import glob

    text = str(pattern)
    paths = Path(pattern).iterdir() if Path(pattern).is_dir() else (Path(p) for p in glob.glob(text))
    return sorted(p for p in paths if p.name.lower().endswith(OTHER_VOLUMES))


def batch_inputs(inputs: Sequence[Path]) -> list[Path] | None:
    """The volumes of a batch run (one directory or one glob pattern), or None for a single run."""
    import glob

    if len(inputs) != 1:
        return None
    text = str(inputs[0])
    if Path(inputs[0]).is_dir():
        found = sorted(p for p in Path(inputs[0]).iterdir()  # hidden files left out, as a glob leaves them:
                       if p.name.lower().endswith((".nii", ".nii.gz")) and not p.name.startswith("."))  # macOS ._x
    elif any(ch in text for ch in "*?["):
        found = sorted(Path(p) for p in glob.glob(text) if p.lower().endswith((".nii", ".nii.gz")))
    else:
        return None
    if not found:
        raise VolinferError(f"{text}: no .nii or .nii.gz files found")
    return found


def run_batch(batch: list[Path], tm: TileModel, output: Path, settings: RunSettings, *, note: str | None = None,
              notify: Any = None) -> BatchResult:
    """Run every volume of a batch into ``output``/<name>, the model compiled once; failures are collected (the
    error's own text, without repeating the path) and do not stop the others. Two inputs with one file name are
    refused before any work. With ``resume``, a volume is skipped only when the batch record says this model made its
    output from this input with these settings (:mod:`volinfer.io.batch_record`). ``notify`` (if given) receives
    one line per volume."""
    from dataclasses import replace

    if output.exists() and not output.is_dir():
        raise VolinferError(f"{output}: batch output must be a directory")
    if not output.exists() and output.name.lower().endswith((".nii", ".nii.gz")):
        raise VolinferError(f"{output}: a batch ({len(batch)} volumes) writes into a directory, not one NIfTI file; "
                            f"give a directory name")
    check_unique(batch, output)
    output.mkdir(parents=True, exist_ok=True)
    say = notify or (lambda text: None)
    result = BatchResult(output, len(batch), [], [])
    record = BatchRecord(output, tm.path, settings)
    for n, path in enumerate(batch, 1):
        target = output / path.name
        interrupted = journal_path(target).exists()
        if settings.resume and not interrupted and target.exists():
            why = record.finished(path, target)
            if why is None:
                say(f"[{n}/{len(batch)}] {path}: already written with these settings, skipped")
                continue  # finished by the interrupted batch
            say(f"[{n}/{len(batch)}] {path}: {target.name} exists but is not skipped: {why}")
        else:
            say(f"[{n}/{len(batch)}] {path}")
        try:
            one = replace(settings, resume=settings.resume and interrupted)
            result.reports.append(_with_note(predict([path], tm, target, one), note))
            record.mark(path, target)
        except Interrupted as e:
            raise Interrupted(f"batch stopped at {path} ({e}); run the same command with --resume to skip the "
                              f"finished volumes and continue") from None
        except KeyboardInterrupt:
            raise Interrupted(f"batch stopped at {path}; run the same command with --resume to skip the finished "
                              f"volumes and continue") from None
        except VolinferError as e:
            result.failed.append((path, strip_path(str(e), path)))
            say(f"  failed: {result.failed[-1][1]}")
    return result
