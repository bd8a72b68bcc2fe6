"""Choosing a tiling that is faithful first and fast second, and saying honestly when a run is not exact.

A run is *exact* when one tile covers the volume padded to the model's size multiple (then it IS the model's own
whole-volume inference), or when crop stitching cuts it into tiles whose discarded margin, on every axis cut into
several tiles, covers the receptive field, and no layer sees statistics of its whole input (InstanceNorm/GroupNorm)
unless those are frozen to whole-volume statistics (:mod:`volinfer.run.norm_stats`). The receptive field is where ONE
voxel's influence exceeds 1e-5 of the output range; a tile border removes all the context beyond the margin at once,
and those small influences add up, so an exact multi-tile run is close to whole-volume inference but not equal in
values: the deviation measured at convert time (:mod:`volinfer.model.tiling_check`) is quoted with the verdict
(:func:`explain_exact`). The planner searches per-axis tile sizes
(multiples of the model's size multiple, up to the whole padded axis) for the exact tiling with the least predicted time
whose predicted memory fits the budget, the leanest among those within 10% of that time
(:func:`leanest_near_fastest`, the one objective the choice between engines uses too); it changes nothing when the
user forced a tile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from volinfer.tiling.geometry import GeometryError, plan_axis_crop
from volinfer.model.receptive_field import ReceptiveField
from volinfer.model.tiling_check import describe as describe_deviation
from volinfer.model.memory import RUNTIME_FLOOR_MB
from volinfer.run.tile_buffers import TileBuffers

#: Plans whose predicted times are within this fraction of the fastest count as equally fast: the leanest of them wins.
LEANER_WITHIN = 0.10



@dataclass
class Fidelity:
    """The verdict a run reports: ``exact`` and, when not, the reasons (receptive field, margin, statistics); when
    exact, ``meaning`` says what exactness means for this run and ``deviation`` is the tiled-vs-whole measurement
    stored at convert time (:mod:`volinfer.model.tiling_check`), None when not stored or one tile covers it all."""

    exact: bool
    reasons: list[str] = field(default_factory=list)
    meaning: str = "exact"
    deviation: dict[str, Any] | None = None

    def summary(self) -> str:
        return self.meaning if self.exact else "not exact: " + "; ".join(self.reasons)


def explain_exact(counts: Sequence[int], rf: ReceptiveField | None, check: dict[str, Any] | None,
                  unnormalised: bool = False) -> tuple[str, dict[str, Any] | None]:
    """What "exact" means for a run cut into ``counts`` tiles per axis, and the deviation to quote. One tile over
    the whole padded volume IS whole-volume inference. Otherwise the margins cover the receptive field, measured as
    the farthest reach of one voxel's influence above 1e-5 of the output range: the whole border's influence adds
    up, so the tiled-vs-whole deviation measured at convert time (``check``) is quoted, or said to be unmeasured.
    ``unnormalised``: the run feeds intensities as they are, so a check made on random (zero-mean, unit-variance)
    input says too little: the deviation grows with the input's distance from the zero padding."""
    if all(c == 1 for c in counts):
        return "exact: one tile covers the whole (padded) volume, so the output equals whole-volume inference", None
    radius = "x".join(map(str, rf.radius)) if rf is not None else "?"
    if check is None:
        return f"exact: crop margins cover the receptive field ({radius}; tiling deviation not measured)", None
    text = (f"exact: crop margins cover the receptive field ({radius}); tiled vs whole measured at convert "
            f"({check.get('input', 'random')} input): {describe_deviation(check)}")
    if unnormalised and str(check.get("input", "random")).startswith("random"):
        text += ("; this run feeds intensities un-normalised, and inputs far from zero deviate more (`volinfer "
                 "convert --calibration-volume` measures it on real data)")
    return text, check


@dataclass(frozen=True)
class Tiling:
    tile: tuple[int, int, int]
    overlap: tuple[int, int, int]
    counts: tuple[int, int, int]
    evaluated: int  # voxels the model evaluates (tiles x tile volume)
    memory_mb: float
    norm_passes: int  # streamed statistics passes before the run (0: none needed)
    within_budget: bool = True  # within the memory budget; the rest are listed by `volinfer plan` only
    voxel_s: float | None = None  # predicted seconds per evaluated voxel at this tile (speed profile), None: unknown
    cost: float = 0.0  # predicted time (plan_exact): seconds with a speed profile, else evaluated voxels


