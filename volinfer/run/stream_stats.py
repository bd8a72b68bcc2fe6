"""Whole-volume statistics of InstanceNorm/GroupNorm layers for the layer-streaming engine.

A normalisation layer reads the mean and variance of its whole input, so it cannot stream as it is; with those two
frozen to constants it becomes a per-channel affine map, which is plane-wise. For each wave of layers (layers whose
upstream normalisations are all frozen, :func:`volinfer.run.norm_stats.waves`), the sub-network that ends at the
wave's inputs is streamed over the whole padded volume (the same volume the run streams, in the same bands of y
rows), and the float64 moments of every input are gathered slab by slab; the wave is then frozen and the next one
streams. Layers of a wave whose inputs have one shape share a pass: their inputs leave it as one tensor
(concatenated over channels).

Checkpointed (:data:`CHECKPOINT`, :mod:`volinfer.run.stats_checkpoint`), each pass streams only its own segment of
the network: the tensors crossing the cut after it (main path and skip connections) are written plane by plane to
disk, in the run's storage precision, per band, and the next pass reads them back as its inputs; the statistics are
gathered exactly as before (float64 moments over the same aligned core rows). Where the disk is short (or the
model's node names are not unique), each pass recomputes its wave's sub-network from the input volume: the passes
then cost the sum of the waves' network prefixes (:func:`statistics_plan` predicts either from the convolutions'
multiply-adds, and the checkpoints' disk and traffic). Compiled segments are shared (:class:`SegmentCache`): on a
MONAI UNet 16-32-64-128 recomputing, 29 segment compilations instead of 123.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from volinfer.model.spatial_norm import Moments, NormLayer, group_view, stat_tensor
from volinfer.model.stream_graph import WINDOW, NotStreamable, Segment, StreamGraph, analyse
from volinfer import portable
from volinfer.io.plane_store import SPACE_MARGIN_MB, spill_location
from volinfer.model.tile_model import TileModel
from volinfer.run.norm_stats import aligned_bounds, freeze_wave, waves
from volinfer.progress import progress_bar
from volinfer.run.stats_checkpoint import (CheckpointStore, Cut, CutPlanner, converter, cut_model, file_reader,
                                           plan_cuts, static_clone, tensor_bytes, unique_names)
from volinfer.run.segment_compile import segment_requests
from volinfer.run.stream import (CHUNK_BYTES, OUT_PLANES, StreamPlan, StreamRun, chunking, traffic_s,
                                 plan_capacities, stream_graph_for)
from volinfer.tiling.geometry import AxisPlan

#: A band reader for a plan (see :func:`volinfer.run.stream.band_reader`): plan -> (band start y -> read).
Reader = Callable[[StreamPlan], Callable[[int], Callable[[int, np.ndarray | None], None]]]


@dataclass(frozen=True)
class StatsPass:
    """Layers of one wave whose inputs have the same shape, and each one's channel count: one streamed pass."""

    layers: tuple[NormLayer, ...]
    channels: tuple[int, ...]


def plan_passes(model: ov.Model, layers: list[NormLayer], input_shape: list[int]) -> list[list[StatsPass]]:
    """The streamed passes, wave by wave: within a wave, one pass per distinct input shape (at ``input_shape``,
    the model's input for the streamed volume)."""
    m = model.clone()
    m.reshape({m.input(0): ov.PartialShape(input_shape)})
    out = []
    for wave in waves(model, layers):
        by_shape: dict[tuple[int, ...], list[tuple[NormLayer, int]]] = {}
        for layer in wave:
            shape = tuple(int(d) for d in stat_tensor(m, layer).get_shape())
            by_shape.setdefault(shape[2:], []).append((layer, shape[1]))
        out.append([StatsPass(tuple(l for l, _ in g), tuple(c for _, c in g)) for g in by_shape.values()])
    return out


#: Statistics passes: "auto" — checkpointed (each pass streams its own segment of the network from the tensors the
#: passes before it left on disk) where the disk has room for the checkpoints, else recomputed from the volume;
#: "never" — recomputed (each pass streams the network's whole prefix from the volume).
CHECKPOINT = "auto"


