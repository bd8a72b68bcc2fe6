"""OME-Zarr (NGFF 0.5) output: multiscale metadata, geometry ↔ NIfTI affine, and pyramid downsampling.

Every Zarr store volinfer writes (``run -o out.zarr``, ``to-zarr``) is an OME-Zarr *group*: arrays ``0`` (full
resolution), ``1``, ``2``, … (each half the previous along z, y, x) and, in the group's attributes, ``ome.multiscales``
with the axes and one ``scale`` + ``translation`` per level, so napari, Neuroglancer and the ``ome-zarr`` readers
place it in physical space. NGFF 0.5 is what the ``ome-zarr`` package (0.10 and later) reads and writes on Zarr v3.

Axis mapping. Zarr arrays are ``(z, y, x)`` (``(c, z, y, x)`` with channels): array index ``[k, j, i]`` is NIfTI
voxel ``(i, j, k)`` — the same bytes in the same order, NIfTI's ``x`` varying fastest. The NIfTI affine (voxel
``(i, j, k)`` → world) is kept whole under ``volinfer.affine``; the NGFF transform is its axis-aligned part:
``scale`` = the voxel size (length of each affine column) and ``translation`` = the affine's translation, both in
``(z, y, x)`` order. Rotations and flips live only in ``volinfer.affine``, which ``to-nifti`` and NIfTI outputs use,
so a NIfTI → Zarr → NIfTI round trip keeps the original affine exactly.

Pyramid levels: labels are downsampled by taking every second voxel (nearest; level ``l`` voxel ``k`` is level-0
voxel ``2**l * k``, same translation); intensities and probabilities by the mean of each 2×2×2 cell (fewer at odd
edges; the cell centre moves by half a level-0 voxel per halving, which the translation records).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from volinfer.errors import VolinferError

NGFF_VERSION = "0.5"
#: NIfTI space units (nibabel names) → NGFF unit names.
_UNITS = {"mm": "millimeter", "micron": "micrometer", "meter": "meter"}
#: NGFF space units (UDUNITS-2 names) in millimetres.
NGFF_MM = {"angstrom": 1e-7, "picometer": 1e-9, "nanometer": 1e-6, "micrometer": 1e-3, "millimeter": 1.0,
           "centimeter": 10.0, "decimeter": 100.0, "meter": 1e3, "inch": 25.4, "foot": 304.8}


@dataclass
class Geometry:
    """Where the voxels lie: a NIfTI-convention 4×4 affine (voxel ``(i, j, k)`` = Zarr ``[k, j, i]`` → world), the
    NGFF unit of the space axes (None when unknown), and the NIfTI header of a NIfTI-born volume (its raw bytes: the
    sform/qform codes, units and description that ``to-nifti`` restores)."""

    affine: np.ndarray
    unit: str | None = "millimeter"
    header: bytes | None = None
    oriented: bool = True  # the affine says where the axes point (volinfer's or a NIfTI-born store's affine)
    sized: bool = True  # the affine says how large the voxels are (NGFF scale, voxel_size or affine recorded)

    def nifti_header(self) -> Any:
        """A NIfTI header carrying this geometry for an output: the stored header (validated against the affine),
        else a fresh one with the affine (code 1, scanner) and the unit; None when there is nothing to say."""
        import nibabel as nib

        if self.header is not None:
            try:
                cls = nib.Nifti2Header if len(self.header) == 540 else nib.Nifti1Header
                hdr = cls(self.header)
                if np.allclose(hdr.get_best_affine(), self.affine, atol=1e-4):
                    return hdr
            except Exception:
                pass  # a damaged record: fall back to the affine
        hdr = nib.Nifti1Header()
        hdr.set_data_shape((1, 1, 1))  # three spatial dims, so the affine sets three zooms (outputs add channels)
        affine, space = np.asarray(self.affine, float), {v: k for k, v in _UNITS.items()}.get(self.unit or "")
        if space is None and self.unit in NGFF_MM:  # a length NIfTI has no code for (nanometres): in mm
            affine, space = affine.copy(), "mm"
            affine[:3, :] *= NGFF_MM[self.unit]
        hdr.set_qform(affine, code=1)
        hdr.set_sform(affine, code=1)
        hdr.set_xyzt_units(space or "unknown")
        return hdr

    @property
    def voxel_size_zyx(self) -> list[float]:
        cols = np.linalg.norm(np.asarray(self.affine, float)[:3, :3], axis=0)
        return [float(v) if v > 0 else 1.0 for v in cols[::-1]]

    @property
    def translation_zyx(self) -> list[float]:
        return [float(v) for v in np.asarray(self.affine, float)[:3, 3][::-1]]


def geometry_from_nifti(header: Any, affine: np.ndarray | None) -> Geometry:
    """The geometry of a NIfTI input (identity when it has none)."""
    unit: str | None = "millimeter"
    if header is not None:
        try:
            space = header.get_xyzt_units()[0]
            unit = _UNITS.get(space, "millimeter" if space == "unknown" else None)
        except Exception:
            pass
    block = getattr(header, "binaryblock", None)
    return Geometry(np.eye(4) if affine is None else np.asarray(affine, float), unit,
                    bytes(block) if block is not None else None)


def _multiscales(node_attrs: dict[str, Any]) -> list | None:
    return node_attrs.get("multiscales") or (node_attrs.get("ome") or {}).get("multiscales")


def read_geometry(root_attrs: dict[str, Any], array_attrs: dict[str, Any] | None = None) -> Geometry:
    """The geometry a Zarr store records, in order of trust: volinfer's affine, the level-0 NGFF scale and
    translation, the older ``voxel_size`` attribute, else identity."""
    array_attrs = array_attrs or {}
    for attrs in (root_attrs, array_attrs):
        vi = attrs.get("volinfer")
        aff = vi.get("affine") if isinstance(vi, dict) else None
        aff = aff if aff is not None else attrs.get("affine")
        if aff is not None:
            a = np.asarray(aff, float)
            if a.shape == (4, 4) and np.isfinite(a).all():
                return Geometry(a, _unit_of(root_attrs) or "millimeter", _header_of(vi))
    ms = _multiscales(root_attrs)
    if ms:
        geom = _geometry_from_ngff(ms[0])
        geom.oriented = False  # NGFF transforms are axis-aligned scales: no anatomical direction
        return geom
    vs = array_attrs.get("voxel_size") or root_attrs.get("voxel_size")
    if vs:
        return Geometry(np.diag([*[float(v) for v in vs[::-1]], 1.0]), oriented=False)
    return Geometry(np.eye(4), None, oriented=False, sized=False)  # nothing recorded: unit voxels, no unit claimed


def _header_of(vi: Any) -> bytes | None:
    """The NIfTI header volinfer kept in a store's attributes (base64), if any."""
    import base64

    text = vi.get("nifti_header") if isinstance(vi, dict) else None
    try:
        raw = base64.b64decode(text, validate=True) if isinstance(text, str) else None
    except ValueError:
        return None
    return raw if raw is not None and len(raw) in (348, 540) else None


