"""The layer-streaming engine: whole-volume inference computed slab by slab along z, every voxel of every layer once.

The model is cut into segments (:mod:`volinfer.model.stream_graph`), each compiled once at a static number of
planes. Every streamed tensor lives in a :class:`PlaneBuffer` holding only the planes some consumer still needs.
Computation is pulled from the output: writing output planes [a, a+t) asks the last segment for them, which asks its
inputs for the planes its window reads, and so on down to the reader. A convolution therefore keeps ``k - 1`` planes
of its input, a skip connection keeps the planes its decoder has not reached yet, and nothing is ever recomputed.
The result is whole-volume inference on the padded volume (the same padding rule as tiling, see
:mod:`volinfer.tiling.geometry`), with memory that grows with the cross-section, not the volume.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import openvino as ov

from volinfer import portable
from volinfer.progress import progress_bar

from volinfer.io.plane_store import JoinedPlanes, PlaneFile, PlaneStore, PlaneWindow, check_space, spill_location
from volinfer.model.stream_graph import YAXIS, NotStreamable, Segment, StreamGraph, StreamTensor, analyse
from volinfer.model.tile_model import TileModel
from volinfer.run.feeder import TileFeeder
from volinfer.run.fidelity import LEANER_WITHIN, leanest_near_fastest
from volinfer.run.job import RowProgress, TileJob
from volinfer.run.segment_compile import segment_requests
from volinfer.tiling.geometry import AxisPlan, Tile, TileGrid, plan_axis_crop

#: What a :class:`StreamRun` reads its inputs with: for each input, (first plane, slot of the planes to fill, or None
#: in a dry run) -> None; one function alone reads the graph's (only) input.
Reads = Callable[[int, np.ndarray | None], None] | dict[str, Callable[[int, np.ndarray | None], None]]

#: Bytes of output one segment call aims at: large enough for OpenVINO to use every core, small enough to keep the
#: planes in flight few.
CHUNK_BYTES = 1 << 20


class PlaneBuffer:
    """Planes [lo, hi) of one streamed tensor, z-first, in a ring of ``capacity`` planes followed by ``mirror``
    planes that repeat the ring's first ones. Writes start on multiples of the producer's chunk, which divides the
    capacity, so a written slot never wraps; the mirror makes every consumer's window (at most ``mirror + 1``
    planes) one contiguous view wherever it starts. Nothing is ever shifted; only the few planes at the ring's
    start are copied once, into the mirror."""

    def __init__(self, ten: StreamTensor, capacity: int, mirror: int = 0, allocate: bool = True) -> None:
        self.n, self.plane_shape, self.capacity, self.mirror, self.ten = ten.n, ten.plane_shape, capacity, mirror, ten
        self.arr = np.empty((capacity + mirror, *self.plane_shape), ten.np_dtype) if allocate else None
        self.lo = self.hi = 0
        self.need = 0  # the most planes [lo, end of a write) this buffer had to hold (dry runs size buffers with it)
        self.tap: PlaneFile | None = None  # a checkpoint file every committed plane is also written to
        self.tap_form: Callable[[np.ndarray], np.ndarray] | None = None  # planes as the file keeps them
        self.strip: tuple[PlaneFile, int, int] | None = None  # see hold_strip
        self.staging: np.ndarray | None = None

    def hold_strip(self, file: PlaneFile, rows: int, planes: int, chunk: int) -> None:
        """Skewed bands: each plane holds first ``rows`` rows of the previous band's strip (read from ``file``,
        which holds its first ``planes`` planes: the rest no layer reads), then the rows the producer computes
        (``chunk`` planes at a time: in place for one plane a call, else into a slot of their own, copied in as they
        are committed). Planes are stored rows-first (y the outermost axis of a plane): a plane's strip rows, and its
        own rows, are each one contiguous run."""
        if self.ten.order[2] != YAXIS:
            raise RuntimeError(f"{self.ten.key}: planes not stored rows-first")
        self.strip = (file, rows, planes)
        if self.arr is not None and chunk > 1:
            self.staging = np.empty((chunk, self.plane_shape[0] - rows, *self.plane_shape[1:]), self.arr.dtype)

    def reserve(self, a: int, t: int) -> np.ndarray | None:
        """The slot for planes [a, a+t), the next ones after ``hi``."""
        if a != self.hi:
            raise RuntimeError(f"planes written out of order ({a} after {self.hi})")
        if self.tap is not None:
            self.tap.settle()  # planes being written to the checkpoint stay as they are until written
        self.need = max(self.need, a + t - self.lo)
        if self.arr is None:
            return None
        p = a % self.capacity
        if a + t - self.lo > self.capacity or p + t > self.capacity:
            raise RuntimeError(f"plane buffer too small: {a + t - self.lo} planes needed, {self.capacity} held")
        if self.strip is None:
            return self.arr[p: p + t]
        if t == 1:  # one plane's own rows are contiguous: computed in place
            return self.arr[p: p + 1, self.strip[1]:]
        return self.staging[:t]  # type: ignore[index]

    def commit(self, a: int, t: int) -> None:
        if self.arr is not None and self.strip is not None:
            self._fill(a, t)
        if self.arr is not None and self.mirror:
            p = a % self.capacity
            if p < self.mirror:
                e = min(p + t, self.mirror)
                self.arr[self.capacity + p: self.capacity + e] = self.arr[p:e]
        self.hi = min(a + t, self.n)
        if self.tap is not None and self.arr is not None and self.hi > a:
            p = a % self.capacity
            planes = self.arr[p: p + self.hi - a]
            self.tap.write_behind(a, planes if self.tap_form is None else self.tap_form(planes))

    def _fill(self, a: int, t: int) -> None:
        """Planes [a, a+t) of a buffer holding strips: the producer's rows copied in after the strip's, read."""
        assert self.arr is not None and self.strip is not None
        file, rows, planes = self.strip
        p = a % self.capacity
        if t > 1:
            self.arr[p: p + t, rows:] = self.staging[:t]  # type: ignore[index]
        for i in range(a, min(a + t, planes)):
            file.read(i, self.arr[p + i - a, :rows])

    def view(self, lo: int, hi: int, who: Any = None) -> np.ndarray:
        """Planes [lo, hi): a view (a copy only for a window longer than the mirror allows, across the ring's
        end). ``who``: the consumer asking (a spilled buffer serves far consumers from disk)."""
        if lo < self.lo or hi > self.hi:
            raise RuntimeError(f"planes [{lo}, {hi}) requested, [{self.lo}, {self.hi}) held")
        assert self.arr is not None
        p = lo % self.capacity
        if p + hi - lo <= self.capacity + self.mirror:
            return self.arr[p: p + hi - lo]
        return np.concatenate((self.arr[p: self.capacity], self.arr[: p + hi - lo - self.capacity]))

    def shape_for(self, who: Any) -> tuple[int, ...]:
        """The shape of a plane :meth:`view` gives consumer ``who``."""
        return self.plane_shape

    def release(self, lo: int) -> None:
        """Planes below ``lo`` are no longer needed."""
        self.lo = max(self.lo, min(lo, self.hi))

    def release_to(self, needs: dict[Any, int]) -> None:
        """Every consumer's lowest plane still needed (``needs``): the planes below all of them go."""
        if needs:
            self.release(min(needs.values()))

    def close(self) -> None:
        pass