@dataclass(frozen=True)
class StatsPlan:
    """What the statistics passes are predicted to take: passes, computation in units of one whole run, and for
    checkpointed passes the most disk their checkpoints hold at once and the bytes written and read back."""

    passes: int
    runs: float
    checkpointed: bool = False
    disk_bytes: int = 0
    io_bytes: int = 0

    @property
    def io_s(self) -> float:
        """Predicted seconds of checkpoint traffic, at the rate the checkpoints' size allows
        (:func:`volinfer.run.stream.traffic_s`)."""
        return traffic_s(self.io_bytes, self.disk_bytes)


def statistics_plan(model: ov.Model, layers: list[NormLayer], input_shape: list[int], storage_bytes: int = 4,
                    checkpoint: bool | None = None) -> StatsPlan:
    """The statistics passes at ``input_shape`` (one band: multiply disk and traffic by the bands): recomputing,
    each pass costs the multiply-adds of the convolutions upstream of its layers' inputs, over those of the whole
    network; checkpointed (``checkpoint``, default :data:`CHECKPOINT`), those of the nodes it computes itself, plus
    its checkpoints' traffic (``storage_bytes`` per value: the run's storage precision)."""
    m = model.clone()
    m.reshape({m.input(0): ov.PartialShape(input_shape)})
    cost = {op.get_friendly_name(): _macs(op) for op in m.get_ordered_ops() if op.get_type_name() in WINDOW}
    total = sum(cost.values()) or 1.0
    passes = [p for wave in plan_passes(model, layers, input_shape) for p in wave]
    if checkpoint is None:
        checkpoint = CHECKPOINT != "never" and unique_names(model)
    if not checkpoint:
        spent = sum(sum(cost.get(n, 0.0) for n in _upstream(m, p.layers)) for p in passes)
        return StatsPlan(len(passes), spent / total)
    cuts = plan_cuts(model, [p.layers for p in passes], input_shape)
    peak, io = _traffic(static_clone(model, input_shape), cuts, storage_bytes)
    spent = sum(sum(cost.get(n, 0.0) for n in c.nodes) for c in cuts)
    return StatsPlan(len(passes), spent / total, True, peak, io)


def statistics_cost(model: ov.Model, layers: list[NormLayer], input_shape: list[int]) -> tuple[int, float]:
    """(streamed passes, their computation in units of one whole run): :func:`statistics_plan`."""
    sp = statistics_plan(model, layers, input_shape)
    return sp.passes, sp.runs


def _macs(op: ov.Node) -> float:
    """Multiply-adds of a convolution (or pooling) node at its static shapes: kernel size x the larger of its input
    and output voxel counts."""
    vox = max(float(np.prod(list(op.get_input_shape(0))[2:])), float(np.prod(list(op.get_output_shape(0))[2:])))
    if op.get_input_size() < 2 or op.get_type_name().endswith("Pool"):
        return vox * float(op.get_input_shape(0)[1])
    return vox * float(np.prod(list(op.get_input_shape(1))))


def _upstream(model: ov.Model, layers: tuple[NormLayer, ...]) -> set[str]:
    """Names of every node the inputs of ``layers`` depend on."""
    seen: set[str] = set()
    stack = [stat_tensor(model, layer).get_node() for layer in layers]
    while stack:
        node = stack.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        stack.extend(node.input_value(i).get_node() for i in range(node.get_input_size()))
    return seen


