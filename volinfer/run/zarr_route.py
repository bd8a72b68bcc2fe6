"""Where ``volinfer run`` takes a Zarr store: block by block, tiles only (:func:`volinfer.run.distributed.run_zarr`, in
this process or on a Dask cluster), or in this process like a NIfTI file (:func:`volinfer.predict`: the layer stream,
the model's grid). One decision, made for the run and for ``volinfer plan`` alike.

Blocks cannot stream layers, and a network that sees far tiles exactly only with wide margins: the reference U-Net
(receptive field 107) at 512³ plans 486 tiles, about 20 minutes, where the stream takes seconds. So a local run with
``--engine auto`` takes the store in this process whenever the planner, weighing every engine, streams it; a Dask run
(``--scheduler``/``--workers``) and ``--engine tiles`` keep the blocks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from volinfer.errors import VolinferError
from volinfer.io.formats import is_zarr_output
from volinfer.io.reader import stored_as
from volinfer.io.zarr_io import open_zarr_source
from volinfer.model.tile_model import TileModel
from volinfer.run import pipeline
from volinfer.run.model_grid import plan_model_grid
from volinfer.run.settings import RunSettings

#: The report's note when a Zarr store streams in this process rather than running block by block.
STREAMED_NOTE = ("the Zarr store ran in this process, layer by layer: the planner's choice, which block-by-block runs "
                 "cannot stream (--engine tiles runs it block by block)")


def needs_model_grid(path: str | Path, handle: TileModel, s: RunSettings) -> bool:
    """Whether the store must be brought to the model's stored orientation/spacing (then it runs in this process)."""
    settings = handle.settings
    if getattr(settings, "orientation", None) is None and getattr(settings, "spacing", None) is None:
        return False
    source, _ = open_zarr_source(path)
    with source:
        return plan_model_grid(source, settings, s.input.resample).active


def streams(path: str | Path, handle: TileModel, s: RunSettings, output: Any = None) -> bool:
    """Whether a local ``--engine auto`` run takes the store in this process: the run's own plan for it
    (:func:`volinfer.run.pipeline.plan`, stored voxels and chunk depth as the stream reads them) streams.
    ``handle``: the model as the run opens it (not compiled); ``output``: the run's (a Zarr output keeps whole
    cross-sections)."""
    if s.tiling.engine != "auto":
        return False
    source, _ = open_zarr_source(path)
    with source:
        shape, stored, depth = tuple(source.shape), stored_as(source.readers), source.stored_depth
    try:
        planned = pipeline.plan(handle, shape, s, banded=output is None or not is_zarr_output(output), stored=stored,
                                stored_depth=depth)
    except VolinferError:  # nothing fits: the block run says so in its own words
        return False
    return planned.choice.stream is not None
