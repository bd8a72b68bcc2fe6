"""Whole-volume statistics for InstanceNorm/GroupNorm layers, in bounded memory.

For each spatial normalisation layer in topological order, one streamed pass runs the sub-network that ends at the
layer's input (earlier layers already frozen to their whole-volume statistics) over every tile, and accumulates the
mean and variance in float64 over each tile's *core* at that layer's resolution. Cores are aligned to the model's
size multiple (its total stride), so a core maps to whole voxels at every resolution, and together they cover the
volume padded to that multiple: exactly the region whole-volume inference normalises over. Layers that do not depend
on each other share a pass. The frozen model then runs the tiles as usual.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import openvino as ov
from volinfer.progress import progress_bar

from volinfer.run.feeder import TileFeeder
from volinfer.tiling.geometry import AxisPlan, TileGrid
from volinfer.model.tile_model import TileModel
from volinfer.model.spatial_norm import Moments, NormLayer, freeze, group_view, node_named, stat_tensor


def aligned_cores(grid: TileGrid, multiple: int) -> list[list[tuple[int, int]]]:
    """Per axis, each tile's core rounded to the size multiple, the last one ending at the padded extent."""
    return [aligned_bounds(axis, multiple) for axis in grid.axes]


def aligned_bounds(axis: AxisPlan, multiple: int) -> list[tuple[int, int]]:
    """One axis's tile cores rounded to the size multiple, the last one ending at the padded extent: together they
    partition the padded axis, and each maps to whole voxels at every resolution of the network."""
    end = -(-axis.size // multiple) * multiple
    bounds = [0] + [int(round(c1 / multiple)) * multiple for _, c1 in axis.cores[:-1]] + [end]
    return [(bounds[i], bounds[i + 1]) for i in range(axis.count)]


def freeze_wave(model: ov.Model, wave: list[NormLayer], moments: list[Moments]) -> None:
    """Freeze every layer of ``wave`` in ``model`` (in place) to the mean and variance its ``moments`` gathered."""
    for layer, mom in zip(wave, moments):
        mean, var = mom.result()
        if layer.groups:
            mean, var = mean.reshape(-1), var.reshape(-1)
        freeze(model, layer, mean, var)


def _ancestors(model: ov.Model, layer: NormLayer, names: set[str]) -> set[str]:
    """Names (among ``names``) of normalisation layers upstream of ``layer``."""
    seen: set[str] = set()
    found: set[str] = set()
    stack = [node_named(model, layer.name).input_value(0).get_node()]
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in seen:
            continue
        seen.add(name)
        if name in names:
            found.add(name)
        stack.extend(node.input_value(i).get_node() for i in range(node.get_input_size()))
    return found


def waves(model: ov.Model, layers: list[NormLayer]) -> list[list[NormLayer]]:
    """Layers grouped into passes: a layer runs once every normalisation upstream of it is frozen."""
    names = {layer.name for layer in layers}
    deps = {layer.name: _ancestors(model, layer, names) for layer in layers}
    done: set[str] = set()
    out = []
    while len(done) < len(layers):
        ready = [layer for layer in layers if layer.name not in done and deps[layer.name] <= done]
        out.append(ready)
        done |= {layer.name for layer in ready}
    return out


def _core_slices(layer: NormLayer, value: np.ndarray, tile: tuple[int, ...], local: list[tuple[int, int]]) -> tuple:
    """Index selecting the tile core (given in tile-local full-resolution voxels) at the layer's resolution."""
    index: list[slice] = [slice(None)] * value.ndim
    for v_axis, t_axis in enumerate(layer.spatial):
        ratio = tile[v_axis] // value.shape[t_axis]
        lo, hi = local[v_axis]
        index[t_axis] = slice(lo // ratio, hi // ratio)
    return tuple(index)


def fit_norm_statistics(tm: TileModel, feeder: TileFeeder, grid: TileGrid, layers: list[NormLayer],
                        progress: bool = False,
                        on_pass: Callable[[int], None] | None = None) -> tuple[ov.Model, int]:
    """A copy of ``tm``'s model (at its tile) with every layer of ``layers`` frozen to whole-volume statistics, and
    the number of streamed passes that took."""
    model = tm.model.clone()
    cores = aligned_cores(grid, tm.multiple)
    plan = waves(model, layers)
    tiles = list(grid)
    buf = tm.new_input_buffer()
    view = tm.input_view(buf)
    bar = progress_bar(len(plan) * len(tiles), "normalisation statistics", "tile", disable=not progress)
    try:
        for n, wave in enumerate(plan):
            sub = ov.Model([stat_tensor(model, layer) for layer in wave], model.get_parameters(), "norm_stats")
            compiled = tm.core.compile_model(sub, tm.options.device, {**tm.options.config(),
                                                                        "INFERENCE_PRECISION_HINT": "f32"})
            request = compiled.create_infer_request()
            request.set_input_tensor(ov.Tensor(buf, shared_memory=True))
            moments = [Moments() for _ in wave]
            for tile in tiles:
                feeder.fill(tile, view)
                request.infer(share_outputs=True)
                local = [(c[tile.index[a]][0] - tile.start[a], c[tile.index[a]][1] - tile.start[a])
                         for a, c in enumerate(cores)]
                for k, layer in enumerate(wave):
                    value = request.get_output_tensor(k).data
                    block, axes = group_view(value[_core_slices(layer, value, tm.tile, local)], layer)
                    moments[k].add(block, axes)
                bar.update(1)
            del request, compiled
            freeze_wave(model, wave, moments)
            if on_pass:
                on_pass(n + 1)
    finally:
        bar.close()
    return model, len(plan)
