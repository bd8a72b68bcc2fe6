"""What an engine runs besides the model and the volume: the grid and how each piece of input is made
(:class:`TileJob`), and how the output is handed over row by row (:class:`RowProgress`). Both engines (tiles, layer
streaming) take them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from volinfer.run.normalize import Normalizer
from volinfer.tiling.geometry import TileGrid


@dataclass(frozen=True)
class RowProgress:
    """``start_row``: the first row of output not yet final on disk (a resumed run); ``on_row_done(r)``: called once
    rows ``< r`` are written; ``progress``: show a progress bar."""

    start_row: int = 0
    on_row_done: Callable[[int], None] | None = None
    progress: bool = True


@dataclass(frozen=True)
class TileJob:
    """The grid (tiles, or the stream's bands and rows) and how each piece of input is made (normalisation, padding,
    NaN/Inf replacement); for the tile loop also how many requests compute at once, whether constant tiles reuse
    one inference, and test-time mirroring (volume axes 0-2, see :class:`volinfer.run.engine.Mirror`)."""

    grid: TileGrid
    normalizer: Normalizer
    pad_mode: str = "constant"
    pad_value: float = 0.0
    requests: int = 2
    reuse_constant: bool = True
    nan_fill: list[float] | None = None
    mirror: Sequence[int] = ()
