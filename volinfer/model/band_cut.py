"""Skewed bands: where a streamed network's bands of y rows meet, each layer hands its neighbour its own few rows.

Bands with margins (the stream's other way to bound its memory) recompute the network's receptive field at every
inner band edge, at every layer: the rows evaluated grow with the band count (1.45x at 2048³ in 5 bands). Skewed bands
compute every row of every layer once. Along y, segment ``s`` computes in band ``b`` its rows ``[F_b(s), F_b+1(s))``;
the boundaries come backward from the output's (a segment's boundary is the most rows below it any consumer needs,
a transposed convolution's rounded up to its stride), so a band has computed, by its end, every row its own rows
need except the few just below each boundary that the previous band computed: a layer's halo, a row or two. Those
*strips* pass from band to band through disk (:mod:`volinfer.run.skewed_bands`), and each layer in band ``b`` reads
the rows ``[padding | previous band's strip | own rows | padding]`` sliced to exactly what it needs, with its own y
padding removed (the caller supplies padding rows, as it supplies padding planes along z).

Memory then follows the band's width, not the cross-section's, and time does not grow with the band count. Not for
windows whose arithmetic depends on where along y they lie (interpolation, averages that exclude padding): those
models take bands with margins.

Model side only: geometry of a :class:`volinfer.model.stream_graph.StreamGraph`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from volinfer.model.stream_graph import (YAXIS, ExcludePadWindow, InterpWindow, NotStreamable, StreamGraph, ZWindow,
                                         window_along)


@dataclass(frozen=True)
class InputCut:
    """What a segment reads of an input in one band: rows ``[lo, hi)`` of the tensor's held rows (see
    :meth:`BandCut.held`), with ``pad_before`` and ``pad_after`` padding rows around them where the volume ends."""

    pad_before: int
    pad_after: int
    lo: int
    hi: int

    @property
    def rows(self) -> int:
        """The rows the segment's layer reads, padding included."""
        return self.pad_before + self.hi - self.lo + self.pad_after


@dataclass(frozen=True)
class SegmentCut:
    """One segment in one band: its output rows (global), its inputs' assembly, and (transposed along y) where its
    first row lies in the anchor's unpadded output."""

    rows: tuple[int, int]
    inputs: tuple[InputCut, ...]
    offset: int = 0


@dataclass
class BandCut:
    """One band: every segment's cut, the rows each tensor holds (global, ``own``), and the rows of a tensor this
    band reads from the previous band (``strips``)."""

    index: int
    segments: list[SegmentCut]
    own: dict[str, tuple[int, int]]
    strips: dict[str, tuple[int, int]]

    @property
    def output_rows(self) -> tuple[int, int]:
        return self.segments[-1].rows

    def held(self, key: str) -> tuple[int, int]:
        """The rows (global) tensor ``key``'s planes hold in this band: its strip, if it has one, then its own."""
        o0, o1 = self.own[key]
        return (self.strips[key][0] if key in self.strips else o0), o1

    def strip_rows(self, key: str) -> int:
        """Rows of the previous band's strip at the start of ``key``'s held rows (0: none)."""
        return self.own[key][0] - self.held(key)[0]

    def shape_key(self) -> tuple:
        """What a band's compiled segments depend on: equal keys, identical segment models (middle bands)."""
        own = tuple(sorted((k, b - a) for k, (a, b) in self.own.items()))
        strips = tuple(sorted((k, b - a) for k, (a, b) in self.strips.items()))
        cuts = tuple((s.rows[1] - s.rows[0], s.inputs, s.offset) for s in self.segments)
        return own, strips, cuts


def y_windows(graph: StreamGraph) -> list[list[ZWindow]]:
    """Per segment, per input: its window along y. Raises NotStreamable for windows skewed bands cannot cut."""
    nodes = {n.get_friendly_name(): n for n in graph.model.get_ordered_ops()}
    out = []
    for seg in graph.segments:
        wins = [ZWindow()] * len(seg.inputs)
        if seg.anchor is not None:
            if isinstance(seg.window, InterpWindow):
                raise NotStreamable(f"interpolation {seg.anchor}: its coordinates depend on the extent")
            win = window_along(nodes[seg.anchor], YAXIS)
            if isinstance(win, (InterpWindow, ExcludePadWindow)):
                raise NotStreamable(f"{seg.anchor}: its window's arithmetic depends on where along y it lies")
            wins[0] = win
        out.append(wins)
    return out


def _rows(graph: StreamGraph, key: str) -> int:
    return graph.tensors[key].shape[YAXIS]


