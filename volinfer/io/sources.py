"""Which reader opens an input: picked by the path, every one yielding a :class:`volinfer.io.reader.VolumeSource`
in ``(x, y, z)`` order with its affine.

``.nii``/``.nii.gz`` → :mod:`volinfer.io.reader` (nibabel headers, own lazy readers); ``.tif``/``.tiff`` →
:mod:`volinfer.io.tiff_io` (tifffile); ``.mha``/``.mhd``/``.nrrd``/``.nhdr`` → :mod:`volinfer.io.itk_io` (SimpleITK);
``.zarr`` → :mod:`volinfer.io.zarr_io`. Several paths are the channels of one volume and must share a format.
DICOM series are not read: convert them with ``dcm2niix`` first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from volinfer.errors import VolinferError
from volinfer.io.formats import input_format, is_itk
from volinfer.io.itk_io import data_files, open_itk_source
from volinfer.io.reader import VolumeSource
from volinfer.io.tiff_io import open_tiff_source
from volinfer.io.zarr_io import open_zarr_source

def open_paths(paths: Sequence[str | os.PathLike], depth: int) -> VolumeSource:
    """Open one volume given as one file (or store) per channel, or one multi-channel file; ``depth`` is the
    deepest z-range one read spans (the tile's z size)."""
    kinds = {input_format(p) for p in paths}
    if len(kinds) > 1:
        raise VolinferError(f"the channel files mix formats ({', '.join(sorted(kinds))}); give them in one format")
    kind = kinds.pop()
    if kind == "zarr":
        if len(paths) != 1:
            raise VolinferError("Zarr volumes take one .zarr input (several channels: one (c, z, y, x) array)")
        return open_zarr_source(paths[0])[0]
    if kind == "tiff":
        return open_tiff_source(paths, depth)
    if kind == "itk":
        return open_itk_source(paths, depth)
    return VolumeSource.open(paths, depth)


def input_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Every file an input consists of (the paths, plus the data files ``.mhd``/``.nhdr`` headers name): what
    output checks compare against."""
    out = [Path(p) for p in paths]
    return out + [d for p in out if is_itk(p) for d in data_files(p)]
