"""How fast the compiled model runs at a few tile shapes, measured once at convert time and stored in the IR.

OpenVINO's cost per voxel is not constant: small tiles pay per-inference overhead and poorer cache use, large ones
amortise it; bf16 and f32 differ. The planner (:func:`volinfer.run.fidelity.plan_exact`) minimises predicted time =
evaluated voxels x per-voxel cost at the tile's voxel count, so a larger tile that evaluates more voxels can win when
each voxel is cheaper there. The profile is a few points (tile voxels -> seconds per Mvoxel), measured in the
precision ``--precision auto`` would run, on cubes from the model's tile up to about twice its edge (within
:data:`MEASURED_HEADROOM_MB` of memory and a few seconds in all). Between points the cost is interpolated linearly in
log(voxels), clamped at the ends. Only ratios rank tilings, so a profile measured on another CPU still ranks shapes
sensibly; its absolute seconds are this CPU's only when the CPU matches.

Stored as ``rt_info volinfer/speed_profile`` (JSON); a profile that could not be measured leaves
``speed_profile_note`` saying why. Nothing here ever fails a conversion or a run: a bad stored profile is ignored.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np
import openvino as ov

from volinfer import portable
from volinfer.model.memory import accepts, activation_bytes_per_voxel, default_budget_mb
from volinfer.model.precision import resolve
from volinfer.model.tile_model import CompileOptions
from volinfer.model.layout import Layout

KEY = "speed_profile"
NOTE_KEY = "speed_profile_note"
#: The largest tile measured, as a multiple of the model's tile edges (then shrunk to fit
#: :data:`MEASURED_HEADROOM_MB`).
MAX_EDGE_FACTOR = 2.0
#: The largest tile measured predicts at most this much more model memory than the model's tile (keeps the profile's
#: compilations small; the planner clamps the cost beyond the largest point measured).
MEASURED_HEADROOM_MB = 384.0
#: Wall-clock budget of the whole profile (compilation, warm-up and timed runs), seconds. The model's own tile is
#: always measured; a larger one only when its predicted time fits what is left.
TOTAL_BUDGET_S = 10.0
#: Timed inferences per size: at least MIN_INFERENCES, and at least MIN_TIMED_S seconds of them unless
#: MAX_INFERENCES came first (a tiny model's median is stable long before half a second of 1 ms inferences).
MIN_INFERENCES = 2
MIN_TIMED_S = 0.5
MAX_INFERENCES = 30
#: Per-voxel time of f32 over bf16/f16 when a profile measured in one is used for a run in the other: the compute
#: floors in issue 14 (OpenVINO's own async queue on the 2-core AMD EPYC: 12-16 Mvox/s bf16, 9-11 f32) -> ~1.4.
#: A constant factor never changes which tiling ranks first; it only scales the predicted seconds.
REDUCED_SPEEDUP = 1.4


@dataclass(frozen=True)
class SpeedProfile:
    """Measured per-voxel cost of a model: ``points`` are (tile voxels, seconds per Mvoxel), ascending voxels."""

    precision: str
    device: str
    cpu: str
    points: tuple[tuple[int, float], ...]
    tiles: tuple[tuple[int, int, int], ...] = ()
    threads: int | None = None

    def s_per_mvox(self, voxels: float) -> float:
        """Seconds per Mvoxel at a tile of ``voxels`` voxels: linear in log(voxels) between measured points,
        the nearest point's value outside them."""
        xs = [math.log(v) for v, _ in self.points]
        ys = [c for _, c in self.points]
        return float(np.interp(math.log(max(1.0, float(voxels))), xs, ys))

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["points"] = [[int(v), float(c)] for v, c in self.points]
        d["tiles"] = [list(t) for t in self.tiles]
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "SpeedProfile | None":
        """The stored profile, or None when absent or malformed (a bad profile is ignored, never an error)."""
        try:
            points = sorted({int(v): float(c) for v, c in data["points"]}.items())
            tiles = tuple(tuple(int(x) for x in t) for t in data.get("tiles", ()))
            prof = cls(str(data["precision"]), str(data.get("device", "CPU")), str(data.get("cpu", "")),
                       tuple(points), tiles, data.get("threads"))  # type: ignore[arg-type]
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        good = points and all(v > 0 and math.isfinite(c) and c > 0 for v, c in points)
        return prof if good else None

    def summary(self, here: str | None = None) -> str:
        """``13.8 Mvox/s at 128³, 14.5 at 208³ (bf16, measured here)``; ``here``: this machine's CPU name."""
        parts = []
        for i, ((v, c), t) in enumerate(zip(self.points, self.tiles or [None] * len(self.points))):
            shape = _shape_text(t, v)
            rate = 1.0 / c
            parts.append(f"{rate:.1f} Mvox/s at {shape}" if i == 0 else f"{rate:.1f} at {shape}")
        where = "measured here" if here is not None and here == self.cpu else f"measured on {self.cpu or '?'}"
        return f"{', '.join(parts)} ({self.precision}, {where})"