class SegmentCache:
    """Compiled segments shared by the statistics passes: every pass recomputes its wave's prefix, and the prefix's
    segments are the previous passes' segments again (with other node names). A segment is known by what it
    computes: its operations, their attributes and constant operands (by content), how they connect, its windows,
    chunk and the planes' shapes and storage."""

    def __init__(self) -> None:
        self.compiled: dict[str, Any] = {}
        self.hits = 0
        self.used: set[str] = set()  # keys the current pass compiled or reused

    def end_pass(self) -> None:
        """Forget the segments the pass that ended did not use: a compiled segment holds OpenVINO's working copy of
        its inputs (about their size), and 25 passes' worth of them grew a run past its budget (SegResNet at 130³:
        ~100 MB); what a pass shares with the next (a wave's prefix) the pass before used too."""
        for key in set(self.compiled) - self.used:
            del self.compiled[key]
        self.used = set()

    def wrap(self, graph: StreamGraph) -> Callable[[Callable[[Segment, int], Any]], Callable[[Segment, int], Any]]:
        nodes = {n.get_friendly_name(): n for n in graph.model.get_ordered_ops()}
        consts: dict[str, str] = {}

        def wrap(compile_segment: Callable[[Segment, int], Any]) -> Callable[[Segment, int], Any]:
            def cached(seg: Segment, t: int) -> Any:
                key = _signature(graph, seg, t, nodes, consts)
                if key in self.compiled:
                    self.hits += 1
                else:
                    self.compiled[key] = compile_segment(seg, t)
                self.used.add(key)
                return self.compiled[key]
            return cached

        return wrap


def _signature(graph: StreamGraph, seg: Segment, t: int, nodes: dict[str, ov.Node], consts: dict[str, str]) -> str:
    """What ``seg`` computes at chunk ``t``, as a digest independent of node names."""
    h = hashlib.sha256(repr((t, seg.window, seg.pad_value, seg.nodes.index(seg.anchor) if seg.anchor else None))
                       .encode())
    ins = [key for key, _ in seg.inputs]
    for key, win in seg.inputs:
        h.update(repr((win, _tensor_form(graph, key))).encode())
    for key in seg.outputs:
        name, idx = key.rsplit(":", 1)
        h.update(repr((seg.nodes.index(name), idx, _tensor_form(graph, key))).encode())
    local = {name: i for i, name in enumerate(seg.nodes)}
    for name in seg.nodes:
        node = nodes[name]
        h.update(repr((node.get_type_name(), sorted(node.get_attributes().items()),
                       [str(o.get_partial_shape()) + str(o.get_element_type()) for o in node.outputs()])).encode())
        for inp in node.inputs():
            src = inp.get_source_output()
            sname, key = src.get_node().get_friendly_name(), f"{src.get_node().get_friendly_name()}:{src.get_index()}"
            if sname in local:
                h.update(repr(("local", local[sname], src.get_index())).encode())
            elif key in ins:
                h.update(repr(("in", [j for j, k in enumerate(ins) if k == key])).encode())
            else:
                h.update(("const" + _const_digest(src.get_node(), consts)).encode())
    return h.hexdigest()


def _tensor_form(graph: StreamGraph, key: str) -> tuple[Any, ...]:
    ten = graph.tensors[key]
    return ten.plane_shape, ten.storage, ten.channels_last, ten.zaxis, ten.n


def _const_digest(node: ov.Node, memo: dict[str, str]) -> str:
    """Digest of a constant-only subgraph (weights, possibly converted or reshaped) by content."""
    name = node.get_friendly_name()
    if name not in memo:
        h = hashlib.sha256(repr((node.get_type_name(), sorted(node.get_attributes().items()),
                                 [str(o.get_partial_shape()) + str(o.get_element_type()) for o in node.outputs()]))
                           .encode())
        if node.get_type_name() == "Constant":
            h.update(np.ascontiguousarray(node.get_data()).tobytes())
        for i in range(node.get_input_size()):
            h.update(_const_digest(node.input_value(i).get_node(), memo).encode())
        memo[name] = h.hexdigest()
    return memo[name]


def _pass_model(model: ov.Model, spass: StatsPass) -> ov.Model:
    """The sub-network of ``model`` ending at the inputs of ``spass``'s layers, as one output (over channels)."""
    m = model.clone()
    outs = [stat_tensor(m, layer) for layer in spass.layers]
    out = outs[0] if len(outs) == 1 else ops.concat(outs, 1).output(0)
    return ov.Model([ops.result(out)], m.get_parameters(), "norm_stats")