def _axis_options(n: int, m: int, radius: int, need: int, preferred: int) -> list[tuple[int, int, int]]:
    """(tile, count, overlap) choices along one axis: every multiple of ``m`` from the smallest whose margin covers
    ``radius`` (+ ``need`` for aligned statistics cores) up to one tile over the padded axis."""
    whole = -(-n // m) * m
    out = [(whole, 1, 0)]
    if radius < 0:  # receptive field not bounded by the largest probe: only one tile over the axis is exact
        return out
    margin = radius + need
    smallest = max(m, -(-(2 * margin + m) // m) * m)
    sizes = sorted({t for t in range(smallest, whole, m)} | ({preferred} if smallest <= preferred < whole else set()))
    if len(sizes) > 24:  # keep the search small: every size near the smallest, then a geometric spread
        sizes = sorted(set(sizes[:8]) | set(sizes[:: max(1, len(sizes) // 16)]) | {preferred} & set(sizes))
    for t in sizes:
        try:
            count = plan_axis_crop(n, t, m, margin).count
        except GeometryError:
            continue
        out.append((t, count, 2 * margin))
    return out


def leanest_near_fastest(items: Sequence[Any], cost: Callable[[Any], float], memory: Callable[[Any], float]) -> Any:
    """The planner's one objective: the least predicted time, except that among the items within
    :data:`LEANER_WITHIN` of it the one with the least memory wins (time predictions are not that precise, memory is
    what a user gives up). ``items`` are all within the budget already; None when there are none."""
    if not items:
        return None
    fastest = min(cost(i) for i in items)
    near = [i for i in items if cost(i) <= (1.0 + LEANER_WITHIN) * fastest]
    return min(near, key=lambda i: (round(memory(i), 1), cost(i)))


@dataclass(frozen=True)
class TilingProblem:
    """What the exact-tiling search plans for: the volume's ``shape``, the model's size ``multiple``, receptive
    field ``rf`` and own (``preferred``) tile, its memory (``mem_per_voxel`` of the tile, ``weights_mb``), the
    ``budget_mb``, its InstanceNorm/GroupNorm layers (``norm_layers``; ``whole_stats``: frozen to whole-volume
    statistics, else per tile) and spatial reductions nothing freezes (``global_ops``), the per-voxel cost at a
    tile's voxel count (``voxel_cost``, seconds from the model's speed profile, see
    :mod:`volinfer.model.speed_profile`; None: 1, the fewest evaluated voxels win), and the tiles engine's buffers
    beside the model (``buffers``; None: the model alone, for runs whose buffers do not span the volume)."""

    shape: Sequence[int]
    multiple: int
    rf: ReceptiveField
    preferred: Sequence[int]
    mem_per_voxel: float
    weights_mb: float
    budget_mb: float
    norm_layers: int = 0
    global_ops: bool = False
    whole_stats: bool = True
    voxel_cost: Callable[[float], float] | None = None
    buffers: TileBuffers | None = None


def plan_exact(problem: TilingProblem, weighed: list[Tiling] | None = None) -> Tiling | None:
    """The exact tiling the planner's objective picks (:func:`leanest_near_fastest`) among those whose predicted
    memory fits the budget; None when no exact tiling fits. Predicted time (``Tiling.cost``) = evaluated voxels x
    per-voxel cost at the tile's voxel count x the statistics passes' factor. ``weighed`` receives what
    `volinfer plan` lists: every tiling on the time/memory front within the budget (none is both faster and
    leaner), the chosen one among them, and the fastest beyond the budget."""
    q = problem
    multiple, norm_layers, budget_mb, weights_mb, mem_per_voxel = (q.multiple, q.norm_layers, q.budget_mb,
                                                                   q.weights_mb, q.mem_per_voxel)
    radii = q.rf.radius if q.rf.bounded else (-1, -1, -1)
    voxel_cost = functools.lru_cache(maxsize=None)(q.voxel_cost) if q.voxel_cost is not None else None
    options = [_axis_options(n, multiple, r, multiple // 2 if norm_layers else 0, p)
               for n, r, p in zip(q.shape, radii, q.preferred)]
    # candidates as plain tuples (thousands of them): a Tiling is made only for the few kept
    fits: list[tuple[float, float, tuple[Any, Any, Any], int, int, float | None]] = []
    over: list[tuple[float, float, tuple[Any, Any, Any], int, int, float | None]] = []
    single_only = q.global_ops or (norm_layers and not q.whole_stats)
    for ox in options[0]:
        for oy in options[1]:
            for oz in options[2]:
                single = ox[1] == 1 and oy[1] == 1 and oz[1] == 1
                if not single and single_only:
                    continue
                passes = norm_layers if not single and norm_layers else 0
                voxels = ox[0] * oy[0] * oz[0]
                mem = RUNTIME_FLOOR_MB + weights_mb + mem_per_voxel * voxels / 2**20
                if q.buffers is not None:
                    mem += q.buffers.beyond_model_mb((ox[0], oy[0], oz[0]), (ox[2], oy[2], oz[2]),
                                                     (ox[1], oy[1], oz[1]))
                if mem > budget_mb and weighed is None:
                    continue
                evaluated = ox[0] * ox[1] * oy[0] * oy[1] * oz[0] * oz[1]
                voxel_s = None if voxel_cost is None else voxel_cost(float(voxels))
                # each statistics pass runs part of the network over the volume: ~half a run
                cost = evaluated * (1.0 if voxel_s is None else voxel_s) * (1.0 + 0.5 * passes)
                (fits if mem <= budget_mb else over).append((cost, mem, (ox, oy, oz), evaluated, passes, voxel_s))

    def tiling(f: tuple[float, float, tuple[Any, Any, Any], int, int, float | None], within: bool = True) -> Tiling:
        cost, mem, axes, evaluated, passes, voxel_s = f
        return Tiling(tuple(a[0] for a in axes), tuple(a[2] for a in axes), tuple(a[1] for a in axes),  # type: ignore[arg-type]
                      evaluated, round(mem, 1), passes, within, voxel_s, cost)

    best = leanest_near_fastest(fits, lambda f: f[0], lambda f: f[1])
    if weighed is not None:
        weighed.extend(tiling(f) for f in _front(fits, best))
        weighed.extend(tiling(f, False) for f in sorted(over, key=lambda f: (f[0], f[1]))[:2])
    return None if best is None else tiling(best)


def _front(fits: list[Any], best: Any, most: int = 8) -> list[Any]:
    """The tilings on the time/memory front (no other is both faster and leaner), fastest first, at most ``most``
    of them spread along it, with ``best`` always among them."""
    front: list[Any] = []
    for f in sorted(fits, key=lambda f: (f[0], f[1])):
        if not front or round(f[1], 1) < round(front[-1][1], 1):
            front.append(f)
    if len(front) > most:
        step = len(front) / most
        front = [front[int(i * step)] for i in range(most)]
    if best is not None and best not in front:
        front.append(best)
    return sorted(front, key=lambda f: (f[0], f[1]))


def judge(overlap: Sequence[int], counts: Sequence[int], stitch: str, rf: ReceptiveField | None, norm_layers: int,
          global_ops: bool, stats: str) -> Fidelity:
    """Is a run with this tiling exact? Every reason it is not, in words a user can act on."""
    reasons: list[str] = []
    multi = [c > 1 for c in counts]
    if stitch != "crop" and any(multi):
        reasons.append(f"{stitch} stitching blends overlapping tiles (crop stitching is exact)")
    if rf is None or not rf.measured:
        if any(multi):
            reasons.append(f"receptive field {'unknown' if rf is None else rf} (margins come from --overlap)")
    else:
        margin = [o // 2 for o in overlap]
        short = [f"{'xyz'[i]} {margin[i]} < {rf.radius[i]}" for i in range(3) if multi[i] and margin[i] < rf.radius[i]]
        if short:
            reasons.append(f"crop margins do not cover the receptive field ({', '.join(short)} voxels)")
        if not rf.bounded and any(multi):
            reasons.append(f"receptive field {rf} was not bounded")
    if any(multi) and norm_layers and stats != "volume":
        why = "--norm-stats tile" if stats == "tile" else "whole-volume statistics are gathered for crop stitching"
        reasons.append(f"{norm_layers} normalisation layer(s) use per-tile statistics ({why})")
    if any(multi) and global_ops:
        reasons.append("the model combines values across whole tiles or depends on positions in the tile (global "
                       "pooling/statistics volinfer cannot freeze, align_corners interpolation)")
    return Fidelity(not reasons, reasons)


def fmt_tile(t: Sequence[int]) -> str:
    return "x".join(map(str, t)) if len(set(t)) > 1 else str(t[0])