class SpilledBuffer(PlaneBuffer):
    """A :class:`PlaneBuffer` whose far consumers (a skip connection's decoder end) read from disk: every committed
    plane is written once to ``file``; the ring keeps only what the producer writes and the near consumers read
    (``capacity`` planes), and each far consumer reads its planes back, in order, into a small window of its own
    (:class:`volinfer.io.plane_store.PlaneWindow`, read-ahead included). RAM: the ring and the windows, whatever the
    distance between producer and far consumers."""

    def __init__(self, ten: StreamTensor, spill: "Spill", store: PlaneStore) -> None:
        super().__init__(ten, spill.capacity, spill.mirror)
        self.store, self.far, self.file_planes = store, spill.far, spill.file_planes
        self.rows: tuple[int, int] | None = None  # see narrow
        self.disk_rows: tuple[int, int] | None = None
        self._open(ten.plane_shape)

    def _open(self, disk_plane: tuple[int, ...], from_strip: tuple[int, int] = (0, 0)) -> None:
        """The spill file, of planes ``disk_plane``; the far consumers' windows read rows ``from_strip`` (of the
        rows they read, the first) from the strip's file, the rest from the spill file."""
        self.file = self.store.open(int(np.prod(disk_plane)) * np.dtype(self.ten.np_dtype).itemsize, self.file_planes)
        source: PlaneFile | JoinedPlanes = self.file
        if from_strip[1] > from_strip[0]:
            assert self.strip is not None
            file, _, planes = self.strip
            source = JoinedPlanes(file, from_strip[0], from_strip[1] - from_strip[0], planes,
                                  self.file if disk_plane[0] else None)
        self.windows = {who: PlaneWindow(source, self.shape_for(who), self.ten.np_dtype, planes)
                        for who, planes in self.far.items()}

    def narrow(self, rows: tuple[int, int]) -> None:
        """Before any plane is written: far consumers read only rows ``[lo, hi)`` of each plane (rows-first planes;
        skewed bands: a skip connection's decoder end reads its own band's rows, not the rows the encoder computes
        ahead for the next band), and from disk. Only those rows go to disk; where the buffer holds the previous
        band's strip (:meth:`PlaneBuffer.hold_strip`), the strip's rows among them are read from the strip's file,
        which holds them already, and only the rows after them are written."""
        self.file.close()
        lo, hi = self.rows = rows
        s = min(hi, max(lo, self.strip[1])) if self.strip is not None else lo  # [lo, s): the strip's rows
        self.disk_rows = (s, hi)
        self._open((hi - s, *self.plane_shape[1:]), (lo, s))

    def reserve(self, a: int, t: int) -> np.ndarray | None:
        self.file.settle()  # the ring's planes being written to disk stay as they are until written
        return super().reserve(a, t)

    def commit(self, a: int, t: int) -> None:
        super().commit(a, t)
        assert self.arr is not None
        p = a % self.capacity
        planes = self.arr[p: p + self.hi - a]
        if self.disk_rows is None:
            self.file.write_behind(a, planes)
        elif self.disk_rows[1] > self.disk_rows[0]:
            self.file.write_behind(a, planes[:, self.disk_rows[0]: self.disk_rows[1]])

    def shape_for(self, who: Any) -> tuple[int, ...]:
        if who in self.far and self.rows is not None:
            return (self.rows[1] - self.rows[0], *self.plane_shape[1:])
        return self.plane_shape

    def view(self, lo: int, hi: int, who: Any = None) -> np.ndarray:
        if who in self.windows and (lo < self.lo or self.rows is not None):  # gone from the ring: from disk
            if hi > self.hi:
                raise RuntimeError(f"planes [{lo}, {hi}) requested, {self.hi} written")
            return self.windows[who].get(lo, hi, self.hi)
        return super().view(lo, hi)

    def release_to(self, needs: dict[Any, int]) -> None:
        near = [v for who, v in needs.items() if who not in self.windows]
        self.release(min(near) if near else self.hi)

    def close(self) -> None:
        self.file.close()


@dataclass
class _Seg:
    """A segment at run time: its chunk size, next output plane, compiled model and request."""

    seg: Segment
    t: int
    next: int = 0
    request: Any = None


#: Input planes one call may cover, whatever the segment's resolution: deep (down-sampled) levels computed in big
#: chunks would make every skip connection above them wait, holding that many planes.
CHUNK_SPAN = 8


def chunk_planes(graph: StreamGraph, seg: Segment, chunk_bytes: int | None = None, span: int | None = None) -> int:
    """Output planes per call of ``seg``: about ``chunk_bytes`` of output (default :data:`CHUNK_BYTES`) and at most
    ``span`` input-resolution planes (default :data:`CHUNK_SPAN`), a multiple of the window's alignment. Depends on
    how the planes are stored (bf16 planes are half the bytes): a plan fixes its chunks once (:func:`chunking`)."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    span = CHUNK_SPAN if span is None else span
    out = graph.tensors[seg.outputs[0]]
    m = seg.window.chunk_multiple()
    scale = max(1.0, max(graph.tensors[k].n for k in graph.inputs) / out.n)
    t = max(1, int(round(chunk_bytes / max(1, sum(graph.tensors[k].plane_bytes for k in seg.outputs)))))
    t = min(t, max(1, int(span // scale)))
    t = max(m, t // m * m)
    return min(t, -(-out.n // m) * m)


def chunking(graph: StreamGraph, chunk_bytes: int | None = None, span: int | None = None) -> list[int]:
    """Every segment's output planes per call (:func:`chunk_planes`), in segment order."""
    return [chunk_planes(graph, s, chunk_bytes, span) for s in graph.segments]


