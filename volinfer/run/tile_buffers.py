"""The tiles engine's memory beyond the compiled model: one account for the planner, which weighs every crop tiling
by it, and for ``volinfer plan``, which lists it by part.

The model's own memory grows with the tile; these buffers grow with the volume's cross-section too: the reader keeps
one strip of the input spanning the whole x extent (the tile's y and z range; a gzip input whole z-planes), and the
crop stitcher keeps the output strips of the rows of tiles in flight. At 2048³ with 256x272x272 tiles they come to
~440 MB, which a planner counting the model alone (1151 MB predicted) left out: the run peaked at 1653 MB against a
1192 MB budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

MB = 2**20

#: Infer requests the model estimate's calibration ran (:data:`volinfer.model.memory.PLUGIN_FACTOR`): each request in
#: flight holds its own float32 input and output tensors, so a run keeping fewer in flight (a one-tile run uses one;
#: the other requests never get their output tensors, and their zeroed input buffers are never touched) holds less.
CALIBRATION_REQUESTS = 2


@dataclass(frozen=True)
class TileBuffers:
    """What sizes the tiles engine's buffers for one volume and run: the volume ``shape`` (x, y, z), its input
    ``in_channels`` as stored (``stored_itemsize`` bytes a voxel; ``compressed``: gzip, read as whole planes), the
    output's written channels and item size, the model's output channels (post-processing works on all of them) and
    the infer requests the run keeps."""

    shape: tuple[int, int, int]
    in_channels: int
    stored_itemsize: int
    compressed: bool
    out_channels: int
    out_itemsize: int
    model_channels: int
    requests: int

    def reader_mb(self, ty: int, tz: int) -> float:
        """The input strip: all of x for the tile's y and z range (a gzip input: whole z-planes)."""
        X, Y, Z = self.shape
        rows = Y if self.compressed else min(ty, Y)
        return self.in_channels * X * rows * min(tz, Z) * self.stored_itemsize / MB

    def crop_stitch_mb(self, cy: int, cz: int, counts: Sequence[int]) -> float:
        """Crop stitching's output strips (all of x, a row of tile cores; ``counts`` tiles along x, y, z): one per row
        the requests in flight may hold open and the one filling — two when a row has at least as many tiles as there
        are requests — and never more than there are rows."""
        open_rows = 2 if counts[0] >= self.requests else self.requests + 1
        strips = min(open_rows, max(1, counts[1] * counts[2]))
        return strips * self.out_channels * cy * cz * self.shape[0] * self.out_itemsize / MB

    def temporaries_mb(self, tile: Sequence[int]) -> float:
        """A tile's post-processing and padding temporaries (post-processing works in chunks of a quarter tile)."""
        return 2 * self.model_channels * float(np.prod(tile)) * 4 / MB / 4

    def request_io_mb(self, tile: Sequence[int]) -> float:
        """One infer request's float32 input and output tensors at ``tile``."""
        return 4.0 * (self.in_channels + self.model_channels) * float(np.prod(tile)) / MB

    def crop_counts(self, tile: Sequence[int], overlap: Sequence[int]) -> tuple[int, ...]:
        """About how many crop tiles of ``tile`` with ``overlap`` cover each axis (one exactly where one does)."""
        return tuple(1 if t >= n else -(-(n - o) // max(1, t - o)) for t, o, n in zip(tile, overlap, self.shape))

    def beyond_model_mb(self, tile: Sequence[int], overlap: Sequence[int], counts: Sequence[int]) -> float:
        """What a crop tiling (``counts`` tiles of ``tile`` per axis, ``overlap`` per axis) holds beside the planner's
        model estimate: the strips and temporaries above, and the requests it keeps in flight other than the
        estimate's calibration (negative for a one-tile run: one request's tensors fewer)."""
        Y, Z = self.shape[1], self.shape[2]
        cy, cz = (min(t - o // 2, n) for t, o, n in zip(tile[1:], overlap[1:], (Y, Z)))  # the widest core
        in_flight = max(1, min(self.requests, int(np.prod(counts))))
        return (self.reader_mb(tile[1], tile[2]) + self.crop_stitch_mb(cy, cz, counts)
                + self.temporaries_mb(tile) + (in_flight - CALIBRATION_REQUESTS) * self.request_io_mb(tile))
