"""Chunked Zarr runs in one process and on local Dask clusters of 1, 2 and 4 workers (the README's cluster table).

    python benchmarks/distributed_scaling.py                  # 256, 384, 512³ int16, reference U-Net, 128³ tiles
    python benchmarks/distributed_scaling.py --sizes 96 --tile 32 --block 64 --workers 1,2   # a quick check

For each volume and stitch mode: wall time, throughput, speedup against one worker, each worker's own peak RSS
(``VmHWM``, reported by its tasks: ``ru_maxrss`` would also carry the RSS of the client process the worker was
forked from) and the tile-run redundancy of the block split (tile inferences the split costs over tiles in the grid,
:func:`volinfer.tiling.blocks.redundancy`: exactly 1.00 for crop, whose blocks follow tile centres; blended tiles that
straddle a block border run once per block). Every output is compared with the one-process run. Workers share the
machine's cores: ``--threads`` per worker defaults to ``cores // workers`` (at least 1), so on a 2-core machine more
workers measure the overhead of distribution, not extra hardware.
"""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import zarr

from volinfer.bench.cli import reference_model
from volinfer.bench.volumes import make_volume
from volinfer.run.distributed import run_zarr
from volinfer.io.zarr_convert import nifti_to_zarr


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256,384,512")
    ap.add_argument("--stitch", default="crop,gaussian")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="OpenVINO threads per worker (default cores//workers)")
    ap.add_argument("--model", type=Path, default=None, help="IR to run (default: the reference U-Net at --tile)")
    ap.add_argument("--work-dir", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed.md"))
    return ap.parse_args()


def _read(path: Path) -> np.ndarray:
    return zarr.open_group(str(path))["0"][:]


def _runs(a: argparse.Namespace, model: Path, vol: Path, size: int, stitch: str) -> list[dict]:
    """One process, then each worker count; one dict per run."""
    cores = os.cpu_count() or 1
    configs = [(0, a.threads or cores)] + [(w, a.threads or max(1, cores // w)) for w in map(int, a.workers.split(","))]
    runs, ref = [], None
    for workers, threads in configs:
        out = a.work_dir / f"dist_{stitch}_{workers}.zarr"
        rep = run_zarr(vol, model, out, tile=a.tile, overlap=0.25, stitch=stitch, workers=workers or None,
                       options={"threads": threads}, block=a.block, chunks=a.chunks, overwrite=True)
        if ref is None:
            ref, same = _read(out), "reference"
        else:
            same = "identical" if np.array_equal(_read(out), ref) else "DIFFERS"
        words = rep.extra["tile runs"].split()
        runs.append({"size": size, "stitch": stitch, "workers": workers, "threads": threads, "wall_s": rep.wall_s,
                     "mvox_s": rep.voxels / rep.wall_s / 1e6, "worker_peak_mb": float(rep.extra["worker peak"].split()[0]),
                     "tile_runs": int(words[0]), "grid_tiles": int(words[3]), "blocks": rep.extra["blocks"],
                     "same": same})
    base = next((r["wall_s"] for r in runs if r["workers"] == 1), runs[0]["wall_s"])
    for r in runs:
        r["speedup"] = base / r["wall_s"]
    return runs


def _row(r: dict) -> str:
    name = "one process" if not r["workers"] else f"Dask, {r['workers']} worker(s) × {r['threads']} thread(s)"
    red = r["tile_runs"] / r["grid_tiles"]
    return (f"| {r['size']}³ | {r['stitch']} | {name} | {r['wall_s']:.1f} | {r['mvox_s']:.2f} | {r['speedup']:.2f}× | "
            f"{r['worker_peak_mb']:.0f} | {r['tile_runs']}/{r['grid_tiles']} ({red:.2f}×) | {r['same']} |")


def main() -> None:
    a = _args()
    model = a.model or reference_model(a.work_dir, a.tile)
    rows = ["| volume | stitch | run | wall (s) | Mvox/s | speedup vs 1 worker | peak RSS per worker (MB) | "
            "tile runs / grid tiles | output |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
    raw = []
    for size in (int(v) for v in a.sizes.split(",")):
        nii = make_volume(a.work_dir / f"volume_{size}x{size}x{size}.nii", (size,) * 3)
        vol = a.work_dir / f"volume_{size}.zarr"
        if not vol.exists():
            nifti_to_zarr(nii, vol, chunks=a.chunks)
        for stitch in a.stitch.split(","):
            for r in _runs(a, model, vol, size, stitch):
                raw.append(r)
                rows.append(_row(r))
                print(rows[-1], flush=True)
    text = "\n".join(rows) + (f"\n\n{os.cpu_count()} cores; {a.tile}³ tiles, overlap 0.25, {a.block}³ blocks of "
                              f"{a.chunks}³ chunks. Speedup = wall(1 worker) / wall.\n")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps({"runs": raw}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