def _shape_text(tile: Sequence[int] | None, voxels: int) -> str:
    if tile is None:
        return f"{voxels / 1e6:.2f} Mvox"
    return f"{tile[0]}³" if len(set(tile)) == 1 else "x".join(map(str, tile))


def device_name(core: ov.Core, device: str) -> str:
    """The device's full name as OpenVINO reports it (the CPU's brand string), else /proc/cpuinfo's."""
    try:
        return str(core.get_property(device, "FULL_DEVICE_NAME")).strip()
    except Exception:  # noqa: BLE001 - a name is a label only
        return portable.cpu_model()


def profile_tiles(tile: Sequence[int], multiple: int, fits: Callable[[Sequence[int]], bool] | None = None,
                  largest: float = MAX_EDGE_FACTOR) -> list[tuple[int, ...]]:
    """The tiles to measure, in priority order: ``tile``; the largest one up to ``largest`` x its edges that
    ``fits`` (memory), shrunk one size multiple at a time along its longest axes; the geometric middle of the two.
    All multiples of ``multiple``, distinct."""
    m = max(1, int(multiple))
    first = tuple(int(v) for v in tile)
    big = [max(m, int(round(v * largest / m)) * m) for v in first]
    while fits is not None and not fits(big) and max(big) > m:
        top = max(big)
        big = [max(m, v - m) if v == top else v for v in big]
    out = [first]
    if np.prod(big) > np.prod(first) and (fits is None or fits(big)):
        mid = tuple(max(m, int(round(math.sqrt(a * b) / m)) * m) for a, b in zip(first, big))
        out += [tuple(big)] + ([mid] if mid not in (first, tuple(big)) else [])
    return out


def _time_one(compiled: ov.CompiledModel, x: np.ndarray) -> tuple[float, float]:
    """(warm-up seconds, median seconds of the timed inferences) of one compiled tile."""
    req = compiled.create_infer_request()
    t0 = time.perf_counter()
    req.infer({0: x})
    warm = time.perf_counter() - t0
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_INFERENCES or (time.perf_counter() - start < MIN_TIMED_S
                                           and len(times) < MAX_INFERENCES):
        t = time.perf_counter()
        req.infer({0: x})
        times.append(time.perf_counter() - t)
    return warm, float(np.median(times))


def measure(model: ov.Model, layout: str, channels: int, tiles: Sequence[Sequence[int]], config: dict[str, Any],
            device: str = "CPU", budget_s: float | None = None) -> tuple[dict[int, float], list[tuple[int, ...]]]:
    """Time ``model`` compiled with ``config`` at each tile: the first always, the others while their predicted
    time (from the cheapest per-voxel cost so far) fits what is left of ``budget_s`` (default
    :data:`TOTAL_BUDGET_S`). Returns {voxels: seconds per Mvoxel} and the tiles measured."""
    core = ov.Core()
    deadline = time.perf_counter() + (TOTAL_BUDGET_S if budget_s is None else budget_s)
    points: dict[int, float] = {}
    done: list[tuple[int, ...]] = []
    for tile in tiles:
        vox = int(np.prod(tile))
        if points:  # compile + warm-up + timed runs
            guess = min(points.values()) * vox / 1e6
            if time.perf_counter() + max(3 * guess, guess + MIN_TIMED_S) + 1.0 > deadline:
                continue
        try:
            median = _time_at(core, model, layout, channels, tile, config, device)
        except Exception:  # noqa: BLE001 - a size the model rejects (its size multiple unknown): the others do
            if not points:
                raise
            continue
        points[vox] = median / (vox / 1e6)
        done.append(tuple(int(v) for v in tile))
    return points, done


