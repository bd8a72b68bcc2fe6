"""Where a layer stream's inference time goes: every segment timed alone at its plan's call shape, and its nodes.

Builds the stream plan `volinfer run` would make for a volume of SHAPE (the whole cross-section, or ``--bands N``
skewed bands: then one middle band, times N), compiles each segment model exactly as the run compiles it, times its
calls back to back (no Python around them; three rounds: the median, and the spread), and profiles its nodes (OpenVINO's PERF_COUNT) to split the time by node
type. A segment's seconds are its per-call time x the calls it makes over the volume, so the total is what the run's
own "inference" figure should come to, less the run's waits. Comparing band counts shows which segments grow when
bands narrow.

    python benchmarks/segment_costs.py --model /tmp/hl/reference_unet_128_z.xml --shape 512
    python benchmarks/segment_costs.py --model /tmp/hl/reference_unet_128_z.xml --shape 2048 --bands 16 4

Writes benchmarks/results/segment_costs.md (appends one section per call).
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

from volinfer.model.stream_graph import build_segment_model
from volinfer.model.tile_model import TileModel
from volinfer.run import skewed_bands, stream

RESULTS = Path(__file__).parent / "results"


def segment_costs(xml: str, shape: tuple[int, int, int], bands: int, precision: str, repeats: int
                  ) -> tuple[list[dict], collections.Counter]:
    """Per segment: planes per call, ms a call, calls over the volume, seconds; and seconds by (node type, kernel)."""
    tm = TileModel(xml)
    tm.precision = precision
    padded = tuple(-(-n // tm.multiple) * tm.multiple for n in shape)
    if bands > 1:
        plan = skewed_bands.plan_skewed(tm, shape, precision, bands, None)
        assert plan.skew is not None
        band = plan.skew.bands[len(plan.skew.bands) // 2]
        graph, chunks, cuts = band.graph, band.chunks, band.cut.segments
    else:
        graph = stream.stream_graph_for(tm, padded)  # type: ignore[arg-type]
        graph.store_in(precision if precision in ("bf16", "f16") else "f32")
        chunks, cuts = stream.chunking(graph), None
    config = dict(tm.options.config(precision))
    rows, kinds = [], collections.Counter()
    for seg, t in zip(graph.segments, chunks):
        sub = build_segment_model(graph, seg, t, None if cuts is None else cuts[seg.index])
        calls = -(-graph.tensors[seg.outputs[0]].n // t) * max(1, bands)
        req = tm.core.compile_model(sub, tm.options.device, config).create_infer_request()
        for _ in range(3):
            req.infer()
        n = max(repeats, int(20 / t))
        means = []
        for _ in range(3):  # three rounds of n calls: their median, and the spread between rounds
            t0 = time.perf_counter()
            for _ in range(n):
                req.infer()
            means.append((time.perf_counter() - t0) / n * 1e3)
        ms = sorted(means)[1]
        profiled = tm.core.compile_model(sub, tm.options.device, {**config, "PERF_COUNT": "YES"})
        preq = profiled.create_infer_request()
        preq.infer()
        nodes: collections.Counter = collections.Counter()
        for _ in range(repeats):
            preq.infer()
            for p in preq.profiling_info:
                nodes[(p.node_type, p.exec_type)] += p.real_time.total_seconds()
        share = sum(nodes.values()) or 1.0
        for k, v in nodes.items():  # the node types' shares of the profiled call, applied to the timed one
            kinds[k] += ms / 1e3 * calls * v / share
        rows.append({"segment": seg.index, "anchor": seg.anchor, "planes": t, "ms": ms, "spread": (min(means), max(means)),
                     "calls": calls,
                     "seconds": ms / 1e3 * calls, "input": [list(p.get_partial_shape().to_shape()) for p in sub.inputs]})
    return rows, kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="OpenVINO IR (.xml) of a streamable network")
    ap.add_argument("--shape", required=True, help="volume shape: 512 or 2048x2048x2048")
    ap.add_argument("--bands", type=int, nargs="*", default=[1], help="skewed band counts (1: whole cross-section)")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=RESULTS / "segment_costs.md")
    a = ap.parse_args()
    dims = [int(v) for v in a.shape.lower().split("x")]
    shape = tuple(dims * 3 if len(dims) == 1 else dims)
    lines = [f"\n## {Path(a.model).name}, {'x'.join(map(str, shape))}, {a.precision}\n"]
    for bands in a.bands:
        rows, kinds = segment_costs(a.model, shape, bands, a.precision, a.repeats)  # type: ignore[arg-type]
        total = sum(r["seconds"] for r in rows)
        lines += [f"\n### {'whole cross-section' if bands <= 1 else f'{bands} skewed bands (a middle band, x {bands})'}"
                  f": {total:.1f} s of inference, {sum(r['calls'] for r in rows)} calls\n",
                  "| segment | anchor | planes a call | ms a call (rounds) | calls | seconds | share |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['segment']} | {r['anchor']} | {r['planes']} | {r['ms']:.2f} ({r['spread'][0]:.2f}-"
                  f"{r['spread'][1]:.2f}) | {r['calls']} | "
                  f"{r['seconds']:.2f} | {100 * r['seconds'] / total:.1f}% |" for r in rows]
        lines += ["", "| node type | kernel | seconds | share |", "|---|---|---|---|"]
        lines += [f"| {k[0]} | {k[1]} | {v:.2f} | {100 * v / total:.1f}% |" for k, v in kinds.most_common(10)]
        print("\n".join(lines[-(len(rows) + len(kinds.most_common(10)) + 6):]), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("a") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
