"""`.nii.gz` against `.nii` output: the cost of compression, with volinfer's streamed (ISA-L) gzip.

Each run is a fresh `volinfer run` process on the same generated int16 volume, alternating `.nii` and `.nii.gz`
outputs; wall time and CPU time (user + system of the child) are the OS's figures. Labels (uint8) and float32
probabilities are measured separately: they compress very differently.

    python benchmarks/gzip_output.py                       # 256³, the demo model, 3 rounds
    python benchmarks/gzip_output.py --size 192 --rounds 5 --model model.xml

Writes benchmarks/results/gzip_output.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def timed_run(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh `volinfer run` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "volinfer", "run", *args, "-q", "--overwrite"], check=True, timeout=3600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    from volinfer.bench.volumes import make_volume
    from volinfer.demo import demo_model_path
    from volinfer.io.gzipio import BACKEND

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="IR to run (default: the demo model)")
    ap.add_argument("--tile", default="96", help="tile (a fixed tiling, so that rows stream; default 96)")
    a = ap.parse_args()
    model = a.model or str(demo_model_path())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vol = make_volume(Path(tmp) / "v.nii", (a.size,) * 3)
        for kind in ("labels", "probabilities"):
            times: dict[str, list[tuple[float, float]]] = {".nii": [], ".nii.gz": []}
            sizes: dict[str, int] = {}
            for _ in range(a.rounds):
                for ext in (".nii", ".nii.gz"):
                    out = Path(tmp) / f"out{ext}"
                    times[ext].append(timed_run([str(vol), "-m", model, "-o", str(out), "--kind", kind,
                                                 "--tile", a.tile, "--precision", "f32"]))
                    sizes[ext] = out.stat().st_size
            med = {ext: (statistics.median(w for w, _ in times[ext]), statistics.median(c for _, c in times[ext]))
                   for ext in (".nii", ".nii.gz")}
            rows.append({"kind": kind, "nii_wall_s": round(med[".nii"][0], 2), "gz_wall_s": round(med[".nii.gz"][0], 2),
                         "nii_cpu_s": round(med[".nii"][1], 2), "gz_cpu_s": round(med[".nii.gz"][1], 2),
                         "wall_ratio": round(med[".nii.gz"][0] / med[".nii"][0], 3),
                         "nii_mb": round(sizes[".nii"] / 2**20, 1), "gz_mb": round(sizes[".nii.gz"] / 2**20, 1)})
    lines = [f"`.nii.gz` vs `.nii` output, {a.size}³ int16 input, model `{Path(model).name}`, tile {a.tile}, f32, "
             f"gzip backend {BACKEND}, median of {a.rounds} alternating fresh-process runs, {os.cpu_count()} cores.", "",
             "| output | .nii wall (s) | .nii.gz wall (s) | wall ratio | .nii CPU (s) | .nii.gz CPU (s) | size .nii → .nii.gz (MB) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['nii_wall_s']} | {r['gz_wall_s']} | {r['wall_ratio']:.2f}× | {r['nii_cpu_s']} | "
                     f"{r['gz_cpu_s']} | {r['nii_mb']} → {r['gz_mb']} |")
    lines += ["", f"Command: `python benchmarks/gzip_output.py {' '.join(sys.argv[1:])}`".rstrip()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gzip_output.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "gzip_output.json").write_text(json.dumps({"size": a.size, "model": model, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
