"""Chunked Zarr runs in one process and on a local Dask cluster of 1 and 2 workers (the README's cluster table).

    python benchmarks/distributed_scaling.py                 # 384³ int16, reference U-Net, 128³ tiles, crop

Per-worker peak RSS is each worker process's own peak (``ru_maxrss``, reported by its tasks); throughput is voxels
over wall time of the whole job; scaling efficiency = throughput(2 workers) / (2 × throughput(1 worker)). On this
2-core machine the 1-worker run uses both cores for OpenVINO and each of 2 workers gets one (--threads), so this
measures the overhead of distribution, not extra hardware.
"""

import argparse
import json
from pathlib import Path

import numpy as np
import zarr

from volinfer.bench.cli import reference_model
from volinfer.bench.volumes import make_volume
from volinfer.distributed import run_zarr
from volinfer.zarr_io import nifti_to_zarr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--work-dir", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed.md"))
    a = ap.parse_args()
    model = reference_model(a.work_dir, 128)
    nii = make_volume(a.work_dir / f"volume_{a.size}x{a.size}x{a.size}.nii", (a.size,) * 3)
    vol = a.work_dir / f"volume_{a.size}.zarr"
    if not vol.exists():
        nifti_to_zarr(nii, vol, chunks=64)
    configs = [("one process", None, None), ("Dask, 1 worker × 2 threads", 1, 2), ("Dask, 2 workers × 1 thread", 2, 1)]
    rows = ["| run | wall (s) | Mvox/s | peak RSS per worker (MB) | output |", "|---|---:|---:|---:|---|"]
    raw, outputs = [], []
    for name, workers, threads in configs:
        out = a.work_dir / f"dist_{workers or 0}.zarr"
        rep = run_zarr(vol, model, out, tile=128, overlap=0.25, stitch="crop", workers=workers,
                       options={"threads": threads} if threads else None, block=256, overwrite=True)
        outputs.append(out)
        same = "reference" if len(outputs) == 1 else (
            "identical" if np.array_equal(zarr.open_array(str(out))[:], zarr.open_array(str(outputs[0]))[:])
            else "DIFFERS")
        peak = float(rep.extra["worker peak"].split()[0])
        mvox = rep.voxels / rep.wall_s / 1e6
        raw.append({"run": name, "workers": workers, "threads": threads, "wall_s": rep.wall_s, "mvox_s": mvox,
                    "worker_peak_mb": peak, "blocks": rep.extra["blocks"], "same": same})
        rows.append(f"| {name} | {rep.wall_s:.1f} | {mvox:.2f} | {peak:.0f} | {same} |")
        print(rows[-1], flush=True)
    eff = raw[2]["mvox_s"] / (2 * raw[1]["mvox_s"])
    text = "\n".join(rows) + f"\n\nScaling efficiency 1 → 2 workers: {100 * eff:.0f}%\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps({"size": a.size, "runs": raw, "efficiency": eff}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
