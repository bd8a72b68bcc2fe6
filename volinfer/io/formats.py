"""What kind of volume a path names, from the path alone (no file is opened beyond a Zarr store's marker): the
one place input and output formats are told apart, so that a NIfTI run never touches the other formats' modules."""

from __future__ import annotations

import os
from pathlib import Path

#: TIFF stacks (:mod:`volinfer.io.tiff_io`).
TIFF_SUFFIXES = (".tif", ".tiff")
#: MetaImage and NRRD (:mod:`volinfer.io.itk_io`).
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")

#: File names every reader accepts, for messages and batch globs.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".tif", ".tiff", ".mha", ".mhd", ".nrrd", ".nhdr")


def is_zarr(path: str | os.PathLike) -> bool:
    """A Zarr store: named ``.zarr``, or a directory holding Zarr metadata."""
    p = str(path).rstrip("/")
    return p.endswith(".zarr") or (Path(p).is_dir() and ((Path(p) / "zarr.json").exists()
                                                         or (Path(p) / ".zarray").exists()))


def is_zarr_output(path: str | Path) -> bool:
    """An output path meant as a Zarr store (``.zarr``); everything else is a NIfTI file."""
    return str(path).rstrip("/").lower().endswith(".zarr")


def is_tiff(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(TIFF_SUFFIXES)


def is_itk(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(ITK_SUFFIXES)


def input_format(path: str | os.PathLike) -> str:
    """``zarr``, ``tiff``, ``itk`` or ``nifti`` (everything else goes to the NIfTI reader, which says what it is)."""
    if is_zarr(path):
        return "zarr"
    if is_tiff(path):
        return "tiff"
    return "itk" if is_itk(path) else "nifti"


def is_tiff_output(path: str | os.PathLike) -> bool:
    """An output path meant as a TIFF stack."""
    return is_tiff(Path(path))
