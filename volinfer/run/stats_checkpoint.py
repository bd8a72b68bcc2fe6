"""Checkpointed statistics passes of the layer-streaming engine: where each pass starts and what it leaves on disk.

The statistics passes of :mod:`volinfer.run.stream_stats` stream, wave by wave, the sub-network that ends at the
inputs of a wave's normalisation layers. Recomputing each one from the input volume costs the sum of the waves'
network prefixes (on a 34-layer LinkNet3d, 27 runs' worth). Here every pass streams only what it adds: the tensors a
later pass needs that this pass (or an earlier one) computed — the main path and the skip connections that cross the
cut — are written plane by plane to a disk-backed store (:class:`volinfer.io.plane_store.PlaneStore`, positioned
writes behind the computation, in the run's storage precision), and the later pass reads them back as its inputs.

:class:`CutPlanner` decides it on the graph alone, the same way for a run and for the planner's prediction
(:func:`plan_cuts`): a pass computes the nodes its targets need, stopping at tensors already on disk; after it, the
tensors on disk are exactly those some later pass still reads (written by this pass when new, deleted when no later
pass needs them). A tensor is known by its producer's friendly name and output port in the working model (freezing
a wave replaces only that wave's normalisation nodes, which no checkpoint comes from before they are frozen).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from volinfer.io.plane_store import PlaneFile, PlaneStore
from volinfer.model.spatial_norm import NormLayer, stat_tensor

#: A tensor of the working model: (producer's friendly name, output port).
TensorId = tuple[str, int]


def tensor_id(out: ov.Output) -> TensorId:
    return out.get_node().get_friendly_name(), out.get_index()


@dataclass
class Cut:
    """One pass: the tensors it reads from disk (none: it reads the volume), those it writes for later passes, those
    deleted after it, and the nodes it computes."""

    reads: list[TensorId]
    writes: list[TensorId]
    drops: list[TensorId]
    nodes: set[str] = field(default_factory=set)


def unique_names(model: ov.Model) -> bool:
    """Whether every node of ``model`` has its own friendly name (checkpoints are known by them)."""
    names = [op.get_friendly_name() for op in model.get_ordered_ops()]
    return len(names) == len(set(names))


def _streamed(model: ov.Model) -> set[str]:
    """Nodes whose values depend on the volume (shape computations do not: the shapes are static)."""
    out: set[str] = set()
    for op in model.get_ordered_ops():
        if op.get_type_name() == "Parameter" or (
                op.get_type_name() != "ShapeOf"
                and any(op.input_value(i).get_node().get_friendly_name() in out for i in range(op.get_input_size()))):
            out.add(op.get_friendly_name())
    return out


class CutPlanner:
    """The cuts between passes, one pass at a time (:meth:`cut`), over the model as it is at that pass."""

    def __init__(self) -> None:
        self.computed: set[str] = set()  # nodes some earlier pass computed
        self.disk: set[TensorId] = set()  # tensors on disk now

    def cut(self, model: ov.Model, targets: list[ov.Output], later: list[ov.Output]) -> Cut:
        """The pass computing ``targets`` in ``model`` when ``later`` passes compute those tensors."""
        streamed = _streamed(model)
        nodes, reads = self._walk(targets, streamed, stop=self.disk)
        if self.computed and any(model.get_parameters()[0].get_friendly_name() == n for n in nodes):
            raise RuntimeError("a checkpointed statistics pass would read the volume again")
        self.computed |= nodes
        future, _ = self._walk(later, streamed, stop=set())
        keep: set[TensorId] = set()
        for op in model.get_ordered_ops():
            name = op.get_friendly_name()
            if name not in future or name in self.computed:
                continue
            for i in range(op.get_input_size()):
                src = op.input_value(i)
                tid = tensor_id(src)
                if src.get_node().get_friendly_name() in self.computed and (
                        src.get_node().get_friendly_name() in streamed) or tid in self.disk:
                    keep.add(tid)
        for out in later:  # a later pass's own input, computed already (by a pass of the same wave)
            if out.get_node().get_friendly_name() in self.computed:
                keep.add(tensor_id(out))
        writes = sorted(keep - self.disk)
        drops = sorted(self.disk - keep)
        self.disk = keep
        return Cut(sorted(reads), writes, drops, nodes)

    @staticmethod
    def _walk(targets: list[ov.Output], streamed: set[str], stop: set[TensorId]) -> tuple[set[str], set[TensorId]]:
        """The streamed nodes computing ``targets`` from the tensors in ``stop`` (or the volume), and those of
        ``stop`` reached."""
        nodes: set[str] = set()
        reads: set[TensorId] = set()
        todo = list(targets)
        while todo:
            out = todo.pop()
            tid = tensor_id(out)
            if tid in stop:
                reads.add(tid)
                continue
            node = out.get_node()
            name = node.get_friendly_name()
            if name in nodes or name not in streamed:
                continue
            nodes.add(name)
            todo.extend(node.input_value(i) for i in range(node.get_input_size()))
        return nodes, reads


def static_clone(model: ov.Model, input_shape: list[int]) -> ov.Model:
    """A copy of ``model`` at the volume's static input shape, its shape computations folded to constants (a
    sub-network cut from it reads no shape of a tensor upstream of its inputs)."""
    m = model.clone()
    m.reshape({m.input(0): ov.PartialShape(input_shape)})
    for op in m.get_ordered_ops():
        if op.get_type_name() == "ShapeOf":
            shape = np.array(list(op.get_input_shape(0)), op.get_output_element_type(0).to_dtype())
            for tin in list(op.output(0).get_target_inputs()):
                tin.replace_source_output(ops.constant(shape).output(0))
    return m


def cut_model(m: ov.Model, layers: tuple[NormLayer, ...], cut: Cut) -> ov.Model:
    """The pass's sub-network of ``m`` (a :func:`static_clone`, changed in place): inputs the tensors ``cut``
    reads (parameters in that order; none: the volume), outputs the inputs of ``layers`` (one tensor, over channels)
    and then the tensors it writes, in that order."""
    nodes = {op.get_friendly_name(): op for op in m.get_ordered_ops()}
    targets = [stat_tensor(m, layer) for layer in layers]
    writes = [nodes[n].output(p) for n, p in cut.writes]
    params = []
    for name, port in cut.reads:
        src = nodes[name].output(port)
        p = ops.parameter(src.get_partial_shape(), src.get_element_type(), name=f"ck_{name}_{port}")
        for tin in list(src.get_target_inputs()):
            tin.replace_source_output(p.output(0))
        targets = [p.output(0) if tensor_id(t) == (name, port) else t for t in targets]
        params.append(p)
    main = targets[0] if len(targets) == 1 else ops.concat(targets, 1).output(0)
    results = [ops.result(main)] + [ops.result(w) for w in writes]
    return ov.Model(results, params or list(m.get_parameters()), "norm_stats_cut")


@dataclass
class Checkpoint:
    """A tensor on disk for one band: its file and how its planes are stored (as the writing pass stored them)."""

    file: PlaneFile
    n: int
    storage: str
    channels_last: bool


class CheckpointStore:
    """The checkpoint files of one run's statistics passes, per (band, tensor); deleted as soon as no later pass
    reads them, and all of them on :meth:`close` (however the run ends)."""

    def __init__(self, directory: str, prefix: str) -> None:
        self.store = PlaneStore(directory, prefix, tag="ckpt")  # named as spill files: stale ones go the same way
        self.files: dict[tuple[int, TensorId], Checkpoint] = {}
        self.live = 0  # bytes on disk now
        self.peak = 0  # the most bytes on disk at once

    def open(self, band: int, tid: TensorId, ten: Any) -> PlaneFile:
        f = self.store.open(ten.plane_bytes)
        self.files[(band, tid)] = Checkpoint(f, ten.n, ten.storage, ten.channels_last)
        self.live += ten.n * ten.plane_bytes
        self.peak = max(self.peak, self.live)
        return f

    def drop(self, tids: list[TensorId]) -> None:
        for key in [k for k in self.files if k[1] in tids]:
            ck = self.files.pop(key)
            self.live -= ck.file.plane_bytes * ck.n
            ck.file.close()

    def settle(self) -> None:
        for ck in self.files.values():
            ck.file.settle()

    @property
    def written(self) -> int:
        return self.store.written

    @property
    def read_bytes(self) -> int:
        return self.store.read_bytes

    def close(self) -> None:
        self.files.clear()
        self.store.close()


def converter(src: Any, dst: Any) -> Any:
    """Planes of :class:`volinfer.model.stream_graph.StreamTensor` ``src`` (float32) as ``dst`` stores them: its
    axis order, its storage (bf16 bits rounded to nearest even, as OpenVINO converts)."""
    perm = [src.order.index(a) - 1 for a in dst.order[1:]]

    def convert(planes: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(planes.transpose(perm))
        if dst.storage == "bf16":
            b = x.view(np.uint32)
            return ((b + np.uint32(0x7FFF) + ((b >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        return x.astype(dst.np_dtype, copy=False)
    return convert


def file_reader(ck: Checkpoint) -> Any:
    """A :class:`volinfer.run.stream.StreamRun` input reader of a checkpoint: planes [a, a + len(slot)), those past
    the tensor's end left as they are (never read)."""
    def read(a: int, slot: np.ndarray | None) -> None:
        if slot is not None and a < ck.n:
            ck.file.read(a, slot[: min(len(slot), ck.n - a)])
    return read


def plan_cuts(model: ov.Model, passes: list[tuple[NormLayer, ...]], input_shape: list[int]) -> list[Cut]:
    """Every pass's cut for ``model`` at ``input_shape`` (the planner's prediction; a run cuts the same way,
    pass by pass, over the model as its earlier waves froze it)."""
    m = static_clone(model, input_shape)
    planner = CutPlanner()
    cuts = []
    for k, layers in enumerate(passes):
        later = [stat_tensor(m, layer) for rest in passes[k + 1:] for layer in rest]
        cuts.append(planner.cut(m, [stat_tensor(m, layer) for layer in layers], later))
    return cuts


def tensor_bytes(model: ov.Model, tid: TensorId, storage_bytes: int) -> int:
    """Bytes of tensor ``tid`` of ``model`` (static shapes) stored ``storage_bytes`` per value (the volume: f32)."""
    node = next(op for op in model.get_ordered_ops() if op.get_friendly_name() == tid[0])
    size = int(np.prod(list(node.get_output_shape(tid[1]))))
    return size * (4 if node.get_type_name() == "Parameter" else storage_bytes)
