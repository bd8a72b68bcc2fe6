"""The model side: compile at a tile, stored settings, receptive field, activations, normalisation layers, precision."""

from volinfer.model.tile_model import LAYOUTS, CompileOptions, TileModel, read_model  # noqa: F401
