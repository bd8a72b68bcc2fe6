"""The model's grid: a volume brought to the orientation and voxel size the model stores, run there, and the output
mapped back onto the volume's own grid, so that it always overlays the input.

``volinfer convert --orientation RAS --spacing 1,1,1`` stores what the model expects (``ModelSettings.orientation``
and ``.spacing``). A run then, before anything else (:func:`plan_model_grid`):

1. **reorients** the volume to the model's orientation by axis permutations and flips only (exact; from the input's
   affine), :func:`volinfer.io.regrid.reorient_into`;
2. **resamples** it to the model's voxel size (linear, streamed plane by plane in bounded memory;
   :func:`volinfer.io.regrid.resample_into`) unless ``--no-resample``;
3. runs the model on that grid as any run (tiles or stream, exactness verdict included), into a temporary file;
4. maps the output back: resampled to the volume's voxel size (linear for probabilities and raw outputs; labels are
   taken from the probabilities resampled so, as nnU-Net does, where the caller asks: else nearest), then reoriented
   back (the inverse permutation and flips), and written to the output with the input's own header and affine.

The intermediate volumes are uncompressed NIfTI files in a temporary directory beside the output (removed at the
end, also on failure); memory stays bounded by the blocks each step holds (:mod:`volinfer.io.regrid`). Such runs are not resumable (``--resume``
is refused). Models that store neither run on the volume's own grid, as before, with a one-line note; so do arrays
given to the Python API (they carry no affine).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from volinfer.errors import Interrupted, VolinferError
from volinfer.io.journal import ResumableError
from volinfer.io.reader import VolumeSource
from volinfer.io.regrid import (AxisMap, Resampling, check_regrid_size, reorient_into, resample_into, slab_depth,
                                source_dtype, voxel_sizes)
from volinfer.io.sources import open_paths
from volinfer.io.writer import NiftiWriter

#: A resampling by more than this factor along an axis is said in a note (a unit said wrongly, most often).
FAR_RESAMPLING = 8.0


@dataclass
class ModelGrid:
    """What a run does to reach the model's grid: ``amap`` (reorientation, None: none), ``resampling`` (None:
    none), the target orientation, and the notes the summary gives either way."""

    amap: AxisMap | None = None
    target: str | None = None
    resampling: Resampling | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.amap is not None or self.resampling is not None


def plan_model_grid(source: VolumeSource | None, settings: Any, resample: bool) -> ModelGrid:
    """The steps for ``source`` (its header read; None for arrays) and a model's stored ``settings``."""
    orientation, spacing = getattr(settings, "orientation", None), getattr(settings, "spacing", None)
    grid = ModelGrid()
    if orientation is None and spacing is None:
        grid.notes.append("the model stores no orientation or spacing: the volume runs on its own grid (convert "
                          "with --orientation/--spacing to have runs reorient and resample)")
        return grid
    if source is None or source.affine is None:
        grid.notes.append("an array has no affine: the model's stored orientation/spacing are not applied")
        return grid
    affine, shape = in_mm(source), source.shape
    unit_known = affine is not None
    if affine is None:  # where the axes point does not depend on the unit
        affine = np.asarray(source.affine, float)
    if orientation is not None and not getattr(source, "orientation_known", True):
        grid.notes.append(f"the volume records no anatomical orientation (TIFF stack, or a Zarr array with only NGFF "
                          f"scales): taken as is, not reoriented to the model's {orientation}")
    elif orientation is not None:
        grid.amap, grid.target = AxisMap.between(affine, orientation), orientation
        if grid.amap is not None:
            affine, shape = grid.amap.affine(affine, shape), grid.amap.shape(shape)
    elif spacing is not None:
        grid.notes.append("the model stores no orientation: the volume is resampled along its own axes")
    if spacing is not None and not getattr(source, "spacing_known", True):
        grid.notes.append(f"the volume records no voxel size (none, or not along every axis): run at its own grid, "
                          f"not resampled to the model's {'x'.join(f'{v:g}' for v in spacing)} mm")
    elif spacing is not None and not unit_known and resample:
        raise VolinferError("the volume's spatial unit is not a length volinfer knows, so it cannot be resampled to "
                            f"the model's {'x'.join(f'{v:g}' for v in spacing)} mm (pass --no-resample to run it at "
                            "its own voxel size)")
    elif spacing is not None:
        found = Resampling.between(shape, affine, spacing)
        if found is not None and not resample:
            grid.notes.append(f"--no-resample: the volume runs at its own voxel size "
                              f"({'x'.join(f'{v:g}' for v in voxel_sizes(affine))} mm; the model expects "
                              f"{'x'.join(f'{v:g}' for v in spacing)} mm)")
        elif found is not None and unit_known:
            grid.resampling = found
            far = max(found.ratio, key=lambda r: max(r, 1 / r))
            factor = max(far, 1 / far)
            if factor > FAR_RESAMPLING:  # most often a unit said wrongly (micrometres said as mm)
                larger = "larger" if far > 1 else "smaller"
                grid.notes.append(f"the model's voxels are {factor:.0f}x {larger} than the volume's along "
                                  f"an axis: check both units (`volinfer info` shows the model's; --no-resample runs "
                                  f"the volume at its own voxel size)")
    return grid


def in_mm(source: VolumeSource) -> np.ndarray | None:
    """The source's affine in millimetres (its header's or store's unit: micrometres for most microscopy), which the
    model's stored spacing is in; None when the unit is no length volinfer knows."""
    mm = source.mm_per_unit
    if mm is None:
        return None
    affine = np.array(source.affine, float)
    affine[:3, :] *= mm
    return affine


Writer = Callable[[VolumeSource, int, np.dtype], "tuple[Any, np.dtype]"]