def _time_at(core: ov.Core, model: ov.Model, layout: str, channels: int, tile: Sequence[int],
             config: dict[str, Any], device: str) -> float:
    """Median seconds of one inference of ``model`` compiled at ``tile`` (after one warm-up)."""
    shape = Layout.of(layout).tensor_shape(channels, tile)
    m = model.clone()
    m.reshape({m.input(0): ov.PartialShape(shape)})
    compiled = core.compile_model(m, device, config)
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    return _time_one(compiled, x)[1]


def profile_model(model: ov.Model, layout: str, channels: int, tile: Sequence[int], multiple: int | None,
                  runtime: dict[str, Any], precision_check: dict[str, Any] | None) -> SpeedProfile:
    """Measure the profile of ``model`` in the precision ``--precision auto`` would run it in (given the stored
    ``precision_check`` verdict). ``multiple``: the size multiple (None: a static input, only ``tile`` is measured).
    ``runtime``: ``device`` (CPU), ``threads``, ``max_memory_mb`` (the conversion's budget; default as for `run`)."""
    device, threads = runtime.get("device") or "CPU", runtime.get("threads")
    core = ov.Core()
    precision, _ = resolve("auto", precision_check, core, device)
    config = CompileOptions(device=device, threads=threads).config(precision)
    per_voxel = activation_bytes_per_voxel(model, layout, channels, tile)  # as the planner predicts memory
    budget = runtime.get("max_memory_mb") or default_budget_mb()
    cap = min(per_voxel * float(np.prod(tile)) / 2**20 + MEASURED_HEADROOM_MB, budget)
    tiles = profile_tiles(tile, multiple, lambda t: per_voxel * float(np.prod(t)) / 2**20 <= cap) if multiple \
        else [tuple(tile)]  # a static input (no size multiple): the planner never changes its tile
    tiles = tiles[:1] + [t for t in tiles[1:] if accepts(model, layout, channels, t)]  # size multiple unknown
    points, done = measure(model, layout, channels, tiles, config, device)
    order = sorted(zip(done, [points[int(np.prod(t))] for t in done]), key=lambda p: int(np.prod(p[0])))
    return SpeedProfile(precision, device, device_name(core, device),
                        tuple((int(np.prod(t)), c) for t, c in order), tuple(t for t, _ in order),  # type: ignore[misc]
                        threads)


def stored(extra: dict[str, Any]) -> SpeedProfile | None:
    """The profile stored in a model's settings (``ModelSettings.extra``), or None."""
    return SpeedProfile.from_dict(extra.get(KEY)) if extra.get(KEY) is not None else None


def voxel_cost(profile: SpeedProfile | None, precision: str, device: str = "CPU",
               here: str | None = None) -> tuple[Callable[[float], float] | None, str]:
    """The planner's per-voxel cost (seconds per voxel at a tile of so many voxels) for a run in ``precision``, and
    where it comes from, in words. None (constant cost) without a usable profile. A profile measured in bf16/f16 is
    scaled by :data:`REDUCED_SPEEDUP` for an f32 run (and back), keeping its shape ratios; between bf16 and f16 there
    is no figure: constant."""
    if profile is None:
        return None, "not measured: per-voxel cost assumed constant"
    where = f"measured at convert on {profile.cpu or '?'}" + (" (this CPU)" if here and here == profile.cpu else "")
    if profile.device.split(".")[0].upper() != device.split(".")[0].upper():
        return None, f"not used: {where} for {profile.device}, the run uses {device}; per-voxel cost assumed constant"
    scale = 1.0
    if profile.precision != precision:
        if "f32" not in (profile.precision, precision):
            return None, (f"not used: {where} in {profile.precision}, the run uses {precision}; per-voxel cost "
                          f"assumed constant")
        scale = REDUCED_SPEEDUP if precision == "f32" else 1.0 / REDUCED_SPEEDUP
        where += f", {profile.precision} scaled x{scale:.2f} for {precision} (shape ratios kept)"
    else:
        where += f", {profile.precision}"

    def cost(voxels: float) -> float:
        return scale * profile.s_per_mvox(voxels) / 1e6

    return cost, where
