"""What a layer stream's compiled segments keep resident: OpenVINO's own memory, segment by segment.

Builds the stream plan `volinfer run` would make for a volume of SHAPE (whole cross-sections), compiles each segment
model as the run compiles it, one after another in this process, and records the resident memory each compile
leaves behind (VmRSS before and after; glibc's mmap threshold is fixed so that blocks OpenVINO frees go back to the
OS and do not count). Beside it: the segment's inputs at its call shape, the largest convolution input inside it,
and its weights. The plan's own figures (plane buffers, working memory) close the table.

Why: at 512³ in f32 the stream's peak is runtime + compiled segments + plane buffers, and the compiled segments are
the largest share: each keeps a zero-filled working copy about the size of its largest convolution input (oneDNN's
brgemm convolutions on AVX2), allocated when it is compiled, one per compiled model.

    python benchmarks/segment_memory.py --model /tmp/hl/reference_unet_128_z.xml --shape 512

Writes benchmarks/results/segment_memory.md (appends one section per call).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
TUNABLES = "glibc.malloc.mmap_threshold=65536:glibc.malloc.trim_threshold=65536"


def rss_mb() -> float:
    """This process's resident set now (MB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def segment_memory(xml: str, shape: tuple[int, int, int], precision: str) -> tuple[list[dict], dict]:
    """Per segment: inputs, largest convolution input and weights (MB), and the resident MB its compile left; and the
    plan's figures."""
    from volinfer.model.stream_graph import build_segment_model
    from volinfer.model.tile_model import TileModel
    from volinfer.run import stream

    tm = TileModel(xml, compile=False)
    tm.precision = precision
    plan = stream.plan_stream(tm, shape, precision)
    graph, config = plan.graph, dict(tm.options.config(precision))
    subs = [build_segment_model(graph, seg, t, None) for seg, t in zip(graph.segments, plan.chunks)]
    tm.core.compile_model(subs[-1], tm.options.device, config)  # once first: the plugin's one-time costs
    base, kept, rows = rss_mb(), [], []
    for i, sub in enumerate(subs):
        gc.collect()
        before = rss_mb()
        compiled = tm.core.compile_model(sub, tm.options.device, config)
        after = rss_mb()
        kept.append(compiled)
        convs = [op for op in compiled.get_runtime_model().get_ordered_ops()
                 if op.get_rt_info()["layerType"].astype(str) in ("Convolution", "Deconvolution")]
        nbytes = compiled.get_runtime_model().get_parameters()[0].get_element_type().size
        conv_in = max((np.prod(list(op.input(0).get_partial_shape().to_shape())) * nbytes for op in convs),
                      default=0)
        weights = sum(op.get_byte_size() for op in sub.get_ops() if op.get_type_name() == "Constant")
        inputs = sum(np.prod(list(p.get_shape())) * p.get_element_type().size for p in sub.get_parameters())
        rows.append({"segment": i, "inputs_mb": inputs / 2**20, "largest_conv_input_mb": conv_in / 2**20,
                     "weights_mb": weights / 2**20, "resident_mb": after - before})
    spilled = plan.spilling(len(plan.spill_options))
    totals = {"compiled_resident_mb": rss_mb() - base, "plan_buffers_mb": plan.buffers_mb,
              "plan_buffers_spilled_mb": spilled.buffers_mb, "spill_options": len(plan.spill_options),
              "plan_working_mb": plan.working_mb, "segments": len(subs)}
    return rows, totals


def markdown(xml: str, shape: tuple[int, int, int], precision: str, rows: list[dict], totals: dict) -> list[str]:
    """One section: the per-segment table and the totals."""
    import openvino as ov

    from volinfer.portable import cpu_model

    out = [f"\n## {Path(xml).name}, {'x'.join(map(str, shape))}, {precision} "
           f"({cpu_model()}, OpenVINO {ov.__version__.split('-')[0]})\n",
           "| segment | inputs (MB) | largest convolution input (MB) | weights (MB) | resident after compile (MB) |",
           "|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['segment']} | {r['inputs_mb']:.1f} | {r['largest_conv_input_mb']:.1f} | "
                   f"{r['weights_mb']:.1f} | {r['resident_mb']:.1f} |")
    s = {k: sum(r[k] for r in rows) for k in ("inputs_mb", "largest_conv_input_mb", "weights_mb", "resident_mb")}
    out.append(f"| all {totals['segments']} | {s['inputs_mb']:.0f} | {s['largest_conv_input_mb']:.0f} | "
               f"{s['weights_mb']:.0f} | {s['resident_mb']:.0f} |")
    out.append(f"\nCompiled segments resident: {totals['compiled_resident_mb']:.0f} MB. The plan's predictions: plane "
               f"buffers {totals['plan_buffers_mb']:.0f} MB ({totals['plan_buffers_spilled_mb']:.0f} MB with its "
               f"{totals['spill_options']} skip connection(s) spilled to disk), OpenVINO's working memory "
               f"{totals['plan_working_mb']:.0f} MB.")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--shape", default="512", help="N or XxYxZ")
    ap.add_argument("--precision", default="f32")
    ap.add_argument("--out", type=Path, default=RESULTS / "segment_memory.md")
    a = ap.parse_args()
    if os.environ.get("GLIBC_TUNABLES") != TUNABLES:  # the allocator's settings are read at start: start again
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": TUNABLES})
    dims = [int(v) for v in a.shape.lower().split("x")]
    shape = tuple(dims * 3 if len(dims) == 1 else dims)
    rows, totals = segment_memory(a.model, shape, a.precision)  # type: ignore[arg-type]
    lines = markdown(a.model, shape, a.precision, rows, totals)  # type: ignore[arg-type]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
