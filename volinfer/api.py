"""Python API: :func:`predict` runs a volume (file(s) or array) through a model, tile by tile."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .engine import RunReport, peak_rss_mb, run_tiles
from . import validate
from .errors import Interrupted, VolinferError
from .journal import Journal, ResumableError, content_bytes_hash, file_identity, model_identity
from .model import CompileOptions, TileModel
from .reader import VolumeSource
from .norm_stats import fit_norm_statistics
from .feeder import TileFeeder
from .runsetup import TilingChoice, RunSetup, needs_norm_passes, plan_tiling, resolve, scan_volume, verdict
from .targets import OutputLock
from .writer import ArrayWriter, NiftiWriter
from .zarr_writer import ZarrWriter, check_any_output, is_zarr_output

Overlap = float | int | str | Sequence[float | int] | None


def _row_done(writer: Any, journal: Journal, row: int, rows: int) -> None:
    """Rows ``< row`` are final: make their data durable first, only then let the journal say so (a Zarr output
    may claim fewer rows: those whose planes are all in the store)."""
    writer.sync()
    journal.update(writer.durable_row(row) if isinstance(writer, ZarrWriter) else row, rows)


def run_fingerprint(in_paths: Sequence[Path], model_path: Path | None, options: dict[str, Any],
                    setup: RunSetup | None = None, header: Any = None) -> dict[str, Any]:
    """What makes a run's output what it is: inputs and model by content, and every setting that changes it. With
    ``setup`` carrying the pre-pass's voxel digests, the inputs are those digests plus the header (no extra pass);
    otherwise each input file or store is hashed here."""
    if setup is not None and setup.digests is not None:
        head = getattr(header, "binaryblock", None)
        inputs: Any = {"voxels": setup.digests,
                       "header": content_bytes_hash(bytes(head)) if head is not None else None}
    else:
        inputs = [file_identity(p) for p in in_paths]
    return {"volinfer": __version__, "inputs": inputs,
            "model": model_identity(model_path) if model_path else None, "options": options}


def _discard(writer: Any, journal: Journal | None) -> None:
    """Remove what this run wrote (temporary file, journal). Nothing when no writer was made yet: a journal there
    belongs to an earlier interrupted run and must survive a refused or interrupted resume."""
    if isinstance(writer, (NiftiWriter, ZarrWriter)):
        writer.abort()
        if journal is not None:
            journal.remove()


def open_source(volume: Any, depth: int, channel_axis: int | None = None) -> VolumeSource:
    if isinstance(volume, VolumeSource):
        return volume
    if isinstance(volume, np.ndarray):
        return VolumeSource.from_array(volume, channel_axis)
    paths = [volume] if isinstance(volume, (str, os.PathLike)) else list(volume)
    if not paths:
        raise VolinferError("no input volume given")
    return VolumeSource.open(paths, depth)


def predict(
    volume: Any,
    model: str | os.PathLike | TileModel,
    output: str | os.PathLike | None = None,
    *,
    tile: int | Sequence[int] | None = None,
    layout: str | None = None,
    overlap: Overlap = None,
    stitch: str | None = None,
    sigma: float = 0.125,
    pad_mode: str = "constant",
    kind: str = "labels",
    activation: str | None = None,
    channels: Sequence[int] | None = None,
    threshold: float = 0.5,
    prob_dtype: str = "float32",
    normalize: dict[str, Any] | None = None,
    model_output: str | int | None = None,
    device: str = "CPU",
    precision: str = "auto",
    threads: int | None = None,
    streams: int | None = None,
    cache_dir: str | None = None,
    requests: int = 2,
    channel_axis: int | None = None,
    nan_value: float | None = None,
    reuse_constant: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    report: bool = False,
    max_memory_mb: float | None = None,
    norm_stats: str | None = None,
    mirror: str | Sequence[int] | None = None,
    zarr_output: dict[str, Any] | None = None,
) -> Any:
    """Run ``volume`` through ``model`` tile by tile.

    ``volume``: a NIfTI path, a list of paths (one per input channel), or a numpy array (x, y, z) — with
    ``channel_axis`` for 4-D arrays. ``model``: an ``.xml``/``.onnx`` path or a :class:`TileModel`.
    With ``output`` (``.nii`` / ``.nii.gz``) the result is streamed to disk and a :class:`RunReport` is returned;
    without, the result array is returned ((x, y, z) or (x, y, z, c)), or ``(array, report)`` when ``report=True``.
    Options default to the settings stored in the model (tile, overlap, stitching, activation, normalisation).
    Volumes with NaN/Inf voxels are refused unless ``nan_value`` says what to replace them with. File outputs are
    journaled per z-row of tiles: after an interruption, ``resume=True`` continues where the run stopped and writes
    the same bytes an uninterrupted run would.

    Unless ``tile`` is given (or ``model`` is a :class:`TileModel` built with a tile), the tile is planned for
    fidelity first: crop margins that cover the model's receptive field, growing the tile up to the whole padded
    volume within ``max_memory_mb`` (default: a quarter of available RAM). InstanceNorm/GroupNorm layers run with
    whole-volume statistics (``norm_stats="volume"``, found in streamed passes) or per tile (``"tile"``). The report
    says whether the run was ``exact`` and, if not, why.

    An ``output`` ending in ``.zarr`` is written as OME-Zarr (:class:`volinfer.zarr_writer.ZarrWriter`) with the
    input's affine; ``zarr_output`` sets its ``chunks``, ``compression`` and ``pyramid`` levels.
    """
    t_start = time.perf_counter()
    mirror_axes = parse_mirror(mirror)
    requests = validate.count("requests", requests)
    if tile is not None:
        validate.tile(tile if isinstance(tile, str) else ",".join(str(t) for t in np.atleast_1d(tile)))
    in_paths = [] if isinstance(volume, (np.ndarray, VolumeSource)) else (
        [Path(volume)] if isinstance(volume, (str, os.PathLike)) else [Path(p) for p in volume])
    lock = None
    if output is not None:
        check_any_output(Path(output), in_paths, overwrite, resume)
        lock = OutputLock(Path(output)).acquire()  # before anything is written: a second run fails here, at once
    journal: Journal | None = None
    try:
        handle = model if isinstance(model, TileModel) else TileModel(
            model, tile=tile, layout=layout, output=model_output, compile=False,
            options=CompileOptions(device=device, precision=precision, threads=threads, streams=streams,
                                   cache_dir=cache_dir))
        shape, n_channels = _volume_shape(volume, channel_axis)
        if n_channels != handle.in_channels:
            raise VolinferError(f"the volume has {n_channels} channel(s) but the model expects {handle.in_channels} "
                                f"(give one 3-D file per channel, or one 4-D file)")
        choice = plan_tiling(handle, shape, stitch=stitch, overlap=overlap, max_memory_mb=max_memory_mb,
                             norm_stats=norm_stats)
        tm = handle.at(choice.tile)
        if overlap is None and choice.overlap is None:
            overlap = _overlap_for(choice, tm)
        source = open_source(volume, tm.tile[2], channel_axis)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    writer: Any = None
    try:
        setup = resolve(tm, source.shape, source.channels, stitch=stitch,
                        overlap=overlap if choice.overlap is None else list(choice.overlap), kind=kind,
                        activation=activation, keep=channels, threshold=threshold, prob_dtype=prob_dtype,
                        normalize=normalize)
        scan_volume(setup, tm, source, nan_value, fingerprint=output is not None and bool(in_paths))
        tm, passes = _freeze_norm_statistics(tm, choice, setup, source, pad_mode, progress)
        fidelity = verdict(setup, choice, frozen=passes > 0)
        stitch, activation, spec, ov_vox, grid = setup.stitch, setup.activation, setup.spec, setup.overlap, setup.grid
        normalizer, nonfinite = setup.normalizer, setup.nonfinite
        start_row, on_row_done = 0, None
        if output is not None:
            if resume and (tm.path is None or not in_paths):
                raise VolinferError("resume needs the model and the volume given as files")
            journal = Journal(Path(output), run_fingerprint(in_paths, tm.path, setup=setup, header=source.header,
                                                            options=dict(
                tile=tm.tile, layout=tm.layout, output=tm.output_index, overlap=ov_vox, stitch=stitch, sigma=sigma,
                pad_mode=pad_mode, kind=kind, activation=activation, channels=spec.channels, threshold=threshold,
                dtype=str(spec.dtype), normalization=normalizer.describe(), nan_value=nan_value,
                device=tm.options.device, precision=tm.precision, reuse_constant=reuse_constant,
                norm_stats=choice.norm_stats, norm_passes=passes, mirror=mirror_axes,
                **_zarr_settings(output, zarr_output))))
            if resume:
                start_row = journal.resume_row()
            if is_zarr_output(output):
                writer = _zarr_writer(output, source, spec, grid, kind, zarr_output, overwrite, resume, start_row)
            else:
                writer = NiftiWriter(output, source.shape, spec.out_channels, spec.dtype, source.header,
                                     source.affine, resume=resume)
            rows = grid.axes[2].count
            on_row_done = lambda r: _row_done(writer, journal, r, rows)  # noqa: E731
            journal.update(start_row, rows)
        else:
            writer = ArrayWriter(source.shape, spec.out_channels, spec.dtype)
        busy = n = reused = 0
        if output is None or start_row < grid.axes[2].count:  # a resumed run may only lack the final compression
            busy, n, reused = run_tiles(source, tm, spec, writer, grid=grid, stitch=stitch, normalizer=normalizer,
                                        sigma=sigma, pad_mode=pad_mode, requests=requests, progress=progress,
                                        reuse_constant=reuse_constant, nan_fill=setup.nan_fill, start_row=start_row,
                                        on_row_done=on_row_done, mirror=mirror_axes)
        if output is not None:
            _row_done(writer, journal, rows, rows)  # every row final: a failure while compressing stays resumable
        result = writer.commit() if output is not None else writer.result()
        if output is not None:
            journal.remove()
    except (KeyboardInterrupt, ResumableError) as e:
        if isinstance(writer, (NiftiWriter, ZarrWriter)) and journal is not None and journal.exists():
            writer.close_for_resume()
            if isinstance(e, ResumableError):
                raise
            raise Interrupted(f"partial output kept beside {output}; run the same command with --resume to "
                              f"continue") from None
        _discard(writer, journal)
        raise
    except BaseException:
        _discard(writer, journal)
        raise
    finally:
        source.close()
        if lock is not None:
            lock.release()
    rep = RunReport(
        shape=source.shape, channels=source.channels, tile=tm.tile,
        grid=tuple(a.count for a in grid.axes), tiles=n, stitch=stitch, overlap=ov_vox, layout=tm.layout,  # type: ignore[arg-type]
        device=tm.options.device, precision=tm.precision, requests=requests,
        normalization=normalizer.describe(), output_kind=kind, output_dtype=str(spec.dtype),
        wall_s=time.perf_counter() - t_start, infer_busy_s=busy, peak_rss_mb=peak_rss_mb(),
        output=str(result) if output is not None else None, exact=fidelity.exact, not_exact=fidelity.reasons,
        input_passes=setup.input_passes + passes,
    )
    for note in choice.notes + setup.notes:
        rep.notes.append(note)
    if tm.options.precision == "auto":
        rep.notes.append(f"precision {tm.precision}: {tm.precision_reason}")
    if mirror_axes:
        rep.notes.append(f"test-time mirroring over {''.join('xyz'[a] for a in mirror_axes)}: "
                         f"{2 ** len(mirror_axes)} inferences per tile")
    if passes:
        rep.notes.append(f"{len(choice.norm_layers)} normalisation layer(s) frozen to whole-volume statistics in "
                         f"{passes} streamed pass(es) of the model")
    rep.notes.append(f"{setup.input_passes + passes} pass(es) over the input before the tiles "
                     f"({setup.input_passes} pre-pass: NaN/Inf, value range, statistics, fingerprint as needed"
                     f"{f'; {passes} normalisation-statistics' if passes else ''})")
    if reused:
        rep.extra["constant"] = f"{reused} of {n} tiles were constant and reused one cached inference"
    if nonfinite:
        rep.extra["nan/inf"] = f"{nonfinite} voxel(s) replaced by {nan_value}"
    if output is not None:
        return rep
    return (result, rep) if report else result


def parse_mirror(value: str | Sequence[int] | None) -> tuple[int, ...]:
    """``"xyz"`` / ``"xz"`` / ``[0, 2]`` → sorted volume axes to mirror over; empty for none."""
    if value is None or value == "" or value == "none":
        return ()
    if isinstance(value, str):
        bad = set(value.lower()) - set("xyz")
        if bad or len(set(value.lower())) != len(value):
            raise VolinferError(f"--mirror takes a subset of the axes x, y, z (e.g. xyz or xz); got {value!r}")
        return tuple(sorted("xyz".index(c) for c in value.lower()))
    axes = tuple(sorted(set(int(a) for a in value)))
    if any(a not in (0, 1, 2) for a in axes):
        raise VolinferError(f"mirror axes must be 0, 1, 2 (x, y, z); got {value!r}")
    return axes


def _zarr_settings(output: Any, zarr_output: dict[str, Any] | None) -> dict[str, Any]:
    """What a Zarr output adds to the run fingerprint (nothing for NIfTI outputs)."""
    if not is_zarr_output(output):
        return {}
    z = {"chunks": 64, "compression": True, "pyramid": 0, **(zarr_output or {})}
    return {"zarr": {k: z[k] for k in ("chunks", "compression", "pyramid")}}


def _zarr_writer(output: Any, source: VolumeSource, spec: Any, grid: Any, kind: str, zarr_output: Any,
                 overwrite: bool, resume: bool, start_row: int) -> "ZarrWriter":
    from .ome import geometry_from_nifti
    from .zarr_writer import row_planes

    z = _zarr_settings(output, zarr_output)["zarr"]
    return ZarrWriter(output, source.shape, spec.out_channels, spec.dtype,
                      geometry_from_nifti(source.header, source.affine), row_planes=row_planes(grid), kind=kind,
                      chunks=z["chunks"], pyramid=z["pyramid"], compression=z["compression"], overwrite=overwrite,
                      resume=resume, start_row=start_row)


def _overlap_for(choice: TilingChoice, tm: TileModel) -> list[float] | None:
    """With a fixed tile and no overlap asked for: twice the receptive field (crop margins that cover it) when it
    fits in the tile, else None (the stored or default overlap)."""
    rf = choice.rf
    if rf is None or not rf.measured or not rf.bounded or tm.settings.overlap is not None:
        return None
    if all(2 * r + tm.multiple <= t for r, t in zip(rf.radius, tm.tile)):
        return [float(2 * r) for r in rf.radius]
    return None


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
    from .norm_stats import waves

    feeder = TileFeeder(source, setup.grid, setup.normalizer, pad_mode, 0.0, setup.nan_fill)
    frozen = fit_norm_statistics(tm, feeder, setup.grid, choice.norm_layers, progress=progress)
    return tm.at(tm.tile, model=frozen), len(waves(tm.model, choice.norm_layers))
