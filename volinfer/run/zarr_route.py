"""Where ``volinfer run`` takes a Zarr store: block by block, tiles only (:func:`volinfer.run.distributed.run_zarr`, in
this process or on a Dask cluster), or in this process like a NIfTI file (:func:`volinfer.predict`: the layer stream,
the model's grid). One decision, made for the run and for ``volinfer plan`` alike.

Blocks cannot stream layers, and a network that sees far tiles exactly only with wide margins: the reference U-Net
(receptive field 107) at 512³ plans 486 tiles, about 20 minutes, where the stream takes seconds. So a local run with
``--engine auto`` takes the store in this process whenever the planner, weighing every engine, streams it; a Dask run
(``--scheduler``/``--workers``) and ``--engine tiles`` keep the blocks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from volinfer.errors import VolinferError
from volinfer.io.formats import is_tiff_output, is_zarr_output
from volinfer.io.targets import aux_path
from volinfer.io.zarr_convert import nifti_to_zarr
from volinfer.io.reader import stored_as
from volinfer.io.zarr_io import check_zarr_output, open_zarr_source
from volinfer.model.tile_model import TileModel
from volinfer.run import pipeline
from volinfer.run.model_grid import plan_model_grid
from volinfer.run.distributed import run_journal
from volinfer.run.settings import RunSettings
from volinfer.run.setup import storing_receptive_field

#: The report's note when a Zarr store streams in this process rather than running block by block.
STREAMED_NOTE = ("the Zarr store ran in this process, layer by layer: the planner's choice, which block-by-block runs "
                 "cannot stream (--engine tiles runs it block by block)")


@dataclass(frozen=True)
class Route:
    """Where a ``volinfer run`` takes a Zarr store (:func:`decide`). ``way``: ``"process"`` (in this process like a
    NIfTI file, with the model as given: ``--engine stream``, the model's grid, a TIFF output), ``"stream"`` (in this
    process as the planner streams it), ``"bands"`` (streamed in bands into a temporary NIfTI file, then written to
    the store: :func:`via_nifti`) or ``"blocks"`` (:func:`volinfer.run.distributed.run_zarr`). ``handle``: the model
    to run with for ``"stream"`` and ``"bands"`` (it stores the receptive field the plan measured); None otherwise."""

    way: str
    handle: TileModel | None = None

    @property
    def in_process(self) -> bool:
        """Whether the store runs in this process (every way but blocks)."""
        return self.way != "blocks"


def decide(path: str | Path, handle: Callable[[], TileModel], s: RunSettings, output: Any = None,
           distributed: bool = False) -> Route:
    """The one order in which a run takes the Zarr store at ``path`` (:func:`volinfer.api.run_any` runs it,
    ``volinfer plan`` predicts it): ``--engine stream`` and the model's grid in this process (refused with
    ``distributed``: ``--scheduler``/``--workers``, which run blocks only), then blocks for a Dask run; a local run
    takes a TIFF output in this process, then the planner's stream (:func:`streams`), then bands
    (:func:`streams_in_bands`), else blocks. ``handle()``: the model as the run opens it (not compiled), opened only
    past ``--engine stream``; ``output``: the run's (None: planned as for a NIfTI output)."""
    if s.tiling.engine == "stream":  # layer streaming runs in this process, like a NIfTI input
        if distributed:
            raise VolinferError("--engine stream runs in this process; --scheduler/--workers run Zarr blocks "
                                "tile by tile (drop one of them)")
        return Route("process")
    model = handle()
    if needs_model_grid(path, model, s):
        if distributed:
            raise VolinferError("this model stores an orientation/spacing the volume must be reoriented or "
                                "resampled to, which runs in this process: drop --scheduler/--workers (or pass "
                                "--no-resample when only the spacing differs)")
        return Route("process")
    if distributed:
        return Route("blocks")
    if output is not None and is_tiff_output(output):  # blocks write Zarr or NIfTI
        return Route("process")
    streamer = streams(path, model, s, output)
    if streamer is not None:
        return Route("stream", streamer)
    banded = streams_in_bands(path, model, s, output)
    return Route("blocks") if banded is None else Route("bands", banded)


