"""The layer stream in skewed bands (:mod:`volinfer.model.band_cut`): its plan and its run.

A band streams the whole depth of the volume through every segment, over its own rows of each layer; the rows just
below a band's boundaries (a layer's halo) come from the previous band, written to disk as that band computed them
(:class:`volinfer.io.plane_store.PlaneFile`, one per tensor) and read back into the first rows of the same planes the
band computes its own rows into (:meth:`volinfer.run.stream.PlaneBuffer.hold_strip`): each layer then reads one
region of its input's planes. Segments are compiled per band shape; the middle bands of equal width share theirs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from volinfer.io.plane_store import PlaneFile, PlaneStore
from volinfer.model.band_cut import BandCut, band_graph, cut_bands
from volinfer.model.stream_graph import YAXIS, NotStreamable, StreamGraph, pads_rows_itself
from volinfer.model.tile_model import TileModel
from volinfer.progress import progress_bar
from volinfer.run import stream
from volinfer.run.job import RowProgress, TileJob
from volinfer.run.segment_compile import segment_requests
from volinfer.tiling.geometry import AxisPlan

#: The narrowest band the planner cuts, as output rows x columns (each call's in-plane area): the reference U-Net's
#: calls at the 512² cross-section run at full speed; narrower ones make more, smaller calls.
MIN_BAND_AREA = 512 * 512
#: A band's memory besides what a whole cross-section's plan counts, per MB of rows assembled in its segment calls
#: (:func:`_assembled_bytes`): fitted to seven runs of the reference U-Net, bf16, one process each, volinfer's
#: allocator, bands balanced (the widest a middle band), when OpenVINO still copied each region of several planes
#: into its segment's own request (the sum over segments): 2048³ in 4, 8 and 16 bands (measured 1107, 668, 467 MiB;
#: predicted 1109, 668, 448), 2048x1024x48 in 4 and 8 (662, 444; 667, 447), 2048x2048x32 in 12 and 16 (526, 442;
#: 525, 443). Those copies now go to one scratch buffer (the largest counted, not the sum): 2048x2048x128 in 8, 12
#: and 16 bands measured 620, 503-505 and 449 MiB (12 bands: 545-550 MiB before; predicted 614, 493, 431: up to 4%
#: low, the factor not refitted).
ASSEMBLY_FACTOR = 0.94
#: A skewed band's segment calls take this much longer than a whole cross-section's per voxel (the regions copied
#: in, by OpenVINO when this was measured, by :class:`volinfer.run.stream.Scratch` since): inference 4.48 and 5.13 s
#: in 4 and 8 bands against 4.62 s whole, 1024x1024x64 (one run each).
SKEW_VOXEL_COST = 1.05


@dataclass
class BandPlan:
    """One band: its cut, its graph (tensors holding the band's rows, strips as inputs), chunks, buffers."""

    cut: BandCut
    graph: StreamGraph
    chunks: list[int]
    capacities: dict[str, tuple[int, int]]
    buffers_mb: float
    working_mb: float
    spill: dict[str, stream.Spill]
    strip_bytes: int  # bytes of the strips this band writes for the next one

    @property
    def memory_mb(self) -> float:
        return self.buffers_mb + self.working_mb

    @property
    def spill_traffic(self) -> int:
        return sum(o.traffic_bytes for o in self.spill.values())


@dataclass
class SkewedBands:
    """The bands of a skewed plan, in order, and the output rows they write (``betas``)."""

    betas: list[int]
    bands: list[BandPlan]
    spills: int | None = None  # skip connections each band spills (None: all it can)

    def store_in(self, plan: stream.StreamPlan, precision: str) -> None:
        """:meth:`volinfer.run.stream.StreamPlan.store_in` for ``plan`` (whose bands these are): every band
        re-sized for planes kept in ``precision``."""
        stored = [t.storage for t in plan.graph.tensors.values()]
        plan.graph.store_in(precision if precision in ("bf16", "f16") else "f32")
        if stored == [t.storage for t in plan.graph.tensors.values()]:
            return
        before = plan.memory_mb
        sized: dict[Any, Any] = {}
        self.bands = [_band_plan(plan.graph, b.cut, stream.takes(plan.rows), self.spills, sized) for b in self.bands]
        _set_widest(plan, self)
        if plan.peak_mb is not None:
            plan.peak_mb += plan.memory_mb - before

    def axis(self, size_y: int) -> AxisPlan:
        """The bands as an axis plan: each band's output rows (no margins)."""
        cores = tuple((min(a, size_y), min(b, size_y)) for a, b in zip(self.betas[:-1], self.betas[1:]))
        keep = [i for i, (a, b) in enumerate(cores) if b > a]
        width = max(b - a for a, b in zip(self.betas[:-1], self.betas[1:]))
        return AxisPlan(size=size_y, tile=width, padded=self.betas[-1], starts=tuple(self.betas[i] for i in keep),
                        cores=tuple(cores[i] for i in keep))

    @property
    def spill_bytes(self) -> int:
        return sum(b.spill_traffic for b in self.bands)

    @property
    def strip_bytes(self) -> int:
        return sum(b.strip_bytes for b in self.bands)


def max_bands(tm: TileModel, padded: tuple[int, int, int]) -> int:
    """The most bands the planner cuts ``padded`` into (bands no narrower than :data:`MIN_BAND_AREA`)."""
    rows = max(tm.multiple, -(-MIN_BAND_AREA // padded[0]))
    return max(1, padded[1] // rows)


def plan_skewed(tm: TileModel, shape: tuple[int, int, int], precision: str, count: int,
                spills: int | None = None, graph: StreamGraph | None = None,
                sized: dict[Any, Any] | None = None) -> stream.StreamPlan:
    """Streaming ``shape`` in ``count`` skewed bands of equal width (whole multiples of the model's), each spilling
    its ``spills`` largest skip connections (None: all it can). ``graph``: the model already cut at the padded
    volume and stored in ``precision`` (:func:`_whole_graph`), ``sized``: band sizes already computed, by band shape
    (both shared by the plans the planner weighs). Raises NotStreamable (a model whose windows skewed bands cannot
    cut) or ValueError (bands too narrow for the network's halos)."""
    m = tm.multiple
    padded = tuple(-(-n // m) * m for n in shape)
    graph = graph or _whole_graph(tm, padded, precision)  # type: ignore[arg-type]
    n_out = graph.tensors[graph.output_key].shape[YAXIS]
    width = -(-n_out // count // m) * m if n_out >= count * m else m
    step = max(m, stream.OUT_PLANES // m * m)
    rows = list(stream.plan_axis_crop(shape[2], step, m, 0).cores)
    sized = {} if sized is None else sized  # bands of the same shape (the middle ones) size alike
    betas, bands = _balanced(graph, n_out, count, width, m, stream.takes(rows), spills, sized)
    widest = max(b - a for a, b in zip(betas[:-1], betas[1:]))
    plan = stream.StreamPlan(graph, padded, widest, 0, stream.READ_PLANES, step, rows, [], {}, 0.0,  # type: ignore
                             0.0, skew=SkewedBands(betas, bands, spills))
    _set_widest(plan, plan.skew)
    return plan


def _balanced(graph: StreamGraph, n_out: int, count: int, width: int, m: int, takes: list[tuple[int, int]],
              spills: int | None, sized: dict[Any, Any]) -> tuple[list[int], list[BandPlan]]:
    """Band boundaries and plans: ``count`` bands of ``width`` output rows, the first ``shift`` rows narrower and the
    last as much wider, ``shift`` the least multiple of ``m`` that makes the first band no larger in memory than the
    others. (The first band computes every layer's rows from 0 up to its boundary, which lies ahead of the output's by
    the layers' skew: at equal output rows it holds the most rows at the input's resolution; the last band the
    fewest.) Raises ValueError when no shift gives bands wide enough for the network's halos."""
    best: tuple[float, list[int], list[BandPlan]] | None = None
    error: ValueError | None = None
    for shift in range(0, width, m):
        betas = sorted({0, n_out} | {min(n_out, i * width - shift) for i in range(1, count)})
        try:
            cuts = cut_bands(graph, betas)
        except ValueError as e:  # a first band this narrow is too narrow for the halos
            error = error or e
            break
        bands = [_band_plan(graph, cut, takes, spills, sized) for cut in cuts]
        peak = max(b.memory_mb for b in bands)
        if best is None or peak < best[0]:
            best = (peak, betas, bands)
        if len(bands) < 2 or bands[0].memory_mb <= max(b.memory_mb for b in bands[1:]):
            break  # narrower first bands only widen the last one
    if best is None:
        raise error or ValueError("no bands")
    return best[1], best[2]


def _whole_graph(tm: TileModel, padded: tuple[int, int, int], precision: str) -> StreamGraph:
    """The model cut into segments at the padded volume, its planes stored in ``precision``."""
    graph = stream.stream_graph_for(tm, padded)
    graph.store_in(precision if precision in ("bf16", "f16") else "f32")
    return graph


def _row_bytes(ten: Any) -> int:
    """Bytes of one row (along y) of one stored plane of ``ten``."""
    return ten.plane_bytes // ten.shape[YAXIS]


def _set_widest(plan: stream.StreamPlan, skew: SkewedBands) -> None:
    """The plan's sizes are its most demanding band's; each band's strips for the next counted."""
    bands = skew.bands
    for here, nxt in zip(bands, bands[1:]):
        here.strip_bytes = sum((b - a) * _row_bytes(here.graph.tensors[k]) * here.graph.tensors[k].n
                               for k, (a, b) in nxt.cut.strips.items())
    widest = max(bands, key=lambda b: b.memory_mb)
    plan.chunks, plan.capacities = widest.chunks, widest.capacities
    plan.buffers_mb, plan.working_mb, plan.spill = widest.buffers_mb, widest.working_mb, dict(widest.spill)


def _band_plan(graph: StreamGraph, cut: BandCut, takes: list[tuple[int, int]], spills: int | None,
               sized: dict[Any, Any]) -> BandPlan:
    g = band_graph(graph, cut)
    key = cut.shape_key()
    if key not in sized:
        sized[key] = stream.plan_sizes(g, stream.READ_PLANES, takes)
    chunks, caps, buffers, working, options = sized[key]
    working += ASSEMBLY_FACTOR * _assembled_bytes(g, cut, chunks) / 2**20
    chosen = options if spills is None else options[:spills]
    if stream.SPILL == "never":
        chosen = []
    rows = read_rows(g, cut)
    spill = {o.key: _narrowed(o, g.tensors[o.key], rows, cut.strip_rows(o.key)) for o in chosen}
    saved = sum(o.saved_bytes for o in spill.values()) / 2**20
    return BandPlan(cut, g, chunks, caps, buffers - saved, working, spill, 0)


def read_rows(g: StreamGraph, cut: BandCut) -> dict[tuple[int, int], tuple[int, int]]:
    """The rows ``[lo, hi)`` of its input's held rows each consumer (segment index, input j) reads in band ``cut``."""
    return {(seg.index, j): (ic.lo, ic.hi) for seg, sc in zip(g.segments, cut.segments)
            for j, ic in enumerate(sc.inputs)}


def _narrowed(o: stream.Spill, ten: Any, rows: dict[tuple[int, int], tuple[int, int]], strip: int) -> stream.Spill:
    """Spill option ``o`` writing only the rows its far consumers read, less those of the previous band's strip
    (``strip`` rows), which they read from the strip's file (:meth:`volinfer.run.stream.SpilledBuffer.narrow`):
    less disk, traffic and read-back window."""
    narrow = stream.far_rows(ten, o.far, rows)
    if narrow is None:
        return o
    lo, hi = narrow
    read, written = (hi - lo) / ten.shape[YAXIS], (hi - min(hi, max(lo, strip))) / ten.shape[YAXIS]
    windows = sum(o.far.values()) * ten.plane_bytes
    planes = ten.n * ten.plane_bytes  # the whole tensor's bytes: written once, read once per far consumer
    return replace(o, saved_bytes=o.saved_bytes + int(windows * (1 - read)), disk_bytes=int(o.disk_bytes * written),
                   traffic_bytes=int(planes * (written + len(o.far) * read)))


#: Tests: the planner streams in this many skewed bands (None: as its objective chooses).
FORCE_COUNT: int | None = None
#: Band counts the planner weighs (up to :func:`max_bands`): memory falls with the band's width, in these steps.
COUNTS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def _assembled_bytes(g: StreamGraph, cut: BandCut, chunks: list[int]) -> int:
    """Bytes band ``cut``'s segment calls assemble their inputs and outputs in: inputs with padding rows the anchor
    does not add itself (in each request's own memory), the slot each strip-holding output is computed into (one
    per tensor), and the largest region of several planes one call reads (one plane's rows are read in place),
    copied into the stream's one buffer for it (:class:`volinfer.run.stream.Scratch`)."""
    nodes = {n.get_friendly_name(): n for n in g.model.get_ordered_ops()}
    total, regions = 0, {}
    for seg, sc, t in zip(g.segments, cut.segments, chunks):
        native = pads_rows_itself(nodes.get(seg.anchor), seg)
        for j, ((key, win), ic) in enumerate(zip(seg.inputs, sc.inputs)):
            ten = g.tensors[key]
            planes = win.input_planes(t) if win.kind != "same" else t
            if (ic.pad_before or ic.pad_after) and not (native and j == 0):
                total += planes * _row_bytes(ten) * ic.rows
            if planes > 1 and ic.hi - ic.lo != ten.shape[YAXIS]:
                regions[j] = max(regions.get(j, 0), planes * _row_bytes(ten) * (ic.hi - ic.lo))
        for k in seg.outputs:
            if cut.strip_rows(k) and t > 1:  # (one plane a call is computed in place)
                total += t * _row_bytes(g.tensors[k]) * (cut.own[k][1] - cut.own[k][0])
    return total + sum(regions.values())


def skew_options(tm: TileModel, shape: tuple[int, int, int], precision: str) -> list[stream.StreamPlan]:
    """The skewed plans the planner weighs: :data:`COUNTS` bands up to :func:`max_bands`, each with all, or none,
    of its skip connections spilled; empty for a model skewed bands cannot cut."""
    m = tm.multiple
    padded = tuple(-(-n // m) * m for n in shape)
    counts = [FORCE_COUNT] if FORCE_COUNT else [c for c in COUNTS if c <= max_bands(tm, padded)]  # type: ignore
    if not counts:
        return []
    try:
        graph = _whole_graph(tm, padded, precision)  # type: ignore[arg-type]
    except NotStreamable:
        return []
    out: list[stream.StreamPlan] = []
    sized: dict[Any, Any] = {}
    for count in counts:
        for spills in (0, None):
            try:
                out.append(plan_skewed(tm, shape, precision, count, spills, graph, sized))
            except NotStreamable:
                return []
            except ValueError:
                break
    return out


def run_skewed(source: Any, model: TileModel, plan: stream.StreamPlan, job: TileJob, spec: Any, writer: Any,
               rows: RowProgress = RowProgress()) -> tuple[float, int]:
    """:func:`volinfer.run.stream.run_stream` for a skewed plan: band after band, each writing its own output rows
    (not journaled: a resume starts over). Returns (seconds OpenVINO computed, segment calls)."""
    assert plan.skew is not None
    shape = tuple(source.shape)
    cores = job.grid.axes[2].cores
    bands = plan.skew.bands
    block = np.empty((spec.out_channels, max(b - a for a, b in cores), plan.band, shape[0]), spec.dtype)
    if plan.spill_at is None:
        stream.prepare_spill(plan, None)
    assert plan.spill_at is not None
    store = PlaneStore(*plan.spill_at)  # strips and spilled skip connections
    once = getattr(source, "read_once", None)  # each band reads its own input rows, once
    if once is not None:
        key = bands[0].graph.input_key
        once(max([0] + [a.cut.own[key][1] - b.cut.own[key][0] for a, b in zip(bands, bands[1:])]))
    bar = progress_bar(len(cores) * len(bands), "volinfer", "slab", disable=not rows.progress)
    busy, calls, run = 0.0, 0, None
    strips: dict[str, PlaneFile] = {}  # the previous band's strips, by tensor
    compiled: tuple[Any, list[Any]] | None = None
    try:
        for i, bp in enumerate(bands):
            key = (bp.cut.shape_key(), tuple(bp.chunks))
            if compiled is None or compiled[0] != key:
                compiled = None  # the previous band's segments go before this band's are compiled
                compiled = (key, segment_requests(model, bp.graph, bp.chunks, cuts=bp.cut.segments))
            run = stream.StreamRun(bp.graph, _band_reader(source, model, plan, bp, job), plan.read_planes, bp.chunks,
                                   bp.capacities, compiled[1], (bp.spill, store) if bp.spill else None)
            _hold_strips(run, bp, strips)
            made = _tap_strips(run, bp, bands[i + 1].cut if i + 1 < len(bands) else None, store)
            r0, r1 = bp.cut.output_rows
            ny = max(0, min(r1, shape[1]) - r0)  # (a last band may lie in the padding alone)
            for a, b in cores:
                stream.take_row(run, model, spec, block, (a, b), slice(0, ny), shape[0], ny > 0)
                if ny > 0:
                    writer.write(block[:, : b - a, :ny], a, r0)
                bar.update(1)
            busy, calls = busy + run.busy, calls + run.calls
            run.close()
            run = None
            for f in strips.values():
                f.close()
            strips = made
    finally:
        if once is not None:
            once(None)
        bar.close()
        if run is not None:
            run.close()
        for f in strips.values():
            f.close()
        plan.spill_used = {"written": store.written, "read": store.read_bytes, "seconds": store.seconds,
                           "waited": store.waited, "read_s": store.read_s}
        store.close()
    return busy, calls


def _band_reader(source: Any, model: TileModel, plan: stream.StreamPlan, bp: BandPlan, job: TileJob) -> Any:
    """How band ``bp`` reads the volume: the rows it holds, straight from the source."""
    g = bp.graph
    lo, hi = bp.cut.own[g.input_key]
    reader = stream.band_reader(source, model, replace(plan, graph=g, band=hi - lo), job.normalizer, job.pad_mode,
                                job.nan_fill, y_multiple=1)
    return reader(lo)


def _hold_strips(run: stream.StreamRun, bp: BandPlan, strips: dict[str, PlaneFile]) -> None:
    """Band ``bp``'s tensors hold the previous band's strips (from the files it wrote, ``strips``) before their own
    rows, and each segment reads the region of its inputs' held rows it needs."""
    cut, g = bp.cut, bp.graph
    for key in cut.strips:
        f = strips[key]
        f.settle()
        done = f.written // f.plane_bytes  # the planes the previous band computed: all its readers need
        run.bufs[key].hold_strip(f, cut.strip_rows(key), done, bp.chunks[g.producer[key]])
    run.read_only(read_rows(g, cut))


def _tap_strips(run: stream.StreamRun, bp: BandPlan, nxt: BandCut | None, store: PlaneStore) -> dict[str, PlaneFile]:
    """Write, as ``run`` computes them, the rows of each tensor the next band reads from this one."""
    if nxt is None:
        return {}
    files, forms = {}, {}
    for key, (s0, s1) in nxt.strips.items():
        ten = bp.graph.tensors[key]
        o0 = bp.cut.held(key)[0]
        axis = ten.order.index(YAXIS) - 1  # in stored planes (z first, the batch dropped)
        files[key] = store.open(_row_bytes(ten) * (s1 - s0))
        forms[key] = lambda planes, a=s0 - o0, b=s1 - o0, ax=axis: planes[(slice(None),) * ax + (slice(a, b),)]
    run.tap(files, forms)
    return files