def fit_stream_statistics(tm: TileModel, plan: StreamPlan, layers: list[NormLayer], bands: AxisPlan, reader: Reader,
                          progress: bool = False, info: dict[str, Any] | None = None) -> tuple[ov.Model, int]:
    """A copy of ``tm``'s model with every layer of ``layers`` frozen to the statistics of the whole padded volume,
    gathered by streaming ``plan``'s volume in its ``bands`` of y rows; and the number of streamed passes.
    Checkpointed where :func:`_checkpoints` says so; ``info`` receives what the passes did (``checkpointed``,
    ``calls``, checkpoint bytes ``written``/``read``/``disk_peak``, and a ``note`` when they recomputed)."""
    model = tm.model.clone()
    shape = tm.input_shape_for((plan.padded[0], plan.band, plan.padded[2]))
    schedule = plan_passes(model, layers, shape)
    flat = [p for wave in schedule for p in wave]
    info = {} if info is None else info
    ck = [_checkpoints(tm, plan, flat, bands.count, info)]
    cache = SegmentCache()
    bar = progress_bar(len(flat) * bands.count, "normalisation statistics", "band", disable=not progress)
    info["calls"] = 0
    try:
        k = 0
        for wave in schedule:
            done: list[NormLayer] = []
            moments: list[Moments] = []
            for spass in wave:  # every pass of a wave reads the model before any of the wave is frozen
                k += 1
                moments += _pass_moments((tm, plan, model, shape), spass, flat[k:], ck,
                                         (bands, reader, bar, cache, info))
                cache.end_pass()
                done += spass.layers
            freeze_wave(model, done, moments)
    finally:
        bar.close()
        _stop_checkpoints(ck, info)
    return model, len(flat)


def _pass_moments(run: tuple[TileModel, StreamPlan, ov.Model, list[int]], spass: StatsPass, later: list[StatsPass],
                  ck: list[Any], where: tuple[AxisPlan, Reader, Any, SegmentCache, dict[str, Any]]) -> list[Moments]:
    """One pass, checkpointed while ``ck[0]`` (the store and cut planner) holds: a checkpoint that fails to be
    written or read (a disk filled by something else since the check), or a sub-network the stream cannot cut,
    ends checkpointing, and this pass and the rest recompute from the volume (``info["note"]`` says so)."""
    tm, plan, model, shape = run
    if ck[0] is not None:
        try:
            io = _PassIO.make(ck[0], model, shape, spass, later)
            return _stream_moments(tm, plan, io.sub, spass, where, io)
        except (OSError, NotStreamable) as e:  # the disk; a cut the stream cannot take as inputs
            _stop_checkpoints(ck, where[4])
            where[4].update(checkpointed=False, note=f"statistics passes recompute the network's prefix from the "
                                                     f"pass that failed to use its checkpoints on: {e}")
    return _stream_moments(tm, plan, _pass_model(model, spass), spass, where)


def _stop_checkpoints(ck: list[Any], info: dict[str, Any]) -> None:
    """Delete the checkpoints (``ck[0]``, then None), what they wrote and read in ``info``."""
    if ck[0] is not None:
        store, ck[0] = ck[0][0], None
        info.update(written=store.written, read=store.read_bytes, disk_peak=store.peak)
        store.close()