def _unit_of(attrs: dict[str, Any]) -> str | None:
    ms = _multiscales(attrs)
    if not ms:
        return None
    space = [a for a in ms[0].get("axes", []) if isinstance(a, dict) and a.get("type") == "space"]
    x = next((a for a in space if str(a.get("name", "")).lower() == "x"), space[-1] if space else {})
    return x.get("unit")  # x's, as the NGFF scales' (see _common_unit)


def _geometry_from_ngff(ms: dict[str, Any]) -> Geometry:
    """Level 0's scale and translation (after any multiscale-wide transform) as a diagonal affine: the axes named
    ``x``, ``y``, ``z`` give its columns 0, 1, 2, whatever their order in the array (unnamed: the last three space
    axes, taken as ``z, y, x``)."""
    axes = ms.get("axes", [])
    names = [str(a.get("name", "") if isinstance(a, dict) else a).lower() for a in axes]
    space = [n for n, a in enumerate(axes) if (a.get("type") if isinstance(a, dict) else None) == "space"]
    scale = np.ones(len(axes))
    shift = np.zeros(len(axes))
    transforms = list(ms["datasets"][0].get("coordinateTransformations", [])) + \
        list(ms.get("coordinateTransformations", []))
    for t in transforms:
        if t.get("type") == "scale" and "scale" in t:
            s = np.asarray(t["scale"], float)
            scale, shift = scale * s, shift * s
        elif t.get("type") == "translation" and "translation" in t:
            shift = shift + np.asarray(t["translation"], float)
    if all(n in names for n in ("x", "y", "z")):
        xyz = [names.index(n) for n in ("x", "y", "z")]
    else:
        xyz = (space[-3:] if len(space) >= 3 else list(range(len(axes)))[-3:])[::-1]
    units = [axes[i].get("unit") if isinstance(axes[i], dict) else None for i in xyz] if axes else [None] * 3
    unit, per_axis = _common_unit(units)
    aff = np.eye(4)
    aff[:3, :3] = np.diag(scale[xyz] * per_axis)
    aff[:3, 3] = shift[xyz] * per_axis
    return Geometry(aff, unit)