def boundaries(graph: StreamGraph, wins: list[list[ZWindow]], beta: int) -> tuple[list[int], dict[str, int]]:
    """For output boundary ``beta`` (the output's rows below it belong to earlier bands): each segment's boundary
    and, per tensor, the most rows below the boundary its consumers need."""
    need: dict[str, int] = {graph.output_key: beta}
    bound = [0] * len(graph.segments)
    for seg in reversed(graph.segments):
        f = max(need.get(k, 0) for k in seg.outputs)
        n_out = _rows(graph, seg.outputs[0])
        anchor = wins[seg.index][0] if seg.anchor is not None else None
        if anchor is not None and anchor.kind == "transposed" and 0 < f < n_out:
            f = min(n_out, -(-f // anchor.s) * anchor.s)  # chunks of a transposed window start on its stride
        bound[seg.index] = f
        for (key, _), w in zip(seg.inputs, wins[seg.index]):
            hi = f if w.kind == "same" else (w.input_range(0, f)[1] if f else 0)
            need[key] = max(need.get(key, 0), min(_rows(graph, key), hi))
    return bound, need


def cut_bands(graph: StreamGraph, betas: list[int]) -> list[BandCut]:
    """The bands whose output rows are ``[betas[b], betas[b+1])`` (``betas`` from 0 to the output's rows). Raises
    ValueError when a band is too narrow for its neighbours' halos (a segment without rows, or a strip reaching past
    the previous band)."""
    if graph.keep:
        raise NotStreamable("skewed bands compute the output alone")
    wins = y_windows(graph)
    per = [boundaries(graph, wins, b) for b in betas]
    cuts: list[BandCut] = []
    for b in range(len(betas) - 1):
        (f0, _), (f1, need1) = per[b], per[b + 1]
        ranges = []  # per segment, per input: rows [lo, hi) read
        for seg in graph.segments:
            a, e = f0[seg.index], f1[seg.index]
            if e <= a:
                raise ValueError(f"band {b}: segment {seg.index} has no rows ({a}..{e})")
            ranges.append([w.input_range(a, e - a) if w.kind != "same" else (a, e) for w in wins[seg.index]])
        own: dict[str, tuple[int, int]] = {}
        for seg in graph.segments:
            for k in seg.outputs:
                own[k] = (f0[seg.index], f1[seg.index])
        for k in graph.inputs:  # read straight from the volume, with the rows below the boundary its readers need
            los = [max(0, lo) for seg in graph.segments for (key, _), (lo, _) in zip(seg.inputs, ranges[seg.index])
                   if key == k]
            own[k] = (min(los), need1.get(k, 0))
        strips: dict[str, tuple[int, int]] = {}
        for seg in graph.segments:
            for (key, _), (lo, _) in zip(seg.inputs, ranges[seg.index]):
                if key not in graph.inputs and max(lo, 0) < own[key][0]:
                    s0 = min(strips.get(key, (own[key][0],))[0], max(lo, 0))
                    strips[key] = (s0, own[key][0])
        if b > 0:
            for key, (s0, _) in strips.items():
                if s0 < cuts[-1].own[key][0]:
                    raise ValueError(f"band {b}: {key} needs rows from {s0}, the previous band starts at "
                                     f"{cuts[-1].own[key][0]}")
        segs = []
        for seg in graph.segments:
            ins = []
            for (key, _), (lo, hi) in zip(seg.inputs, ranges[seg.index]):
                o0, o1 = own[key]
                start = strips[key][0] if key in strips else o0
                if lo < 0 and o0 != 0:
                    raise ValueError(f"band {b}: {key} needs padding rows before its own rows {o0}..{o1}")
                if hi > o1 and o1 != _rows(graph, key):
                    raise ValueError(f"band {b}: {key} rows {lo}..{hi} reach past this band's {o0}..{o1}")
                n = _rows(graph, key)
                ins.append(InputCut(max(0, -lo), max(0, hi - n), max(lo, 0) - start, min(hi, n) - start))
            a = f0[seg.index]
            win = wins[seg.index][0] if seg.anchor is not None else None
            off = a + win.p - ranges[seg.index][0][0] * win.s if win is not None and win.kind == "transposed" else 0
            segs.append(SegmentCut((a, f1[seg.index]), tuple(ins), off))
        cuts.append(BandCut(b, segs, own, strips))
    return cuts


def band_graph(graph: StreamGraph, cut: BandCut) -> StreamGraph:
    """``graph`` as band ``cut`` computes it: every stored tensor holding its held rows in the band (its strip from
    the previous band, then its own rows: :meth:`BandCut.held`)."""
    tensors = {}
    for k, ten in graph.tensors.items():
        if k in cut.own:  # (inside a segment: not stored)
            shape = list(ten.shape)
            a, b = cut.held(k)
            shape[YAXIS] = b - a
            ten = replace(ten, shape=tuple(shape))
        tensors[k] = ten
    return replace(graph, tensors=tensors)