def _checkpoints(tm: TileModel, plan: StreamPlan, flat: list[StatsPass], bands: int,
                 info: dict[str, Any]) -> tuple[CheckpointStore, CutPlanner] | None:
    """The store and cut planner of checkpointed passes; None (recompute, ``info["note"]`` saying why where it is
    not the setting) when :data:`CHECKPOINT` rules them out, the model's node names are not unique, or the disk
    holding the run's spill files has no room for the predicted checkpoints (with the spill's margin)."""
    info["checkpointed"] = False
    if CHECKPOINT == "never" or len(flat) < 2:
        return None
    if not unique_names(tm.model):
        info["note"] = "statistics passes recompute the network's prefix (node names are not unique: no checkpoints)"
        return None
    directory, prefix = plan.spill_at or tuple(map(str, spill_location(None)))
    storage = 2 if tm.precision in ("bf16", "f16") else 4
    shape = tm.input_shape_for((plan.padded[0], plan.band, plan.padded[2]))
    need = _traffic(static_clone(tm.model, shape), plan_cuts(tm.model, [p.layers for p in flat], shape),
                    storage)[0] * bands
    free = portable.disk_free(directory)
    if free is not None and free < need + SPACE_MARGIN_MB * 2**20:
        info["note"] = (f"statistics passes recompute the network's prefix: their checkpoints need "
                        f"{need / 2**20:.0f} MB of disk (+{SPACE_MARGIN_MB:.0f} MB kept free) in {directory}, "
                        f"which has {free / 2**20:.0f} MB free")
        return None
    info["checkpointed"] = True
    return CheckpointStore(directory, prefix), CutPlanner()


def _traffic(m: ov.Model, cuts: list[Cut], storage: int) -> tuple[int, int]:
    """(the most bytes the checkpoints hold at once, bytes written and read back) of ``cuts`` in ``m`` (static
    shapes), ``storage`` bytes a value."""
    size = {t: tensor_bytes(m, t, storage) for c in cuts for t in c.writes}
    disk: set = set()
    peak = io = 0
    for c in cuts:
        peak = max(peak, sum(size[t] for t in disk | set(c.writes)))
        io += sum(size[t] for t in c.reads) + sum(size[t] for t in c.writes)
        disk = (disk | set(c.writes)) - set(c.drops)
    return peak, io