class StreamRun:
    """One streamed pass of a volume through a :class:`StreamGraph` (``compute=False``: bookkeeping only, to size
    the buffers)."""

    def __init__(self, graph: StreamGraph, read: Reads, read_planes: int | dict[str, int],
                 chunks: list[int], capacities: dict[str, tuple[int, int]] | None = None,
                 requests: list[Any] | None = None, spill: tuple[dict[str, "Spill"], PlaneStore] | None = None
                 ) -> None:
        self.g = graph
        self.reads = read if isinstance(read, dict) else {graph.input_key: read}  # per input (one: the volume)
        self.read_t = read_steps(graph, read_planes)
        self.compute = capacities is not None
        self.segs = [_Seg(s, t) for s, t in zip(graph.segments, chunks, strict=True)]
        spilled, store = spill or ({}, None)
        caps = {**(capacities or {k: (1 << 40, 0) for k in graph.tensors}),
                **{k: (sp.capacity, sp.mirror) for k, sp in spilled.items()}}
        for k, (cap, _) in (caps if capacities else {}).items():  # writes start on multiples of the producer's chunk
            step = self.read_t[k] if k in self.read_t else chunks[graph.producer[k]] if k in graph.producer else 1
            if cap % step:
                raise RuntimeError(f"buffer of {k} holds {cap} planes, not whole chunks of {step}")
        self.bufs = {k: PlaneBuffer(t, *caps[k], allocate=self.compute) for k, t in graph.tensors.items()
                     if k not in spilled or store is None}
        self.bufs.update({k: SpilledBuffer(graph.tensors[k], sp, store)
                          for k, sp in spilled.items() if store is not None})
        self.held: dict[str, dict[tuple[int, int], int]] = {k: {} for k in graph.tensors}  # see plan_capacities
        self.read_rows: dict[tuple[int, int], tuple[int, int]] = {}  # see read_only
        self.busy = 0.0
        self.calls = 0
        self.scratch = Scratch()
        # each consumer's lowest plane still needed, per tensor: (segment index, input j) -> plane
        self.needs: dict[str, dict[tuple[int, int], int]] = {k: {} for k in graph.tensors}
        for rs in self.segs:
            for j, (key, win) in enumerate(rs.seg.inputs):
                self.needs[key][(rs.seg.index, j)] = win.input_range(0, rs.t)[0]
        self.needs[graph.output_key][(-1, 0)] = 0
        for i, k in enumerate(graph.keep):  # kept tensors: written out (checkpoints) as they are computed
            self.needs[k][(-2, i)] = 0
        if self.compute:
            assert requests is not None
            for rs, req in zip(self.segs, requests):
                rs.request = req

    def pull(self, key: str, upto: int) -> None:
        """Compute tensor ``key`` up to plane ``upto`` (exclusive; clipped to its length)."""
        buf = self.bufs[key]
        upto = min(upto, buf.n)
        while buf.hi < upto:
            if key in self.reads:
                a, t = buf.hi, self.read_t[key]
                self._track(key, a, t)
                slot = buf.reserve(a, t)
                self.reads[key](a, slot)
                buf.commit(a, t)
            else:
                self._step(self.segs[self.g.producer[key]])

    def _step(self, rs: _Seg) -> None:
        a, t, seg = rs.next, rs.t, rs.seg
        ranges = [win.input_range(a, t) for _, win in seg.inputs]
        for (key, _), (lo, hi) in zip(seg.inputs, ranges):
            self.pull(key, hi)
        for k in seg.outputs:
            self._track(k, a, t)
        slots = [self.bufs[k].reserve(a, t) for k in seg.outputs]
        if self.compute:
            req = rs.request
            inputs = [self._gather(key, lo, hi, seg.pad_value if seg.anchor is not None and j == 0 else 0.0,
                                   (seg.index, j))
                      for j, ((key, _), (lo, hi)) in enumerate(zip(seg.inputs, ranges))]  # alive until infer returns
            for j, ((key, _), data) in enumerate(zip(seg.inputs, inputs)):
                req.set_input_tensor(j, _region(data, self.read_rows.get((seg.index, j)), self.g.tensors[key],
                                                self.scratch.dense(j)))
            for j, arr in enumerate(seg.window.call_inputs(a, t), len(seg.inputs)):  # an interpolation's planes
                req.set_input_tensor(j, ov.Tensor(arr))
            for j, (k, slot) in enumerate(zip(seg.outputs, slots)):
                req.set_output_tensor(j, _tensor(slot, self.g.tensors[k]))
            t0 = time.perf_counter()
            req.infer(share_outputs=True)  # (outputs already in the slots: no copies returned)
            self.busy += time.perf_counter() - t0
            self.calls += 1
        for k in seg.outputs:
            self.bufs[k].commit(a, t)
        rs.next += t
        for j, (key, win) in enumerate(seg.inputs):
            self.needs[key][(seg.index, j)] = win.input_range(rs.next, t)[0]
            self._release(key)

    def _gather(self, key: str, lo: int, hi: int, pad: float, who: tuple[int, int]) -> np.ndarray:
        """Planes [lo, hi) of ``key`` for consumer ``who``: a view of its buffer, or (at the volume's ends) a copy
        with padding planes, made for this call only."""
        buf = self.bufs[key]
        if lo >= 0 and hi <= buf.n:
            return buf.view(lo, hi, who)
        scratch = np.full((hi - lo, *buf.shape_for(who)), _bits(pad, buf.ten), buf.ten.np_dtype)
        a, b = max(lo, 0), min(hi, buf.n)
        if b > a:
            scratch[a - lo: b - lo] = buf.view(a, b, who)
        return scratch

    def _release(self, key: str) -> None:
        self.bufs[key].release_to(self.needs[key])

    def _track(self, key: str, a: int, t: int) -> None:
        """Dry runs: the most planes each consumer of ``key`` keeps held when planes [a, a+t) are written."""
        if self.compute:
            return
        held = self.held[key]
        for who, need in self.needs[key].items():
            held[who] = max(held.get(who, 0), a + t - max(0, min(need, a)))

    def close(self) -> None:
        """Close (and delete) the spill files of this pass."""
        for buf in self.bufs.values():
            buf.close()

    def read_only(self, rows: dict[tuple[int, int], tuple[int, int]]) -> None:
        """Skewed bands: consumer (segment index, input j) reads only rows ``[lo, hi)`` of its input's planes (in place
        for one plane a call, else copied into the run's :class:`Scratch`: see :func:`_region`). A spilled buffer
        writes to disk only the rows its far consumers read (:meth:`SpilledBuffer.narrow`), which they then read at
        offset 0."""
        self.read_rows = dict(rows)
        for buf in self.bufs.values():
            narrow = far_rows(buf.ten, buf.far, rows) if isinstance(buf, SpilledBuffer) else None
            if narrow is not None:
                buf.narrow(narrow)
                for who in buf.far:
                    lo, hi = self.read_rows[who]
                    self.read_rows[who] = (lo - narrow[0], hi - narrow[0])

    def tap(self, files: dict[str, PlaneFile],
            forms: dict[str, Callable[[np.ndarray], np.ndarray]] | None = None) -> None:
        """Write every plane of these kept tensors (:attr:`StreamGraph.keep`) to its file as it is computed
        (``forms``: converted first, e.g. to another storage or layout)."""
        for key, f in files.items():
            self.bufs[key].tap = f
            self.bufs[key].tap_form = (forms or {}).get(key)

    def take(self, a: int, t: int) -> np.ndarray | None:
        """Output planes [a, a+t) (z-first), computed as needed; the caller then calls :meth:`done` with ``a+t``.
        Kept tensors are computed alongside, as far as the output's (their whole length with its last planes)."""
        key = self.g.output_key
        self.pull(key, a + t)
        n = self.bufs[key].n
        for i, k in enumerate(self.g.keep):
            buf = self.bufs[k]
            self.pull(k, buf.n if a + t >= n else -(-(a + t) * buf.n // n))
            self.needs[k][(-2, i)] = buf.hi
            self._release(k)
        return self.bufs[key].view(a, min(a + t, self.bufs[key].n)) if self.compute else None

    def done(self, upto: int) -> None:
        self.needs[self.g.output_key][(-1, 0)] = upto
        self._release(self.g.output_key)


def read_steps(graph: StreamGraph, read_planes: int | dict[str, int]) -> dict[str, int]:
    """Planes each input of ``graph`` is read in: ``read_planes`` (one count for every input, or per input)."""
    if isinstance(read_planes, dict):
        return {k: read_planes[k] for k in graph.inputs}
    return {k: read_planes for k in graph.inputs}


def _tensor(arr: np.ndarray, ten: StreamTensor) -> ov.Tensor:
    """``arr`` shared with OpenVINO (bf16 planes are kept as uint16 bits)."""
    if ten.storage == "bf16":
        return ov.Tensor(arr, [1, *arr.shape], ov.Type.bf16)
    return ov.Tensor(arr[None], shared_memory=True)


class Scratch:
    """Dense copies made for one call at a time, one growing buffer per use: a region of several planes handed to
    OpenVINO as a region (ROI) tensor is copied into memory each infer request keeps for itself (every segment its
    own), so the copies are made here, into memory every segment shares."""

    def __init__(self) -> None:
        self.bufs: dict[Any, np.ndarray] = {}

    def dense(self, use: Any) -> Callable[[np.ndarray], np.ndarray]:
        """A function copying an array into this scratch's buffer for ``use`` (valid until its next copy)."""
        def copy(view: np.ndarray) -> np.ndarray:
            buf = self.bufs.get(use)
            if buf is None or buf.nbytes < view.nbytes:
                self.bufs.pop(use, None)  # (the smaller buffer goes before the larger one is made)
                buf = self.bufs[use] = np.empty(view.nbytes, np.uint8)
            out = buf[: view.nbytes].view(view.dtype).reshape(view.shape)
            np.copyto(out, view)
            return out
        return copy


def _region(planes: np.ndarray, rows: tuple[int, int] | None, ten: StreamTensor,
            dense: Callable[[np.ndarray], np.ndarray]) -> ov.Tensor:
    """Rows ``[lo, hi)`` (along y; None: all) of ``planes`` (z-first, ``ten``'s stored planes) shared with OpenVINO.

    Where those rows lie in one piece of memory (all rows, or one plane: rows are outermost in a stored plane) the
    tensor shares them; otherwise they are copied with ``dense`` (:class:`Scratch`) into one piece."""
    axis = ten.order.index(YAXIS) - 1
    if rows is None or rows == (0, planes.shape[axis]):
        return _tensor(planes, ten)
    view = planes[(slice(None),) * axis + (slice(*rows),)]
    return _tensor(view if view.flags.c_contiguous else dense(view), ten)


def _bits(value: float, ten: StreamTensor) -> Any:
    """``value`` as stored for ``ten``."""
    if ten.storage == "bf16":
        return np.array([value], np.float32).view(np.uint32)[0] >> 16
    return ten.np_dtype(value)


def _no_read(a: int, slot: np.ndarray | None) -> None:
    pass


def plan_capacities(graph: StreamGraph, read_planes: int | dict[str, int], rows: list[tuple[int, int]],
                    chunks: list[int], spill: list["Spill"] | None = None) -> dict[str, tuple[int, int]]:
    """(ring planes, mirror planes) of each buffer: the planes it must hold, from a bookkeeping-only pass over the
    whole volume written in ``rows`` (the output plane ranges the run will take, in order) with the segments
    computing ``chunks`` planes per call, rounded up to whole slots of its producer's chunk; and its longest window
    read by a segment, less one. Valid for exactly these chunks (another chunking needs other sizes). ``spill``
    receives what spilling each buffer with far consumers would keep in RAM instead (:class:`Spill`, most saved
    first)."""
    dry = _dry_pass(graph, read_planes, rows, chunks)
    caps = {}
    for k in graph.tensors:
        step = dry.step.get(k)
        if step is None:  # inside one segment: never stored
            caps[k] = (0, 0)
            continue
        cap = -(-max(1, dry.need[k]) // step) * step  # whole slots: a write never wraps
        caps[k] = (cap, min(max(0, dry.window[k] - 1), cap))
        if spill is not None and k != graph.output_key:
            option = _spill_option(graph.tensors[k], caps[k], step, dry.held[k], dry.windows[k])
            if option is not None:
                spill.append(option)
    if spill is not None:
        spill.sort(key=lambda o: -o.saved_bytes)
    return caps


@dataclass(frozen=True)
class _DryPass:
    """What a bookkeeping-only pass found, per buffer: the most planes it held (``need``), the planes a write adds
    (``step``; stored buffers only), the longest window a segment reads (``window``); per consumer: the planes it
    kept held and the planes a call reads."""

    need: dict[str, int]
    step: dict[str, int]
    window: dict[str, int]
    held: dict[str, dict[tuple[int, int], int]]
    windows: dict[str, dict[tuple[int, int], int]]


#: Dry passes by :func:`_z_signature`: the planner sizes many plans of one graph (bands of other widths, spill
#: choices) whose passes along z are the same (45 of 49 at 2048^3, 4 s of Python each).
_DRY_PASSES: dict[tuple[Any, ...], _DryPass] = {}


def _z_signature(graph: StreamGraph, read_planes: int | dict[str, int], rows: list[tuple[int, int]],
                 chunks: list[int]) -> tuple[Any, ...]:
    """Everything a dry pass depends on: the segments' wiring and windows along z, the tensors' plane counts, the
    reads, takes and chunks; not the planes' other axes (bands of one model share it)."""
    segments = tuple((s.index, tuple(s.inputs), tuple(s.outputs)) for s in graph.segments)
    planes = tuple((k, t.n) for k, t in graph.tensors.items())
    reads = tuple(sorted(read_steps(graph, read_planes).items()))
    return (segments, planes, reads, tuple(graph.keep), graph.output_key, tuple(rows), tuple(chunks))


def _dry_pass(graph: StreamGraph, read_planes: int | dict[str, int], rows: list[tuple[int, int]],
              chunks: list[int]) -> _DryPass:
    """The bookkeeping-only pass :func:`plan_capacities` sizes buffers from (remembered: see :data:`_DRY_PASSES`)."""
    key = _z_signature(graph, read_planes, rows, chunks)
    found = _DRY_PASSES.get(key)  # (one lookup: another thread's plan may clear the memo between two)
    if found is not None:
        return found
    dry = StreamRun(graph, {k: _no_read for k in graph.inputs}, read_planes, chunks)
    for a, b in rows:
        dry.take(a, b - a)
        dry.done(b)
    window = {k: 0 for k in graph.tensors}  # the longest window a segment reads of each tensor
    windows: dict[str, dict[tuple[int, int], int]] = {k: {} for k in graph.tensors}  # per consumer
    for rs in dry.segs:
        for j, (k, win) in enumerate(rs.seg.inputs):
            windows[k][(rs.seg.index, j)] = win.input_planes(rs.t) if win.kind != "same" else rs.t
            window[k] = max(window[k], windows[k][(rs.seg.index, j)])
    step = {k: dry.read_t[k] if k in dry.read_t else dry.segs[graph.producer[k]].t
            for k in graph.tensors if k in dry.read_t or k in graph.producer}
    found = _DryPass({k: b.need for k, b in dry.bufs.items()}, step, window, dry.held, windows)
    if len(_DRY_PASSES) >= 16:
        _DRY_PASSES.clear()
    _DRY_PASSES[key] = found
    return found


@dataclass(frozen=True)
class Spill:
    """One buffer spilled to disk (:class:`SpilledBuffer`): its ring for the producer and near consumers, the
    window of planes each far consumer reads back, and what that saves."""

    key: str
    capacity: int  # ring planes (whole producer chunks)
    mirror: int
    far: dict[tuple[int, int], int]  # far consumer (segment index, input j) -> planes of its read-back window
    saved_bytes: int  # RAM saved against the unspilled buffer
    file_planes: int  # planes the spill file holds: a ring as long as the unspilled buffer (the farthest lag)
    disk_bytes: int  # the spill file's size
    traffic_bytes: int  # bytes written (every plane once) and read back (once per far consumer)


def far_rows(ten: StreamTensor, far: Any, rows: dict[tuple[int, int], tuple[int, int]]) -> tuple[int, int] | None:
    """The rows ``[lo, hi)`` of ``ten``'s planes its far consumers (``far``) read, by ``rows`` (skewed bands:
    :meth:`StreamRun.read_only`), where they are fewer than the plane's rows and planes are stored rows-first (so
    that each plane's rows are one piece of memory); else None."""
    if not far or ten.order[2] != YAXIS or any(who not in rows for who in far):
        return None
    lo, hi = min(rows[who][0] for who in far), max(rows[who][1] for who in far)
    return (lo, hi) if hi - lo < ten.shape[YAXIS] else None


def _spill_option(ten: StreamTensor, cap: tuple[int, int], step: int, held: dict[tuple[int, int], int],
                  windows: dict[tuple[int, int], int]) -> Spill | None:
    """Spilling a buffer whose consumers keep ``held`` planes each (dry run) and read ``windows`` at a time: the
    consumers that keep many more planes than they read (:data:`SPILL_FAR`) read from disk instead; None when none
    does or it would save nothing."""
    far = {who: w for who, w in windows.items() if held.get(who, 0) > SPILL_FAR * (w + step)}
    if not far:
        return None
    near = [who for who in windows if who not in far]
    ring = -(-max([step] + [held.get(who, 0) for who in near]) // step) * step
    mirror = min(max([0] + [windows[who] - 1 for who in near]), ring)
    ahead = max(1, SPILL_READ_BYTES // max(1, ten.plane_bytes))
    far = {who: min(w + max(w, min(ahead, (held[who] - w) // 4)), ten.n) for who, w in far.items()}
    saved = (sum(cap) - ring - mirror - sum(far.values())) * ten.plane_bytes
    if saved <= 0:
        return None
    return Spill(ten.key, ring, mirror, far, saved, cap[0], cap[0] * ten.plane_bytes,
                 ten.n * ten.plane_bytes * (1 + len(far)))


def stream_graph_for(model: TileModel, padded: tuple[int, int, int]) -> StreamGraph:
    """The model cut into segments for a whole padded volume (x, y, z); raises NotStreamable."""
    if model.layout != "NCDHW":
        raise NotStreamable(f"the model's input is {model.layout} (layer streaming runs NCDHW models)")
    return analyse(model.model, model.input_shape_for(padded), 4, model.output_index)


# ---- the engine as a run uses it: plan (graph, chunking, buffer sizes, memory) and the streamed pass ----

#: OpenVINO's memory for a compiled segment, in units of its call's inputs plus outputs (blocked layouts, precision
#: conversions, the phase convolutions' DepthToSpace), and a streamed run's fixed part: the runtime, and the weights
#: counted this many times (the IR's mapped constants, each segment's repacked copy). Fitted to five measured runs
#: with the command line's allocator (:func:`volinfer.portable.lean_allocator`; idle machine, VmHWM of the child):
#: a 10-layer U-Net at 160x152x128 in f32 and bf16 (198, 175 MB), the reference U-Net at 256³ bf16 (259 MB) and at
#: 512³ in bf16 and f32 (376, 531 MB); every prediction within 1.2% of its run (tests/test_plan_peaks.py: within 20%).
WORKING_FACTOR = 0.46
STREAM_FLOOR_MB = 135.0
WEIGHT_COPIES = 3.0


def fixed_mb(model_weights_mb: float) -> float:
    """A streamed run's memory besides its plane buffers and its segments' working memory (MB)."""
    return STREAM_FLOOR_MB + WEIGHT_COPIES * model_weights_mb


#: Output planes written per step (one journal row); a multiple of the model's size multiple.
OUT_PLANES = 16
#: Input planes read per step, and output planes taken (computed and post-processed) per step within a row: the
#: input and output buffers hold a few planes, not a row's (at 512² x 16 planes, f32: 32 MB each).
READ_PLANES = 4
TAKE_PLANES = 4

#: Spilling (:class:`SpilledBuffer`): a consumer is "far" — served from disk — when it keeps more than this many times
#: (its window + the producer's chunk) planes waiting (a skip connection waiting for its decoder).
SPILL_FAR = 2.0
#: Bytes a far consumer's window reads ahead (one read per refill; the OS is asked for the next ones).
SPILL_READ_BYTES = 4 << 20
#: Spill traffic the planner predicts, in bytes moved (each spilled byte written once, read back once) per second of
#: the run, where the files outgrow what the OS keeps of written pages in memory (:func:`traffic_s`). Measured on this
#: machine (2 cores, ext4 on virtio, 24 GiB): 512 MB written in 2 MB positioned writes, read back in 8 MB positioned
#: reads, five fresh processes: write 350-4970 MB/s (page cache; the first run of the day slowest), read 4690-7820
#: MB/s, write+read of each byte 330-3040 MB/s spilled (660-6080 MB/s moved); after fsync and POSIX_FADV_DONTNEED
#: (reads from the disk itself) 2110-2560 MB/s. Taken low: spills compete with OpenVINO for the same cores and memory
#: bandwidth. The reference U-Net at 2048³ in skewed bands (strips of two bands: 5.1 GB, beyond this machine's 2.4 GB)
#: moved 36 and 136 GB in 8 bands unspilled and 16 spilled, 20-22 and 52-63 s of I/O; 16 took 55-82 s longer (pairs
#: of runs; 0.2 ms a call for its 94720 more calls, the rest is 1.6-2.7 GB/s for its 100 GB more).
SPILL_BYTES_PER_S = 1.5e9
#: The same where the files stay within what the OS keeps of written pages in memory
#: (:func:`volinfer.portable.writeback_allowance_mb`): memory copies through the kernel, never the disk. Measured: the
#: reference U-Net at 2048x2048x512 in 8 bands unspilled and 16 spilled (strips of two bands 1.3 GB) moved 9.0 and
#: 34.0 GB in 3.1-4.8 and 8.8-9.2 s of I/O (3.7-3.9 GB/s in 16), and 16 bands took no longer than 8
#: (benchmarks/band_counts.py): taken as if none of it overlapped the computation.
CACHED_BYTES_PER_S = 4e9
#: Which plans may spill: "auto" (the planner weighs spilling like any plan), "never", or "always" (every buffer
#: that can spill does: tests).
SPILL = "auto"
#: Seconds per voxel a plan's time is counted in when the model has no speed profile (its unit is then voxels):
#: the reference U-Net's ~12 Mvox/s, to weigh spill traffic against voxels evaluated.
NOMINAL_VOXEL_S = 1 / 12e6


def traffic_s(moved_bytes: float, footprint_bytes: float) -> float:
    """Predicted seconds of moving ``moved_bytes`` through temporary files that hold ``footprint_bytes`` at once:
    at :data:`CACHED_BYTES_PER_S` while they fit what the OS keeps of written pages in memory
    (:func:`volinfer.portable.writeback_allowance_mb`; read back and deleted before they reach the disk), at
    :data:`SPILL_BYTES_PER_S` beyond."""
    if moved_bytes <= 0:
        return 0.0
    fits = footprint_bytes <= portable.writeback_allowance_mb() * 2**20
    return moved_bytes / (CACHED_BYTES_PER_S if fits else SPILL_BYTES_PER_S)


@dataclass
class StreamPlan:
    """A streamed run, decided before anything is compiled: the cut graph, the padded volume, the band of y rows
    streamed at once (the whole padded y extent, or bands with receptive-field margins), the planes read and written
    per step, every segment's planes per call, every buffer's size (for exactly those chunks), and the memory all of
    it is predicted to take."""

    graph: StreamGraph
    padded: tuple[int, int, int]
    band: int  # padded y rows one stream covers (padded[1]: one band)
    margin: int  # y margin of each band's inner sides (0 with one band)
    read_planes: int
    out_planes: int
    rows: list[tuple[int, int]]  # the output rows the run writes, in order (taken in pieces: :func:`takes`)
    chunks: list[int]  # output planes per call of each segment (what the buffers were sized for)
    capacities: dict[str, tuple[int, int]]  # (ring planes, mirror planes) per tensor
    buffers_mb: float  # plane buffers in RAM (less what is spilled)
    working_mb: float  # OpenVINO's own memory for the segments' calls (estimated)
    peak_mb: float | None = None  # the run's predicted peak: runtime, weights, buffers, working memory
    spill_options: list[Spill] = field(default_factory=list)  # the buffers that can spill, most RAM saved first
    spill: dict[str, Spill] = field(default_factory=dict)  # the buffers spilled to disk
    spill_at: tuple[str, str] | None = None  # (directory, name prefix) of spill files (volinfer.io.plane_store)
    spill_used: dict[str, Any] | None = None  # what the run's spill wrote and read (run_stream)
    skew: Any = None  # skewed bands (volinfer.run.skewed_bands.SkewedBands): per band its cut, graph, buffers
    ahead: Any = None  # its segments compiling beside the pre-pass (volinfer.run.segment_compile.CompileAhead)

    def store_in(self, precision: str) -> None:
        """Keep the planes between segments in ``precision`` (a run whose precision changed after planning: the
        guard moving bf16 to f32). Plane sizes set the chunks, and the chunks the buffers: all re-sized together,
        the predicted peak moved by the difference."""
        if self.skew is not None:
            self.skew.store_in(self, precision)
            return
        before, stored = self.memory_mb, [t.storage for t in self.graph.tensors.values()]
        self.graph.store_in(precision if precision in ("bf16", "f16") else "f32")
        if stored == [t.storage for t in self.graph.tensors.values()]:
            return  # planned for this storage already
        (self.chunks, self.capacities, self.buffers_mb, self.working_mb,
         self.spill_options) = plan_sizes(self.graph, self.read_planes, takes(self.rows))
        self.spill = {o.key: o for o in self.spill_options if o.key in self.spill}  # the same buffers spilled
        self.buffers_mb -= self.spill_saved_mb
        if self.peak_mb is not None:
            self.peak_mb += self.memory_mb - before

    def spilling(self, n: int) -> "StreamPlan":
        """This plan with the ``n`` buffers that save the most RAM spilled (:attr:`spill_options`)."""
        unspilled = self.buffers_mb + self.spill_saved_mb
        plan = replace(self, spill={o.key: o for o in self.spill_options[:n]})
        plan.buffers_mb = unspilled - plan.spill_saved_mb
        if plan.peak_mb is not None:
            plan.peak_mb += plan.memory_mb - self.memory_mb
        return plan

    @property
    def spill_saved_mb(self) -> float:
        return sum(o.saved_bytes for o in self.spill.values()) / 2**20

    @property
    def spill_disk_bytes(self) -> int:
        """Disk the spill files need at once (skewed bands: with the strips of two bands, read and written)."""
        return sum(o.disk_bytes for o in self.spill.values()) + self.strips_disk_bytes

    @property
    def strips_disk_bytes(self) -> int:
        if self.skew is None:
            return 0
        bands = self.skew.bands  # a band reads the previous band's strips while it writes its own
        return max([b.strip_bytes for b in bands] + [a.strip_bytes + b.strip_bytes for a, b in zip(bands, bands[1:])])

    @property
    def spill_s(self) -> float:
        """Predicted seconds the spill adds: its bytes written once and read back by each far consumer, and skewed
        bands' strips (written by one band, read by the next), at the rate the files' size allows
        (:func:`traffic_s`: once they outgrow what the OS keeps of written pages, it writes back whatever is dirty,
        the spill's ring files included)."""
        if self.skew is not None:  # every band's own spill, and the strips between bands
            return traffic_s(self.skew.spill_bytes + 2 * self.skew.strip_bytes, self.spill_disk_bytes)
        return traffic_s(sum(o.traffic_bytes for o in self.spill.values()) * self.bands_count, self.spill_disk_bytes)

    @property
    def calls_per_band(self) -> int:
        """Segment calls one band makes (every segment over the volume's depth, its chunk of planes a call)."""
        return sum(-(-self.graph.tensors[seg.outputs[0]].n // t) for seg, t in zip(self.graph.segments, self.chunks))

    @property
    def bands_count(self) -> int:
        if self.skew is not None:
            return len(self.skew.bands)
        return max(1, -(-(self.padded[1] - 2 * self.margin) // max(1, self.band - 2 * self.margin)))

    def spill_cost(self, seconds: bool) -> float:
        """:attr:`spill_s` in a plan's time unit: seconds (``seconds``), else voxels (:data:`NOMINAL_VOXEL_S`)."""
        return self.spill_s if seconds else self.spill_s / NOMINAL_VOXEL_S

    def spill_summary(self) -> dict[str, Any] | None:
        """What is spilled (for the summary and ``--json``); None when nothing is."""
        if not self.spill and self.skew is None:
            return None
        used = self.spill_used or {}
        return {"tensors": len(self.spill), "ram_saved_mb": round(self.spill_saved_mb, 1),
                "disk_mb": round(self.spill_disk_bytes / 2**20, 1), "strips_mb": round(self.strips_disk_bytes / 2**20, 1),
                "written_mb": round(used.get("written", 0) / 2**20, 1),
                "read_mb": round(used.get("read", 0) / 2**20, 1), "io_s": round(used.get("seconds", 0.0), 2),
                "read_s": round(used.get("read_s", 0.0), 2), "write_wait_s": round(used.get("waited", 0.0), 2),
                "predicted_s": round(self.spill_s, 2),
                "directory": self.spill_at[0] if self.spill_at else None,
                "spilled": [{"tensor": o.key, "shape": list(self.graph.tensors[o.key].shape),
                             "ram_saved_mb": round(o.saved_bytes / 2**20, 1), "disk_mb": round(o.disk_bytes / 2**20, 1)}
                            for o in self.spill.values()]}

    @property
    def memory_mb(self) -> float:
        return self.buffers_mb + self.working_mb

    def bands(self, size_y: int, multiple: int) -> AxisPlan:
        """The y bands (starts and the rows each one writes): the crop planner's own axis plan."""
        if self.skew is not None:
            return self.skew.axis(size_y)
        return plan_axis_crop(size_y, self.band, multiple, self.margin)

    def evaluated_voxels(self, size_y: int, multiple: int) -> float:
        """Voxels the plan evaluates, at the input's resolution: the padded volume's, with the y rows its bands
        evaluate (bands with margins recompute theirs; skewed bands compute every row once)."""
        rows = self.bands(size_y, multiple)
        y_rows = self.padded[1] if self.skew is not None else rows.count * rows.tile
        return float(self.padded[0]) * y_rows * self.padded[2]

    def describe(self, size_y: int, multiple: int) -> str:
        anchored = sum(1 for s in self.graph.segments if s.anchor is not None)
        ay = self.bands(size_y, multiple)
        where = "" if ay.count == 1 else (f" in {ay.count} bands of {self.band} rows along y (margins {self.margin}, "
                                          f"{ay.count * ay.tile / size_y:.2f}x the rows evaluated)")
        if self.skew is not None:
            widths = sorted({b - a for a, b in zip(self.skew.betas[:-1], self.skew.betas[1:])})
            rows = f"{widths[0]}" if len(widths) == 1 else f"{widths[0]}-{widths[-1]}"
            where = (f" in {ay.count} skewed bands of {rows} rows along y (each layer's rows computed once: "
                     f"{self.skew.strip_bytes / 2**20:.0f} MB of halo rows passed between bands through disk)")
        spilled = ("" if not self.spill else
                   f" ({len(self.spill)} skip connection(s) spilled to disk: {self.spill_saved_mb:.0f} MB of RAM "
                   f"saved, {self.spill_disk_bytes / 2**20:.0f} MB of disk, "
                   + (f"about {self.spill_s:.1f} s" if self.spill_s >= 0.05 else "under 0.1 s") + " of file traffic)")
        per_band = " per band" if ay.count > 1 and self.skew is None else ""  # (bands with margins recompute them)
        return (f"layer streaming along z{where}: {len(self.graph.segments)} segments ({anchored} convolution/pooling/"
                f"interpolation layers), every voxel of every layer computed once{per_band}; plane buffers "
                f"{self.buffers_mb:.0f} MB{spilled}")


def plan_stream(tm: TileModel, shape: tuple[int, int, int], precision: str,
                fits: Callable[[StreamPlan], bool] | None = None, margin_y: int | None = None,
                cost: Callable[[StreamPlan], float] | None = None) -> StreamPlan:
    """How ``tm`` would stream a volume of ``shape`` (x, y, z) at ``precision``: the whole cross-section at once,
    or — when that does not satisfy ``fits`` even with skip connections spilled to disk and a y margin covering the
    receptive field is given — bands of y rows: as few as the widest band that fits allows, or more where the
    planner's objective prefers them (with ``cost``: within 10% of the time, leaner), each count at the narrowest
    band giving it (memory grows with the rows of a band; the narrowest band when none fits). Spilling
    (:func:`_spilled`): with ``cost`` (a plan's predicted time) the planner's objective picks among the plans that
    fit, spilling more or fewer buffers (:func:`volinfer.run.fidelity.leanest_near_fastest`); without, buffers spill
    only as far as ``fits`` needs. A model whose in-plane coordinates depend on the extent along y (align_corners interpolation) streams whole
    cross-sections only: a band would be a tile, and no tiling is exact for it. Raises NotStreamable."""
    m = tm.multiple
    padded = tuple(-(-n // m) * m for n in shape)
    whole = _plan_band(tm, shape, padded, padded[1], 0, precision)  # type: ignore[arg-type]
    if fits is None:
        return _spilled(whole, lambda p: True, cost)
    chosen = _spilled(whole, fits, cost, none_fit=False)
    if chosen is not None or margin_y is None or not whole.graph.bands_exact(3):
        return chosen or _spilled(whole, lambda p: True, None, leanest=True)
    margin = -(-margin_y // m) * m
    extents = list(range(2 * margin + m, padded[1] - m + 1, m))  # band rows, a core of >= m rows each
    if not extents:
        return _spilled(whole, lambda p: True, None, leanest=True)
    best, lo, hi = None, 0, len(extents) - 1
    while lo <= hi:  # memory grows with the band: the widest that fits (spilled as far as it may)
        mid = (lo + hi) // 2
        cand = _plan_band(tm, shape, padded, extents[mid], margin, precision)  # type: ignore[arg-type]
        if fits(_spilled(cand, lambda p: True, None, leanest=True)):
            best, lo = cand, mid + 1
        else:
            hi = mid - 1
    if best is None:
        return _spilled(_plan_band(tm, shape, padded, extents[0], margin, precision),  # type: ignore[arg-type]
                        lambda p: True, None, leanest=True)
    counts = {e: plan_axis_crop(shape[1], e, m, margin).count for e in extents}
    options = []  # per band count from the widest band's: its narrowest band (as many bands, less margin, leaner)
    for count in sorted({c for c in counts.values() if c >= counts[best.band]}):
        narrowest = min(e for e, c in counts.items() if c == count)
        band = best if narrowest == best.band else _plan_band(tm, shape, padded, narrowest, margin,  # type: ignore
                                                              precision)
        option = _spilled(band, fits, cost, none_fit=False)
        if option is None:
            continue
        options.append(option)
        if cost is None or cost(option) > (1.0 + LEANER_WITHIN) * cost(options[0]):
            break  # more bands only cost more time: past the objective's reach
    if not options:
        return _spilled(best, fits, cost)
    return leanest_near_fastest(options, cost, lambda p: p.memory_mb) if cost is not None else options[0]


def _spilled(plan: StreamPlan, fits: Callable[[StreamPlan], bool], cost: Callable[[StreamPlan], float] | None,
             none_fit: bool = True, leanest: bool = False) -> Any:
    """``plan`` with 0, 1, 2, ... of its spill options (most RAM saved first) applied: among those that satisfy
    ``fits``, the planner's objective's pick by ``cost`` (least time, the leanest within 10% of it), else the one
    that spills least; ``leanest``: every option applied. :data:`SPILL` may rule spilling out or in. None when none
    fits and not ``none_fit`` (else the leanest)."""
    n = len(plan.spill_options)
    counts = [0] if SPILL == "never" else [n] if SPILL == "always" or leanest else list(range(n + 1))
    variants = [plan.spilling(k) for k in counts]
    fitting = [v for v in variants if fits(v)]
    if not fitting:
        return variants[-1] if none_fit else None
    if cost is None:
        return fitting[0]
    return leanest_near_fastest(fitting, cost, lambda p: p.memory_mb)


def _plan_band(tm: TileModel, shape: tuple[int, int, int], padded: tuple[int, int, int], band: int, margin: int,
               precision: str) -> StreamPlan:
    """The plan for streaming ``band`` padded y rows at a time."""
    m = tm.multiple
    graph = stream_graph_for(tm, (padded[0], band, padded[2]))
    graph.store_in(precision if precision in ("bf16", "f16") else "f32")
    step = max(m, OUT_PLANES // m * m)
    rows = list(plan_axis_crop(shape[2], step, m, 0).cores)
    chunks, caps, buffers, working, spill = plan_sizes(graph, READ_PLANES, takes(rows))
    return StreamPlan(graph, padded, band, margin, READ_PLANES, step, rows, chunks, caps, buffers, working,
                      spill_options=spill)


def takes(rows: list[tuple[int, int]], planes: int | None = None) -> list[tuple[int, int]]:
    """The output plane ranges a run takes, in order: each row in pieces of ``planes`` (default
    :data:`TAKE_PLANES`)."""
    planes = TAKE_PLANES if planes is None else planes
    return [(a, min(a + planes, b)) for r0, b in rows for a in range(r0, b, planes)]


def plan_sizes(graph: StreamGraph, step: int, rows: list[tuple[int, int]]
               ) -> tuple[list[int], dict[str, tuple[int, int]], float, float, list[Spill]]:
    """For the graph's current plane storage: the segments' chunks, the buffers' capacities for those chunks, the
    MB of buffers and of OpenVINO's working memory, and the buffers that can spill."""
    chunks = chunking(graph)
    spill: list[Spill] = []
    caps = plan_capacities(graph, step, rows, chunks, spill)
    buffers = sum(sum(caps[k]) * t.plane_bytes for k, t in graph.tensors.items())
    working = 0
    for s, t in zip(graph.segments, chunks):  # every compiled segment keeps its own copies of its inputs and outputs
        working += sum(w.input_planes(t) * graph.tensors[k].plane_bytes for k, w in s.inputs)
        working += sum(t * graph.tensors[k].plane_bytes for k in s.outputs)
    return chunks, caps, buffers / 2**20, WORKING_FACTOR * working / 2**20, spill


def prepare_spill(plan: StreamPlan, output: Any) -> None:
    """Before any work: where ``plan``'s spill files go (beside ``output``, else the temporary directory) and
    whether the disk has room for them (a one-line error saying what they need)."""
    plan.spill_at = tuple(map(str, spill_location(output)))  # type: ignore[assignment]
    if plan.spill_disk_bytes:
        check_space(plan.spill_at[0], plan.spill_disk_bytes)


def run_stream(source: Any, model: TileModel, plan: StreamPlan, job: TileJob, spec: Any, writer: Any,
               rows: RowProgress = RowProgress()) -> tuple[float, int]:
    """Stream ``source`` through ``model`` (read → normalise, pad as ``job`` says → every segment → post-process
    with ``spec`` → ``writer``), band by band along y (``job.grid.axes[1]``), one row of output planes
    (``job.grid.axes[2]`` cores) at a time. Returns (seconds OpenVINO computed, segment calls).

    With one band a resumed run (``start_row``) recomputes the rows before it (the stream has no other way to
    rebuild the layers' plane buffers) but does not write them again, and rows are journaled as they finish. With
    several bands a plane is final only after the last band: rows are not journaled (a resume starts over)."""
    shape, grid = tuple(source.shape), job.grid
    start_row, on_row_done = rows.start_row, rows.on_row_done
    reader = band_reader(source, model, plan, job.normalizer, job.pad_mode, job.nan_fill)
    ahead = plan.ahead.take(model, plan.graph, plan.chunks) if plan.ahead is not None else None
    requests = ahead if ahead is not None else segment_requests(model, plan.graph, plan.chunks)
    ay, cores = grid.axes[1], grid.axes[2].cores
    if ay.count > 1:
        start_row, on_row_done = 0, None
    block = np.empty((spec.out_channels, max(b - a for a, b in cores), max(b - a for a, b in ay.cores), shape[0]),
                     spec.dtype)
    store = _spill_store(plan)
    # every row is computed (a resumed run recomputes those before its start row): the bar counts them all
    bar = progress_bar(len(cores) * ay.count, "volinfer", "slab", disable=not rows.progress)
    busy, calls, run = 0.0, 0, None
    try:
        for sy, (cy0, cy1) in zip(ay.starts, ay.cores):
            if run is not None:
                run.close()  # the previous band's buffers (and spill files) go before this band's are made
            run = None
            run = StreamRun(plan.graph, reader(sy), plan.read_planes, plan.chunks, plan.capacities, requests,
                            (plan.spill, store) if store is not None else None)
            for r, (a, b) in enumerate(cores):
                take_row(run, model, spec, block, (a, b), slice(cy0 - sy, cy1 - sy), shape[0], r >= start_row)
                if r >= start_row:
                    writer.write(block[:, : b - a, : cy1 - cy0], a, cy0)
                if on_row_done is not None and r >= start_row:
                    on_row_done(r + 1)
                bar.update(1)
            busy, calls = busy + run.busy, calls + run.calls
    finally:
        bar.close()
        if run is not None:
            run.close()
        if store is not None:
            plan.spill_used = {"written": store.written, "read": store.read_bytes, "seconds": store.seconds,
                               "waited": store.waited, "read_s": store.read_s}
            store.close()
    return busy, calls


def take_row(run: StreamRun, model: TileModel, spec: Any, block: np.ndarray, row: tuple[int, int], ys: slice,
             x: int, keep: bool) -> None:
    """Output planes ``row`` of ``run``, a few at a time (the output buffer holds those); with ``keep``,
    post-processed by ``spec`` into ``block`` (the stream's output rows ``ys`` along y, ``x`` columns)."""
    a = row[0]
    out_ten = run.g.tensors[run.g.output_key]
    for p0, p1 in takes([row]):
        planes = run.take(p0, p1 - p0)
        if keep:
            out = model.output_view_of(out_ten.model_view(planes))
            spec(out[:, :x, ys, : p1 - p0].transpose(0, 3, 2, 1), block[:, p0 - a: p1 - a, : ys.stop - ys.start])
        run.done(p1)


def _spill_store(plan: StreamPlan) -> PlaneStore | None:
    """The store for ``plan``'s spilled buffers (None when nothing spills), its disk space checked."""
    if not plan.spill:
        return None
    if plan.spill_at is None:
        prepare_spill(plan, None)
    else:
        check_space(plan.spill_at[0], plan.spill_disk_bytes)
    assert plan.spill_at is not None
    return PlaneStore(*plan.spill_at)


def output_rows_mb(plan: StreamPlan, shape: tuple[int, ...], voxel_bytes: int) -> float:
    """The post-processed output a stream holds until the writer takes it (:func:`run_stream`'s block): one row of
    output planes over the widest band's rows and all of x, ``voxel_bytes`` a voxel (the written channels times
    their item size). Small for labels (1 byte); a probabilities run of a 1024x600 cross-section in 2 skewed bands,
    3 float32 channels, holds 59 MB (measured 43 MB above a plan that left it out, over its --max-memory)."""
    rows = max(b - a for a, b in plan.skew.axis(shape[1]).cores) if plan.skew is not None else plan.band
    return plan.out_planes * min(rows, shape[1]) * shape[0] * voxel_bytes / 2**20


def staging_mb(plan: StreamPlan, depth: int, itemsize: int) -> float:
    """What reading a store that keeps ``depth`` planes together (a Zarr chunk's depth) takes beside ``plan``
    (:func:`band_reader`): the staging slab that deep, in the input tensor's planes (a skewed band's: its own rows,
    the widest band's counted), and the stored voxels read into it (``itemsize`` bytes each), held twice while the
    store decodes its chunks. Measured: 512³ int16 in 128³ chunks, the reference U-Net over the whole
    cross-section, 255-267 MB beside the plan's 374 (counted: 256)."""
    if depth <= plan.read_planes:
        return 0.0
    graphs = [b.graph for b in plan.skew.bands] if plan.skew is not None else [plan.graph]  # (a band reads its rows)
    ins = [g.tensors[g.input_key] for g in graphs]
    return max(depth * (t.plane_bytes + 2 * int(np.prod(t.plane_shape)) * itemsize) for t in ins) / 1e6


def band_reader(source: Any, model: TileModel, plan: StreamPlan, normalizer: Any, pad_mode: str = "constant",
                nan_fill: list[float] | None = None, y_multiple: int | None = None
                ) -> Callable[[int], Callable[[int, np.ndarray | None], None]]:
    """For a band starting at padded y row ``sy``, the reader a :class:`StreamRun` pulls input planes with: the
    volume's planes normalised and padded as tiles are (:class:`volinfer.run.feeder.TileFeeder`), written straight
    into the input buffer's slot. A chunked store (Zarr) is read a chunk deep at a time into a staging slab (each
    chunk decompressed once), served to the slots from there."""
    in_ten = plan.graph.tensors[plan.graph.input_key]
    depth = max(plan.read_planes, source.stored_depth)
    reads = TileGrid.build(tuple(source.shape), (plan.padded[0], plan.band, depth),
                           [model.multiple, model.multiple if y_multiple is None else y_multiple, 1], (0, 0, 0),
                           "crop")
    feeder = TileFeeder(source, reads, normalizer, pad_mode, 0.0, nan_fill)
    stage = np.empty((depth, *in_ten.plane_shape), in_ten.np_dtype) if depth > plan.read_planes else None
    held = [-1, -1]  # band start and first plane of what the staging slab holds

    def fill(sy: int, a: int, dest: np.ndarray) -> None:
        feeder.fill(Tile((0, 0, 0), (0, sy, a), ((0, 0), (0, 0), (0, 0))), model.input_view(in_ten.model_view(dest)))

    def for_band(sy: int) -> Callable[[int, np.ndarray | None], None]:
        def read(a: int, slot: np.ndarray | None) -> None:
            if slot is None:
                return
            if stage is None:
                fill(sy, a, slot)
                return
            z0 = a // depth * depth
            if held != [sy, z0]:
                fill(sy, z0, stage)
                held[:] = [sy, z0]
            slot[...] = stage[a - z0: a - z0 + len(slot)]
        return read

    return for_band
