"""Assembling one tile of model input: read the stored voxels, normalise them, pad past the volume's end.

The result goes straight into the infer request's own input buffer (shared with OpenVINO, never reallocated). Padding
follows the grid's convention (:mod:`volinfer.tiling.geometry`): only past the high end of an axis, as if the whole volume had
been padded with ``numpy.pad(mode)``; ``constant`` pads with ``pad_value`` *after* normalisation.
"""

from __future__ import annotations

import numpy as np

from volinfer.errors import VolinferError
from volinfer.tiling.geometry import Tile, TileGrid
from volinfer.run.normalize import Normalizer
from volinfer.io.reader import VolumeSource
from volinfer.options import PAD_MODES



class TileFeeder:
    """Fills (C, x, y, z) views of input buffers with the model input for a tile."""

    def __init__(
        self,
        source: VolumeSource,
        grid: TileGrid,
        normalizer: Normalizer,
        pad_mode: str = "constant",
        pad_value: float = 0.0,
        nan_fill: list[float] | None = None,
    ) -> None:
        if pad_mode not in PAD_MODES:
            raise VolinferError(f"pad mode must be one of {', '.join(PAD_MODES)}; got {pad_mode!r}")
        self.source, self.grid, self.norm = source, grid, normalizer
        self.pad_mode, self.pad_value = pad_mode, float(pad_value)
        self.nan_fill = nan_fill  # per channel, already normalised; None when the volume has no NaN/Inf

    def _read_range(self, start: int, size: int, tile: int) -> tuple[int, int, int]:
        """(lo, hi, pad): read [lo, hi) along one axis, then pad ``pad`` voxels past its end."""
        stop = start + tile
        if stop <= size:
            return start, stop, 0
        lo = start
        if self.pad_mode == "reflect":  # reflection past the end reaches back to 2*size - stop - 1
            lo = max(0, min(start, 2 * size - stop - 1))
        return lo, size, stop - size

    def _replace_nonfinite(self, values: np.ndarray, channel: int) -> None:
        if self.nan_fill is not None:
            v = self.nan_fill[channel]
            np.nan_to_num(values, copy=False, nan=v, posinf=v, neginf=v)

    def fill(self, tile: Tile, dest: np.ndarray) -> None:
        """Write the input of ``tile`` into ``dest`` (C, x, y, z)."""
        ranges = [self._read_range(s, n, t) for s, n, t in zip(tile.start, self.grid.shape, self.grid.tile_shape)]
        region = tuple((lo, hi) for lo, hi, _ in ranges)
        padded = any(p for _, _, p in ranges)
        for c, reader in enumerate(self.source.readers):
            stored = self.source.read(c, region)  # type: ignore[arg-type]
            out = dest[c]
            if not padded:
                self.norm.to_float(stored, c, reader.slope, reader.inter, out)
                self._replace_nonfinite(out, c)
                continue
            if self.pad_mode == "constant":
                nx, ny, nz = stored.shape
                out[...] = self.pad_value
                self.norm.to_float(stored, c, reader.slope, reader.inter, out[:nx, :ny, :nz])
                self._replace_nonfinite(out, c)
                continue
            values = np.empty(stored.shape, dtype=np.float32)
            self.norm.to_float(stored, c, reader.slope, reader.inter, values)
            self._replace_nonfinite(values, c)
            full = np.pad(values, [(0, p) for _, _, p in ranges], mode=self.pad_mode)
            off = [s - lo for s, (lo, _, _) in zip(tile.start, ranges)]
            tx, ty, tz = self.grid.tile_shape
            out[...] = full[off[0] : off[0] + tx, off[1] : off[1] + ty, off[2] : off[2] + tz]
