"""The run pipeline's shared steps, written once for every way of running (a file or array through
:func:`volinfer.api.predict`, Zarr blocks through :mod:`volinfer.run.distributed`, ``volinfer plan``): open the
volume, plan the tiling or the stream (:class:`RunPlan`), fingerprint what makes the output what it is, and write
an output under a resume journal that is kept on an interruption and removed on any other failure."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from volinfer.errors import Interrupted, VolinferError
from volinfer.io.journal import Journal, ResumableError, content_bytes_hash, file_identity, model_identity
from volinfer.io.reader import VolumeSource
from volinfer.io.sources import open_paths
from volinfer.model.tile_model import TileModel
from volinfer.run.own_size import unpadded_model
from volinfer.run.settings import RunSettings
from volinfer.run.setup import (RunSetup, TilingChoice, choose_stream, overlap_for, plan_tiling, tile_buffers,
                                with_run_multiple)
from volinfer.version import __version__


def open_source(volume: Any, depth: int, channel_axis: int | None = None) -> VolumeSource:
    """The volume as a :class:`VolumeSource` in ``(x, y, z)`` order with its affine: an array, or files of any
    format a reader in :mod:`volinfer.io` handles (picked by :func:`volinfer.io.sources.open_paths`)."""
    if isinstance(volume, VolumeSource):
        return volume
    if isinstance(volume, np.ndarray):
        return VolumeSource.from_array(volume, channel_axis)
    paths = [volume] if isinstance(volume, (str, os.PathLike)) else list(volume)
    if not paths:
        raise VolinferError("no input volume given")
    return open_paths(paths, depth)


#: Why a Zarr store run block by block pads a model that takes the volume's own size (its blocks are tiles).
BLOCKS_PAD = ("Zarr block runs tile the store at the size multiple: `volinfer to-nifti` and a NIfTI run take it as "
              "one tile at its own size")


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, decided before any model is compiled: the planner's choice (tiling, or the stream plan
    in ``choice.stream``), the model at the planned tile (not compiled), and the overlap the run resolves with."""

    model: TileModel
    choice: TilingChoice
    overlap: list[float] | None

    @property
    def stream(self) -> Any:
        """The :class:`volinfer.run.stream.StreamPlan` when the run streams layer by layer, else None."""
        return self.choice.stream


def plan(handle: TileModel, shape: Sequence[int], s: RunSettings, *, norm_stats: str | None = None,
         stream: bool = True, banded: bool = True, stored: tuple[int, str] | None = None,
         stored_depth: int = 1) -> RunPlan:
    """The run's plan for a volume of ``shape`` (x, y, z) with the model ``handle`` (read, in the precision the run
    will use): the planner's tiling, weighed against layer streaming unless ``stream`` is False (Zarr block runs),
    ``norm_stats`` overriding the settings' (block runs freeze no statistics yet). ``banded``: the output takes
    bands of y rows (not Zarr stores). ``stored``: the input's bytes a voxel and what its readers hold
    (:func:`volinfer.io.reader.read_buffer`), for the tiles engine's buffers the tilings are weighed with (None: the
    model alone, Zarr block runs). ``stored_depth``: planes the input's storage keeps together (a Zarr chunk's
    depth), which a stream reads that deep at a time."""
    t = s.tiling
    handle = with_run_multiple(handle)
    buffers = tile_buffers(handle, shape, s, stored) if stored is not None else None
    # a model that takes the volume's own size runs at it, one tile, when it fits (its padded runs are not exact);
    # not Zarr block runs (``stream`` False), whose blocks run on the store's grid
    own, padding = unpadded_model(handle, shape, s, buffers, "" if stream else BLOCKS_PAD)
    if own is not None:
        handle = own
    choice = plan_tiling(handle, shape, t, norm_stats=norm_stats, defer_refusal=stream and t.engine != "tiles",
                         buffers=buffers)
    choice.padding = padding
    if own is not None:
        choice.overlap = (0, 0, 0)  # one tile over the volume: no margins
    if stream:
        choose_stream(handle, shape, choice, s, banded=banded, stage=(stored_depth, stored[0] if stored else 4))
    if choice.refusal and choice.stream is None:  # no tile fits --max-memory, and the run does not stream in it
        raise VolinferError(choice.refusal)
    if choice.stream is not None:  # rows of output planes over bands of the padded cross-section
        sp = choice.stream
        choice.tile, choice.overlap = (sp.padded[0], sp.band, sp.out_planes), (0, 2 * sp.margin, 0)
    tm = handle.at(choice.tile, compile=False)
    if choice.overlap is not None:
        overlap = list(choice.overlap)
    elif t.overlap is None:
        overlap = overlap_for(choice, tm)
    else:
        overlap = t.overlap
    return RunPlan(tm, choice, overlap)


def fingerprint_options(s: RunSettings, tm: TileModel, setup: RunSetup, *, norm_stats: str, norm_passes: int,
                        engine: str, **extra: Any) -> dict[str, Any]:
    """Every setting that changes an output, as its resume journal records it (``extra``: what the way of running
    adds, e.g. a Zarr store's chunks and blocks)."""
    t, o = s.tiling, s.output
    return dict(
        tile=tm.tile, layout=tm.layout, output=tm.output_index, overlap=setup.overlap, stitch=setup.stitch,
        sigma=t.gaussian_sigma, pad_mode=t.pad_mode, kind=o.kind, activation=setup.activation,
        channels=setup.spec.channels, threshold=setup.spec.threshold, dtype=str(setup.spec.dtype),
        normalization=setup.normalizer.describe(),
        nan_value=s.input.nan_value, device=tm.options.device, precision=tm.precision,
        reuse_constant=t.reuse_constant, norm_stats=norm_stats, norm_passes=norm_passes, mirror=t.mirror,
        engine=engine, **extra)


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


class JournaledOutput:
    """The one way an output is written under a resume journal: used as ``with JournaledOutput(output) as out``,
    with ``out.writer`` / ``out.journal`` set once they are opened. Leaving with an interruption (Ctrl-C, SIGTERM)
    or a resumable error (a full disk) keeps the partial output and its journal for ``--resume``; any other
    failure removes what the run wrote (nothing when no writer was made yet: a journal there belongs to an earlier
    interrupted run and must survive a refused resume)."""

    def __init__(self, output: Path | None) -> None:
        self.output = output
        self.writer: Any = None
        self.journal: Journal | None = None

    def __enter__(self) -> "JournaledOutput":
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        if error is None:
            return False
        resumable = hasattr(self.writer, "close_for_resume") and self.journal is not None and self.journal.exists()
        if isinstance(error, (KeyboardInterrupt, ResumableError)) and resumable:
            self.writer.close_for_resume()
            if isinstance(error, KeyboardInterrupt):
                raise Interrupted(f"partial output kept beside {self.output}; run the same command with --resume to "
                                  f"continue") from None
            return False
        if hasattr(self.writer, "abort") and hasattr(self.writer, "close_for_resume"):  # a file output
            if self.journal is not None:  # first: a journal left beside a Zarr store at the output's name, by a
                self.journal.remove()  # crash in between, would make --resume take that store for an unfinished one
            self.writer.abort()
        return False
