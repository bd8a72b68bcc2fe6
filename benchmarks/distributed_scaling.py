"""Chunked Zarr runs in one process and on a local Dask cluster of 1 and 2 workers (the README's cluster table).

    python benchmarks/distributed_scaling.py                 # 256, 384, 512³ int16, reference U-Net, 128³ tiles

Per-worker peak RSS is each worker process's own peak (``VmHWM``, reported by its tasks: ``ru_maxrss`` would also
carry the RSS of the client process the worker was forked from, which here has just run the one-process case); throughput is voxels
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
    ap.add_argument("--sizes", default="256,384,512")
    ap.add_argument("--work-dir", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed.md"))
    a = ap.parse_args()
    model = reference_model(a.work_dir, 128)
    configs = [("one process", None, None), ("Dask, 1 worker × 2 threads", 1, 2), ("Dask, 2 workers × 1 thread", 2, 1)]
    rows = ["| volume | run | wall (s) | Mvox/s | peak RSS per worker (MB) | output |", "|---|---|---:|---:|---:|---|"]
    raw, effs = [], []
    for size in (int(v) for v in a.sizes.split(",")):
        nii = make_volume(a.work_dir / f"volume_{size}x{size}x{size}.nii", (size,) * 3)
        vol = a.work_dir / f"volume_{size}.zarr"
        if not vol.exists():
            nifti_to_zarr(nii, vol, chunks=64)
        outputs, mv = [], []
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
            mv.append(mvox)
            raw.append({"size": size, "run": name, "workers": workers, "threads": threads, "wall_s": rep.wall_s,
                        "mvox_s": mvox, "worker_peak_mb": peak, "blocks": rep.extra["blocks"], "same": same})
            rows.append(f"| {size}³ | {name} | {rep.wall_s:.1f} | {mvox:.2f} | {peak:.0f} | {same} |")
            print(rows[-1], flush=True)
        effs.append((size, mv[2] / (2 * mv[1])))
    text = "\n".join(rows) + "\n\nScaling efficiency 1 → 2 workers: " + ", ".join(
        f"{100 * e:.0f}% at {s}³" for s, e in effs) + "\n"
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps({"runs": raw, "efficiency": dict(effs)}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
