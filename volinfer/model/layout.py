"""A model's tensor layout: where the channel axis and the three spatial axes are, and the shape of a tile of
input in it. Converters and the runtime use this one object instead of repeating the layout test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

#: The layouts volinfer runs: channels first (PyTorch, ONNX) or last (TensorFlow).
LAYOUTS = ("NCDHW", "NDHWC")


@dataclass(frozen=True)
class Layout:
    """One of :data:`LAYOUTS`, with the axes it implies for a batch of one."""

    name: str

    def __post_init__(self) -> None:
        if self.name not in LAYOUTS:
            raise ValueError(f"layout {self.name!r} is not one of {', '.join(LAYOUTS)}")

    @classmethod
    def of(cls, name: "str | Layout") -> "Layout":
        return name if isinstance(name, Layout) else cls(name)

    @property
    def channels_first(self) -> bool:
        return self.name == "NCDHW"

    @property
    def channel_axis(self) -> int:
        return 1 if self.channels_first else 4

    @property
    def spatial_axes(self) -> list[int]:
        return [2, 3, 4] if self.channels_first else [1, 2, 3]

    def tensor_shape(self, channels: int, spatial: Sequence[int]) -> list[int]:
        """The model tensor's shape for a batch of one with ``channels`` and spatial size ``spatial``."""
        return [1, channels, *spatial] if self.channels_first else [1, *spatial, channels]

    def to_cxyz(self, array: np.ndarray) -> np.ndarray:
        """One sample (no batch axis) in this layout as (C, x, y, z): a view, never a copy."""
        return array if self.channels_first else np.moveaxis(array, -1, 0)

    def from_cxyz(self, array: np.ndarray) -> np.ndarray:
        """(C, x, y, z) as one sample (no batch axis) in this layout: a view, never a copy."""
        return array if self.channels_first else np.moveaxis(array, 0, -1)
