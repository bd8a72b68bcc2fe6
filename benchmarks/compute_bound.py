"""How close the layer stream runs to what this CPU can compute: the model's arithmetic against its measured time.

Counts the multiply-adds of every convolution (transposed ones included) of an IR per input voxel, runs
`volinfer run` on a volume (defaults) in a fresh process, and compares the arithmetic rate of its inference with
the rate OpenVINO reaches on one large convolution on this machine (64 -> 64 channels, 3x3x3, bf16 or f32: about
the best case for the CPU plugin). The ratio says how much faster inference could get at all without doing less
arithmetic, and so which wall-time targets are reachable.

    python benchmarks/compute_bound.py --model /tmp/hl/reference_unet_128_z.xml \
        --volume /tmp/hl/volume_512x512x512.nii [--precision bf16]

Writes benchmarks/results/compute_bound.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

RESULTS = Path(__file__).parent / "results"


def flops_per_voxel(xml: str, tile: int = 128) -> float:
    """Floating-point operations (2 per multiply-add) of the IR's convolutions per input voxel, at a tile^3 input."""
    model = ov.Core().read_model(xml)
    model.reshape([1, model.inputs[0].get_partial_shape()[1].get_length(), tile, tile, tile])
    total = 0.0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData"):
            continue
        weights = np.prod(op.input_value(1).get_shape())
        if kind.endswith("BackpropData"):  # every input voxel meets every tap
            total += 2.0 * np.prod(op.input_value(0).get_shape()[2:]) * weights
        else:  # every output voxel meets every tap of its group
            total += 2.0 * np.prod(op.output(0).get_shape()[2:]) * weights
    return total / tile ** 3


def conv_rate(precision: str, seconds: float = 5.0) -> float:
    """FLOP/s OpenVINO reaches on a 64 -> 64 channel 3x3x3 convolution over 64^3 voxels (the CPU's practical best)."""
    x = ops.parameter([1, 64, 64, 64, 64], ov.Type.f32)
    w = ops.constant(np.random.default_rng(0).normal(0, 0.05, (64, 64, 3, 3, 3)).astype(np.float32))
    conv = ops.convolution(x, w, [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])
    compiled = ov.Core().compile_model(ov.Model([conv], [x]), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    req = compiled.create_infer_request()
    req.set_input_tensor(ov.Tensor(np.random.default_rng(1).normal(size=(1, 64, 64, 64, 64)).astype(np.float32)))
    req.infer()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        req.infer()
        n += 1
    flops = 2.0 * 64 ** 3 * 64 * 64 * 27
    return n * flops / (time.perf_counter() - t0)


def run_report(volume: str, model: str, precision: str) -> dict:
    """`volinfer run --json` on ``volume`` with defaults (and ``precision``), in a fresh process."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "volinfer", "run", volume, "-m", model, "-o", str(Path(d) / "out.nii"),
               "--precision", precision, "--json"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, check=True)
        report = json.loads(p.stdout)
        report["process_s"] = time.perf_counter() - t0
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--volume", required=True)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "f32"])
    args = ap.parse_args()
    per_voxel = flops_per_voxel(args.model)
    rep = run_report(args.volume, args.model, args.precision)
    best = conv_rate(args.precision)
    work = per_voxel * rep["voxels"]
    rate = work / rep["infer_busy_s"]
    out = {"model": args.model, "volume": args.volume, "precision": args.precision, "engine": rep["engine"],
           "kflop_per_voxel": per_voxel / 1e3, "tflop": work / 1e12, "process_s": rep["process_s"],
           "wall_s": rep["wall_s"], "infer_s": rep["infer_busy_s"], "infer_gflops": rate / 1e9,
           "conv_gflops": best / 1e9, "utilisation": rate / best,
           "infer_s_at_conv_rate": work / best}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "compute_bound.json").write_text(json.dumps(out, indent=1))
    md = ["| quantity | value |", "|---|---:|"]
    md += [f"| {k} | {v:.3g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in out.items()]
    (RESULTS / "compute_bound.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