def _common_unit(units: Sequence[str | None]) -> tuple[str | None, np.ndarray]:
    """One unit for axes that may each carry their own (NGFF allows z in micrometres beside y, x in nanometres, as
    EM pipelines write): the unit the axes say, and the factors that bring each axis into it (x's where they differ).
    An axis that says none takes the others' unit; None (unknown, factors 1) where axes that say none sit beside
    axes that differ, or where they differ and one of them is no length volinfer knows."""
    said = [u for u in units if u]
    if len(set(said)) <= 1:
        return (said[0] if said else None), np.ones(len(units))
    if len(said) < len(units) or not all(u in NGFF_MM for u in said):
        return None, np.ones(len(units))
    first = units[0]
    return first, np.array([NGFF_MM[u] / NGFF_MM[first] for u in units])  # type: ignore[index]


def level_shapes(shape: Sequence[int], levels: int) -> list[tuple[int, ...]]:
    """Spatial shapes of level 0 .. ``levels``: each ``ceil(previous / 2)``."""
    out = [tuple(int(s) for s in shape)]
    for _ in range(levels):
        out.append(tuple(-(-s // 2) for s in out[-1]))
    return out


def max_levels(shape: Sequence[int]) -> int:
    """How many times ``shape`` halves (rounding up) before every axis is one voxel: more levels would only declare
    ever larger voxels over the same single voxel, i.e. scales beyond the image."""
    return max(0, int(max(shape)) - 1).bit_length()


def check_levels(shape: Sequence[int], levels: int) -> None:
    """Refuse a pyramid deeper than the volume allows (see :func:`max_levels`)."""
    most = max_levels(shape)
    if levels > most:
        raise VolinferError(f"--pyramid {levels}: a {'x'.join(map(str, shape))} volume halves to a single voxel after "
                            f"{most} level(s); use --pyramid {most} or fewer")


def downsample_method(kind: str) -> str:
    """``nearest`` for labels, ``mean`` for probabilities and raw outputs."""
    return "nearest" if kind == "labels" else "mean"


def multiscales(geom: Geometry, channels: int, levels: int, method: str, name: str = "volinfer") -> dict[str, Any]:
    """The ``ome`` group attribute (NGFF 0.5) for ``levels + 1`` levels ``"0"``, ``"1"``, …"""
    space = [{"name": n, "type": "space", **({"unit": geom.unit} if geom.unit else {})} for n in ("z", "y", "x")]
    axes = ([{"name": "c", "type": "channel"}] if channels > 1 else []) + space
    lead = [1.0] if channels > 1 else []
    lead0 = [0.0] if channels > 1 else []
    vox, shift = geom.voxel_size_zyx, geom.translation_zyx
    datasets = []
    for lev in range(levels + 1):
        f = 2.0 ** lev
        centre = 0.5 * (f - 1.0) if method == "mean" else 0.0
        datasets.append({"path": str(lev), "coordinateTransformations": [
            {"type": "scale", "scale": lead + [v * f for v in vox]},
            {"type": "translation", "translation": lead0 + [t + centre * v for t, v in zip(shift, vox)]}]})
    ms = {"name": name, "axes": axes, "datasets": datasets,
          "metadata": {"method": "volinfer " + ("stride-2 subsampling (nearest)" if method == "nearest"
                                                 else "2x2x2 mean")}}
    if method == "nearest":
        ms["type"] = "nearest"
    elif method == "mean":
        ms["type"] = "mean"
    return {"version": NGFF_VERSION, "multiscales": [ms]}


def geometry_attrs(geom: Geometry) -> dict[str, Any]:
    """volinfer's own record of the full affine (and of a NIfTI-born volume's header), beside the NGFF metadata."""
    import base64

    out: dict[str, Any] = {"affine": np.asarray(geom.affine, float).tolist(),
                           "axes": "array [k, j, i] (z, y, x) is NIfTI voxel (i, j, k); affine maps (i, j, k, 1) to world"}
    if geom.header is not None:
        out["nifti_header"] = base64.b64encode(geom.header).decode("ascii")
    return out


def downsample(block: np.ndarray, method: str) -> np.ndarray:
    """Halve the last three axes of ``block`` (``ceil(n / 2)``): every second voxel (nearest) or the mean of each
    2×2×2 cell over the voxels it has (mean, in float32 or wider, cast back to the block's dtype)."""
    if method == "nearest":
        return np.ascontiguousarray(block[..., ::2, ::2, ::2])
    work = block.astype(np.float64 if block.dtype == np.float64 else np.float32, copy=False)
    for axis in (-3, -2, -1):
        n = work.shape[axis]
        even = n - n % 2
        a = np.take(work, np.arange(0, even, 2), axis=axis)
        b = np.take(work, np.arange(1, even, 2), axis=axis)
        pair = (a + b) * np.float32(0.5)
        if n % 2:
            pair = np.concatenate([pair, np.take(work, [n - 1], axis=axis)], axis=axis)
        work = pair
    if np.issubdtype(block.dtype, np.integer):
        info = np.iinfo(block.dtype)
        work = np.clip(np.rint(work), info.min, info.max)
    return work.astype(block.dtype, copy=False)


def level_chunks(chunks: Sequence[int], block: Sequence[int] | None, levels: int) -> list[tuple[int, ...]]:
    """Chunk shape of each level. With ``block`` (the block path's per-axis block size, a multiple of ``chunks``
    and of ``2**levels``), each level's chunks divide the block's footprint there, so that no two blocks ever write
    the same chunk of any level; without, every level keeps ``chunks``."""
    out = []
    for lev in range(levels + 1):
        if block is None:
            out.append(tuple(int(c) for c in chunks))
        else:
            out.append(tuple(math.gcd(int(c), int(b) >> lev) for c, b in zip(chunks, block)))
    return out


def check_pyramid(levels: int, block: Sequence[int] | None = None, chunks: Sequence[int] | None = None) -> None:
    """Refuse pyramid settings that cannot be written block by block without a second pass."""
    if levels < 0 or levels > 16:
        raise VolinferError(f"--pyramid must be between 0 and 16 levels, got {levels}")
    if not levels:
        return
    if chunks is not None and any(int(c) % 2 for c in chunks[:1]):
        raise VolinferError(f"--pyramid needs an even chunk size along z (got {chunks[0]}); pass an even --chunks")
    if block is not None and any(int(b) % (1 << levels) for b in block):
        raise VolinferError(f"--pyramid {levels}: blocks of {'x'.join(map(str, block))} voxels do not halve "
                            f"{levels} times; choose --block/--chunks with a multiple of {1 << levels}")