def needs_model_grid(path: str | Path, handle: TileModel, s: RunSettings) -> bool:
    """Whether the store must be brought to the model's stored orientation/spacing (then it runs in this process)."""
    settings = handle.settings
    if getattr(settings, "orientation", None) is None and getattr(settings, "spacing", None) is None:
        return False
    source, _ = open_zarr_source(path)
    with source:
        return plan_model_grid(source, settings, s.input.resample).active


def streams(path: str | Path, handle: TileModel, s: RunSettings, output: Any = None) -> TileModel | None:
    """The model to run the store with in this process when a local ``--engine auto`` run takes it there: the run's
    own plan for it (:func:`volinfer.run.pipeline.plan`, stored voxels and chunk depth as the stream reads them)
    streams; that model stores the receptive field the plan measured (a model that stores none is probed once).
    None: block by block, also when ``--resume`` continues a block run's output. ``handle``: the model as the run
    opens it (not compiled); ``output``: the run's (a Zarr output keeps whole cross-sections). Planned in the
    precision the model asks for; the run's precision guard may still move it to f32 (then the run plans again)."""
    if s.tiling.engine != "auto":
        return None
    if s.resume and output is not None and is_zarr_output(output) and run_journal(output).exists():
        return None  # an output the blocks started: they finish it
    source, _ = open_zarr_source(path)
    with source:
        shape, stored, depth = tuple(source.shape), stored_as(source.readers), source.stored_depth
    try:
        planned = pipeline.plan(handle, shape, s, banded=output is None or not is_zarr_output(output), stored=stored,
                                stored_depth=depth)
    except VolinferError:  # nothing fits: the block run says so in its own words
        return None
    if planned.choice.stream is None:
        return None
    return storing_receptive_field(handle, planned.choice.rf)


def streams_in_bands(path: str | Path, handle: TileModel, s: RunSettings, output: Any) -> TileModel | None:
    """For a Zarr output the stream cannot fill over whole cross-sections within the budget (its writer keeps whole
    z-slabs, so it takes no bands of y rows), the model to stream the store in bands with (into a NIfTI file first,
    :func:`via_nifti`); None where that does not apply: an output that is no Zarr store, or one with a pyramid, or
    a ``--resume``; a NIfTI file of probabilities would hold float32 (a ``--kind labels`` run only)."""
    o = s.output
    if not is_zarr_output(output) or o.pyramid or s.resume or o.kind != "labels":
        return None
    return streams(path, handle, s, None)


def via_nifti(volume: Path, output: Path, s: RunSettings, run_into: Callable[[Path, RunSettings], Any],
              chunks: tuple[int, int, int]) -> Any:
    """Stream ``volume`` in bands into a temporary NIfTI file beside ``output`` (``run_into(path, settings)`` runs
    it and returns the report), then write the OME-Zarr store from it slab by slab: two passes of uint8 labels
    (1 GB at 1024³) instead of a whole-cross-section stream the budget cannot hold, or block tiles that recompute
    a far-seeing network's margins hundreds of times. Not resumable (the temporary file is removed on failure)."""
    check_zarr_output(output, [volume], s.overwrite, resume=False)  # before any work
    tmp = aux_path(output, ".banded.nii")
    try:
        rep = run_into(tmp, replace(s, overwrite=True, resume=False))
        t0 = time.perf_counter()
        nifti_to_zarr(tmp, output, chunks, overwrite=s.overwrite, progress=s.progress,
                      compression=s.output.compression)
    finally:
        tmp.unlink(missing_ok=True)
    converted = time.perf_counter() - t0
    rep.wall_s += converted
    rep.output = str(output)
    rep.notes.append(f"the Zarr store streamed in bands of y rows into a temporary NIfTI file, then written slab by "
                     f"slab ({converted:.1f} s): its whole cross-sections would not fit the budget")
    return rep
