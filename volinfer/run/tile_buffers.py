"""The tiles engine's memory beyond the compiled model: one account for the planner, which weighs every crop tiling
by it, and for ``volinfer plan``, which lists it by part.

The model's own memory grows with the tile; these buffers grow with the volume's cross-section too: the reader keeps
one strip of the input spanning the whole x extent (the tile's y and z range; a gzip input whole z-planes), and the
crop stitcher keeps the output strips of the rows of tiles in flight. At 2048³ with 256x272x272 tiles they come to
~440 MB, which a planner counting the model alone (1151 MB predicted) left out: the run peaked at 1653 MB against a
1192 MB budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from volinfer.model.memory import RUNTIME_FLOOR_MB

MB = 2**20

#: Infer requests the model estimate's calibration ran (:data:`volinfer.model.memory.PLUGIN_FACTOR`): each request in
#: flight holds its own float32 input and output tensors, so a run keeping fewer in flight (a one-tile run uses one;
#: the other requests never get their output tensors, and their zeroed input buffers are never touched) holds less.
CALIBRATION_REQUESTS = 2
#: Distinct constant tiles whose output the engine keeps to reuse (each a whole tile of the written output when it
#: crops, of the model's float32 output when it blends: :meth:`volinfer.tiling.stitch.CropStitcher.keep`).
MAX_CACHED_CONSTANTS = 2


@dataclass(frozen=True)
class TileBuffers:
    """What sizes the tiles engine's buffers for one volume and run: the volume ``shape`` (x, y, z), its input
    ``in_channels`` (``stored_itemsize`` bytes a voxel as stored; ``reader_holds``: what its readers keep between
    reads, :func:`volinfer.io.reader.read_buffer`), the output's written channels and item size, the model's output
    channels (post-processing works on all of them), the infer requests the run keeps, whether constant tiles reuse a
    cached output (they are stitched at once, ahead of the tiles in flight) and whether tiles are mirrored."""

    shape: tuple[int, int, int]
    in_channels: int
    stored_itemsize: int
    reader_holds: str  # "strip", "planes" or "nothing"
    out_channels: int
    out_itemsize: int
    model_channels: int
    requests: int
    reuse_constant: bool = True
    mirror: bool = False

    def reader_mb(self, ty: int, tz: int) -> float:
        """The input the readers hold: all of x over the tile's y and z range (a strip), whole z-planes over the
        tile's z range (gzip, decoded TIFF pages), or nothing (arrays and Zarr chunks read straight into the tile)."""
        if self.reader_holds == "nothing":
            return 0.0
        X, Y, Z = self.shape
        rows = Y if self.reader_holds == "planes" else min(ty, Y)
        return self.in_channels * X * rows * min(tz, Z) * self.stored_itemsize / MB

    def crop_stitch_mb(self, cy: int, cz: int, counts: Sequence[int]) -> float:
        """Crop stitching's output strips (all of x, a row of tile cores; ``counts`` tiles along x, y, z). Tiles are
        stitched in submission order, so a row is complete before the next one's first tile: one strip, and one for
        a row of one tile. Constant tiles reuse a cached output and are stitched at once, ahead of the tiles in
        flight: then a strip for each row those hold open, up to the requests (+ the one filling) and the rows of a
        z-row of tiles (the engine finishes every z-row before the next)."""
        strips = 1 if counts[0] == 1 or not self.reuse_constant else min(self.requests + 1, max(1, counts[1]))
        return strips * self.out_channels * cy * cz * self.shape[0] * self.out_itemsize / MB

    def temporaries_mb(self, tile: Sequence[int]) -> float:
        """A tile's post-processing and padding temporaries (post-processing works in chunks of a quarter tile)."""
        return 2 * self.model_channels * _voxels(tile) * 4 / MB / 4

    def request_io_mb(self, tile: Sequence[int]) -> float:
        """One infer request's float32 input and output tensors at ``tile``."""
        return 4.0 * (self.in_channels + self.model_channels) * _voxels(tile) / MB

    def constants_mb(self, tile: Sequence[int], tiles: int, crop: bool = True) -> float:
        """The cached outputs of constant tiles (up to :data:`MAX_CACHED_CONSTANTS` tiles kept for the tiles after
        them: post-processed as written when the run crops, the model's float32 output when it blends); 0 without
        reuse or for one tile (it is constant only when the whole volume is)."""
        if not self.reuse_constant or tiles <= 1:
            return 0.0
        voxel = self.out_channels * self.out_itemsize if crop else 4.0 * self.model_channels
        return min(MAX_CACHED_CONSTANTS, tiles - 1) * voxel * _voxels(tile) / MB

    def mirror_mb(self, tile: Sequence[int]) -> float:
        """Test-time mirroring's own infer request (its input filled for every flip, its output) and its float32
        sum of the model's outputs (:class:`volinfer.run.engine.Mirror`); 0 without mirroring."""
        if not self.mirror:
            return 0.0
        return self.request_io_mb(tile) + 4.0 * self.model_channels * _voxels(tile) / MB

    def beyond_model_mb(self, tile: Sequence[int], overlap: Sequence[int], counts: Sequence[int]) -> float:
        """What a crop tiling (``counts`` tiles of ``tile`` per axis, ``overlap`` per axis) holds beside the planner's
        model estimate: the buffers above, and the requests it keeps in flight other than the estimate's
        calibration (negative for a one-tile run: one request's tensors fewer)."""
        # the widest core: the whole axis where one tile covers it, else the tile less its inner margin
        cy, cz = (n if c == 1 else min(t - o // 2, n) for t, o, n, c in zip(tile[1:], overlap[1:], self.shape[1:],
                                                                            counts[1:]))
        tiles = _voxels(counts)
        in_flight = max(1, min(self.requests, tiles))
        extra = self.temporaries_mb(tile) + self.constants_mb(tile, tiles) + self.mirror_mb(tile)
        return (self.reader_mb(tile[1], tile[2]) + self.crop_stitch_mb(cy, cz, counts) + extra
                + (in_flight - CALIBRATION_REQUESTS) * self.request_io_mb(tile))


def _voxels(shape: Sequence[int]) -> int:
    """The product of ``shape`` as a Python integer (no numpy: the planner asks thousands of times; no overflow of a
    32-bit numpy shape)."""
    return math.prod(map(int, shape))


def tile_need_mb(per_voxel: float, w_mb: float, buffers: TileBuffers | None, tile: Sequence[int],
                 overlap: Sequence[int], counts: Sequence[int]) -> float:
    """A tiling's predicted memory (MB): the runtime, the model's estimate at ``tile`` (``per_voxel`` bytes a tile
    voxel, ``w_mb`` of weights), and the tiles engine's ``buffers`` for ``counts`` tiles with crop ``overlap``
    (None: the model alone)."""
    mb = RUNTIME_FLOOR_MB + w_mb + per_voxel * _voxels(tile) / MB
    if buffers is not None:
        mb += buffers.beyond_model_mb(tile, overlap, counts)
    return mb