def run_on_model_grid(grid: ModelGrid, paths: list[Path], run: Callable[[Path, Path], Any], make_writer: Writer, *,
                      resume: bool, kind: str, near: Path | None, back: str | None = None) -> tuple[Any, Any]:
    """Steps 1–4 of the module docs for the input files ``paths``: ``run(input, output)`` runs the model from one
    NIfTI file into another and returns its report; ``make_writer(source, channels, dtype)`` opens the final
    output for the input's grid and says the type it stores. ``back``: how the output is mapped back, for the
    report (default: from ``kind``). Returns (the writer's commit/result, the report with what was done)."""
    if resume:
        raise VolinferError("--resume is not available when the volume is reoriented or resampled to the model's "
                            "grid (run the command again without it)")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".volinfer-grid-", dir=str(near) if near is not None else None))
    try:
        with open_paths(paths, 1) as head:
            shape = head.shape
        with open_paths(paths, slab_depth(shape)) as source:
            model_input = _to_model_grid(grid, source, work)
            report = run(model_input, work / "model_output.nii")
            result = _back_to_input(grid, source, work, kind, make_writer)
    except ResumableError as e:  # nothing of such a run is kept to resume: say so, not "--resume"
        raise VolinferError(f"{str(e).split('; ')[0]}; runs through the model's grid are not resumable: fix that "
                            f"and run the command again") from None
    except (Interrupted, KeyboardInterrupt):
        raise Interrupted("runs through the model's grid are not resumable: run the command again"
                          ) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.notes.extend(n for n in grid.notes if n not in report.notes)  # (the inner run may have said it)
    steps = [s for s in (grid.amap.describe(source.affine, grid.target or "") if grid.amap else None,
                         grid.resampling.describe() if grid.resampling else None) if s]
    report.extra["model grid"] = "; ".join(steps) + f"; output mapped back onto the input's " \
        f"{'x'.join(map(str, source.shape))} grid ({back or ('nearest' if kind == 'labels' else 'linear')})"
    report.wall_s = time.perf_counter() - t0
    return result, report


def _to_model_grid(grid: ModelGrid, source: VolumeSource, work: Path) -> Path:
    """Steps 1 and 2: the model's input as an uncompressed NIfTI file in ``work``."""
    current, opened = source, None
    try:
        if grid.amap is not None:
            amap, path = grid.amap, work / "oriented_input.nii"
            dtype = source_dtype(source)
            writer = NiftiWriter(path, amap.shape(source.shape), source.channels, dtype,
                                 affine=amap.affine(_world(source), source.shape))
            _fill(writer, lambda: reorient_into(source, amap, writer, dtype))
            if grid.resampling is None:
                return path
            current = opened = open_paths([path], slab_depth(amap.shape(source.shape)))
        r = grid.resampling
        assert r is not None
        check_regrid_size(r.out_shape, current.channels, np.dtype(np.float32), str(source.paths[0]))
        target = work / "model_input.nii"
        writer = NiftiWriter(target, r.out_shape, current.channels, np.dtype(np.float32),
                             affine=r.affine(_world(current)))
        _fill(writer, lambda: resample_into(current, r.out_shape, r.ratio, "linear", writer, np.dtype(np.float32)))
        return target
    finally:
        if opened is not None:
            opened.close()


def _world(source: VolumeSource) -> np.ndarray:
    """The affine the model's grid files are written with: in millimetres where the unit is known (the NIfTI files
    between the steps say mm, so the run on them needs no second resampling), else as stored."""
    mm = in_mm(source)
    return np.asarray(source.affine, float) if mm is None else mm


def _fill(writer: Any, body: Callable[[], None]) -> Any:
    """Run ``body`` (which writes every block into ``writer``), then commit; abort on failure."""
    try:
        body()
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def _back_to_input(grid: ModelGrid, source: VolumeSource, work: Path, kind: str, make_writer: Writer) -> Any:
    """Step 4: the model's output (``work/model_output.nii``) onto the input's grid, into the final writer."""
    mode = "nearest" if kind == "labels" else "linear"
    opened: list[VolumeSource] = []
    try:
        current = _open(work / "model_output.nii", opened)
        dtype = source_dtype(current)
        if grid.resampling is not None:
            oriented = grid.amap.shape(source.shape) if grid.amap is not None else source.shape
            ratio = tuple(1.0 / r for r in grid.resampling.ratio)
            if grid.amap is None:
                writer, final_dtype = make_writer(source, current.channels, dtype)
                return _fill(writer, lambda: resample_into(current, oriented, ratio, mode, writer, final_dtype))
            back = NiftiWriter(work / "oriented_output.nii", oriented, current.channels, dtype)
            _fill(back, lambda: resample_into(current, oriented, ratio, mode, back, dtype))
            current = _open(work / "oriented_output.nii", opened)
        assert grid.amap is not None
        inverse, final = grid.amap.inverse(), current
        writer, final_dtype = make_writer(source, final.channels, dtype)
        return _fill(writer, lambda: reorient_into(final, inverse, writer, final_dtype))
    finally:
        for s in opened:
            s.close()


def _open(path: Path, opened: list[VolumeSource]) -> VolumeSource:
    """An intermediate file, opened for the grid steps' reads (and remembered in ``opened`` to be closed)."""
    with open_paths([path], 1) as head:
        shape = head.shape
    source = open_paths([path], slab_depth(shape))
    opened.append(source)
    return source


def settings_for_model_grid(settings: Any) -> Any:
    """The run settings of the model-grid run itself: a fresh temporary NIfTI output (float32 probabilities: NIfTI
    has no float16; the final output gets the type asked for), never resumed."""
    return replace(settings, resume=False, overwrite=True,
                   output=replace(settings.output, prob_dtype="float32", pyramid=0))