@dataclass
class _PassIO:
    """A checkpointed pass: its sub-network (inputs: the tensors it reads from disk, or the volume; outputs: its
    layers' inputs, then the tensors it writes), its cut, and the run's store."""

    sub: ov.Model
    cut: Cut
    store: CheckpointStore

    @staticmethod
    def make(ck: tuple[CheckpointStore, CutPlanner], model: ov.Model, shape: list[int], spass: StatsPass,
             later: list[StatsPass]) -> "_PassIO":
        m = static_clone(model, shape)
        cut = ck[1].cut(m, [stat_tensor(m, layer) for layer in spass.layers],
                        [stat_tensor(m, layer) for p in later for layer in p.layers])
        return _PassIO(cut_model(m, spass.layers, cut), cut, ck[0])

    def inputs(self, graph: StreamGraph, read_planes: int) -> int | dict[str, int]:
        """Store ``graph``'s inputs as their checkpoints are stored; the planes each is read in (the volume: as the
        run reads it; checkpoints: up to :data:`volinfer.run.stream.CHUNK_BYTES` a read)."""
        if not self.cut.reads:
            return read_planes
        steps = {}
        for key, tid in zip(graph.inputs, self.cut.reads, strict=True):
            ck, ten = self.store.files[(0, tid)], graph.tensors[key]
            ten.storage, ten.channels_last = ck.storage, ck.channels_last
            steps[key] = max(1, min(read_planes, CHUNK_BYTES // ten.plane_bytes))
        return steps

    def band(self, run: StreamRun, graph: StreamGraph, i: int, storage: str) -> None:
        """Band ``i``'s run writes this pass's checkpoints, as the run stores planes between segments
        (``storage``, channels last): the pass's own output, kept float32 for its statistics, converted."""
        files, forms = {}, {}
        for key, tid in zip(graph.keep, self.cut.writes):
            ten = graph.tensors[key]
            if key == graph.output_key:
                stored = replace(ten, storage=storage, channels_last=True)
                forms[key] = converter(ten, stored)
                ten = stored
            files[key] = self.store.open(i, tid, ten)
        run.tap(files, forms)

    def reads(self, graph: StreamGraph, i: int) -> dict[str, Any]:
        return {key: file_reader(self.store.files[(i, tid)]) for key, tid in zip(graph.inputs, self.cut.reads)}

    def finish(self) -> None:
        """After the pass's last band: its checkpoints written, those no later pass reads deleted."""
        self.store.settle()
        self.store.drop(self.cut.drops)


def _stream_moments(tm: TileModel, plan: StreamPlan, sub: ov.Model, spass: StatsPass,
                    where: tuple[AxisPlan, Reader, Any, SegmentCache, dict[str, Any]],
                    io: _PassIO | None = None) -> list[Moments]:
    """Stream ``sub`` over every band and gather the moments of each of ``spass``'s layers over the band's aligned
    core rows (together: the whole padded volume at that layer's resolution). ``io``: a checkpointed pass."""
    bands, reader, bar, cache, info = where
    graph = analyse(sub, None if io else tm.input_shape_for((plan.padded[0], plan.band, plan.padded[2])), 4,
                    same_size=False, keep=tuple(range(1, len(sub.outputs))))
    storage = tm.precision if tm.precision in ("bf16", "f16") else "f32"
    graph.store_in(storage)
    steps = plan.read_planes if io is None else io.inputs(graph, plan.read_planes)
    out = graph.tensors[graph.output_key]
    step = max(1, OUT_PLANES * out.n // plan.padded[2])
    rows = [(a, min(a + step, out.n)) for a in range(0, out.n, step)]
    chunks = chunking(graph)
    sub_plan = replace(plan, graph=graph, rows=rows, chunks=chunks,
                       capacities=plan_capacities(graph, steps, rows, chunks))
    requests = segment_requests(tm, graph, chunks, cache.wrap(graph))
    read = reader(sub_plan) if io is None or not io.cut.reads else None
    bounds = np.cumsum((0,) + spass.channels)
    moments = [Moments() for _ in spass.layers]
    for i, (sy, (lo, hi)) in enumerate(zip(bands.starts, aligned_bounds(bands, tm.multiple))):
        y0, y1 = _rows_at(graph, plan.band, lo - sy, hi - sy)
        run = StreamRun(graph, read(sy) if read is not None else io.reads(graph, i),  # type: ignore[union-attr]
                        steps, chunks, sub_plan.capacities, requests)
        if io is not None:
            io.band(run, graph, i, storage)
        for a, b in rows:
            view = out.model_view(run.take(a, b - a))[:, :, :, y0:y1]  # (1, C, x, y rows, planes)
            for k, layer in enumerate(spass.layers):
                block, axes = group_view(view[:, bounds[k]: bounds[k + 1]], layer)
                moments[k].add(block, axes)
            run.done(b)
        info["calls"] += run.calls
        bar.update(1)
    if io is not None:
        io.finish()
    return moments


def _rows_at(graph: StreamGraph, band: int, lo: int, hi: int) -> tuple[int, int]:
    """Band-local padded rows [lo, hi) at the resolution of ``graph``'s output (y is its axis 3)."""
    rows = graph.tensors[graph.output_key].shape[3]
    ratio = band // rows
    if ratio * rows != band or lo % ratio or hi % ratio:
        raise NotStreamable(f"a normalisation layer's input has {rows} rows for a band of {band}: no whole-voxel "
                            f"correspondence to gather its statistics over")
    return lo // ratio, hi // ratio



def frozen_plan(plan: StreamPlan, frozen: TileModel) -> StreamPlan:
    """``plan`` (made with placeholder statistics, :func:`volinfer.model.spatial_norm.frozen_like`) streaming the
    model with its real statistics: the same graph structure, so the same tensors, buffers and chunking."""
    graph = stream_graph_for(frozen, (plan.padded[0], plan.band, plan.padded[2]))
    if set(graph.tensors) != set(plan.capacities):
        raise RuntimeError("the model with frozen statistics cuts into other segments than planned")
    for key, ten in graph.tensors.items():  # stored as planned: the chunks and buffers were sized for that
        old = plan.graph.tensors[key]
        ten.storage, ten.channels_last = old.storage, old.channels_last
    return replace(plan, graph=graph)
