"""Compiling a stream's segments: one infer request per segment, at its planes per call — and, for a plain stream,
started beside the pre-pass.

A streamed run compiles one small model per segment (23 for the reference U-Net: ~0.5 s on this 2-core machine),
and reads its whole input once before planning (the pre-pass: NaN/Inf, value range, normalisation statistics). The
plan rarely depends on what the pre-pass finds (only the precision guard can move bf16 to f32), so a run plans
first, starts compiling that plan's segments (:class:`CompileAhead`) and reads the input meanwhile; the stream
takes the compiled segments when its plan is still the one they were compiled for, and compiles its own otherwise.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from volinfer.model.stream_graph import Segment, StreamGraph, build_segment_model
from volinfer.model.tile_model import TileModel


def compile_segments(graph: StreamGraph, compile_segment: Callable[[Segment, int], Any],
                     chunks: list[int]) -> list[Any]:
    """One infer request per segment, compiled at its chunk size, two at a time (OpenVINO compiles without the GIL);
    a :class:`volinfer.run.stream.StreamRun` per band reuses them."""
    with ThreadPoolExecutor(2) as pool:
        compiled = list(pool.map(compile_segment, graph.segments, chunks))
    return [c.create_infer_request() for c in compiled]


def segment_requests(model: TileModel, graph: StreamGraph, chunks: list[int],
                     wrap: Callable[[Callable[[Segment, int], Any]], Callable[[Segment, int], Any]] | None = None,
                     cuts: list[Any] | None = None) -> list[Any]:
    """One infer request per segment of ``graph`` (any graph cut from ``model``'s network, e.g. a sub-network
    ending at normalisation layers' inputs) at its chunk of ``chunks``, compiled as ``model`` compiles; ``wrap`` may
    wrap the compiling function (e.g. to reuse compiled segments across graphs); ``cuts``: the segments of one
    skewed band (:class:`volinfer.model.band_cut.SegmentCut`, in segment order)."""
    compile_segment = segment_compiler(model, graph, cuts)
    return compile_segments(graph, wrap(compile_segment) if wrap is not None else compile_segment, chunks)


def segment_compiler(model: TileModel, graph: StreamGraph, cuts: list[Any] | None = None
                     ) -> Callable[[Segment, int], Any]:
    """Builds a segment's model (graph surgery on clones of one model: one at a time) and compiles it as ``model``
    compiles (device, precision, threads)."""
    config = model.options.config(model.precision)
    building = threading.Lock()

    def compile_segment(seg: Segment, t: int) -> Any:
        with building:
            sub = build_segment_model(graph, seg, t, None if cuts is None else cuts[seg.index])
        return model.core.compile_model(sub, model.options.device, config)

    return compile_segment


class CompileAhead:
    """A plain stream's segments compiling in the background (two threads, as :func:`compile_segments` compiles).
    :meth:`take` hands them over when the stream still runs that graph, at those chunks, in that precision; a run
    that ends otherwise (refusing a NaN volume, interrupted, planning again) :meth:`close`\ s it."""

    def __init__(self, model: TileModel, graph: StreamGraph, chunks: list[int]) -> None:
        self.key = (graph, list(chunks), model.precision)
        self.compiled: list[Any] = [None] * len(graph.segments)
        self.error: BaseException | None = None
        self.stopped = False
        self.taken = False  # handed over to the stream (its threads done)
        compile_segment = segment_compiler(model, graph)
        jobs = list(enumerate(zip(graph.segments, chunks)))
        self.threads = [threading.Thread(target=self._work, args=(compile_segment, jobs[i::2]),
                                         name=f"volinfer-compile-{i}") for i in range(2)]
        for th in self.threads:
            th.start()

    def _work(self, compile_segment: Callable[[Segment, int], Any], jobs: list[tuple[int, tuple[Segment, int]]]
              ) -> None:
        try:
            for i, (seg, t) in jobs:
                if self.error is not None or self.stopped:
                    return
                self.compiled[i] = compile_segment(seg, t)
        except BaseException as e:  # noqa: BLE001  (raised where the stream takes the segments)
            self.error = e

    def stop(self) -> None:
        """Compile nothing more (the run planned again: these segments will not run)."""
        self.stopped = True

    def close(self) -> None:
        """Compile nothing more, and wait for the segment being compiled: a process that exits while OpenVINO
        compiles in another thread aborts (SIGABRT), and a long-lived one would keep the threads' memory."""
        if self.taken:
            return
        self.stop()
        for th in self.threads:
            th.join()

    def take(self, model: TileModel, graph: StreamGraph, chunks: list[int]) -> list[Any] | None:
        """The infer requests, once compiled, when ``graph``, ``chunks`` and ``model``'s precision are what they
        were compiled for (else None: the caller compiles its own); raises what compiling raised."""
        graph0, chunks0, precision0 = self.key
        if self.stopped or graph0 is not graph or chunks0 != list(chunks) or precision0 != model.precision:
            self.close()  # (not what runs)
            return None
        for th in self.threads:
            th.join()
        self.taken = True
        if self.error is not None:
            raise self.error
        return [c.create_infer_request() for c in self.compiled]
