"""`.nii.gz` against `.nii` output: the cost of compression, with volinfer's streamed (ISA-L) gzip.

Each run is a fresh `volinfer run` process on the same generated int16 volume, alternating `.nii` and `.nii.gz`
outputs; wall time and CPU time (user + system of the child) are the OS's figures. Labels (uint8) and float32
probabilities are measured separately: they compress very differently. Two row sets:

* worst case: the demo model (a few cheap layers) at 256³: inference costs next to nothing, so compression weighs
  as much as it can;
* realistic: the benchmark's reference U-Net (random weights, softmax, converted with PyTorch once) at 192³.

    python benchmarks/gzip_output.py                         # both sets, 3 rounds
    python benchmarks/gzip_output.py --ref-size 0            # the worst case only (no PyTorch needed)
    python benchmarks/gzip_output.py --size 192 --rounds 5 --model model.xml

Writes benchmarks/results/gzip_output.{md,json} (``--results DIR`` elsewhere).
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
EXTS = (".nii", ".nii.gz")


def timed_run(args: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh `volinfer run` process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "volinfer", "run", *args, "-q", "--overwrite"], check=True, timeout=3600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def measure(vol: Path, model: str, tile: str, rounds: int, kinds: list[str], tmp: Path) -> list[dict]:
    """One row per output kind: medians of ``rounds`` alternating .nii / .nii.gz runs, and the output sizes."""
    rows = []
    for kind in kinds:
        times: dict[str, list[tuple[float, float]]] = {ext: [] for ext in EXTS}
        sizes: dict[str, int] = {}
        for _ in range(rounds):
            for ext in EXTS:
                out = tmp / f"out{ext}"
                times[ext].append(timed_run([str(vol), "-m", model, "-o", str(out), "--kind", kind,
                                             "--tile", tile, "--precision", "f32"]))
                sizes[ext] = out.stat().st_size
        med = {ext: (statistics.median(w for w, _ in times[ext]), statistics.median(c for _, c in times[ext]))
               for ext in EXTS}
        rows.append({"kind": kind, "nii_wall_s": round(med[".nii"][0], 2), "gz_wall_s": round(med[".nii.gz"][0], 2),
                     "nii_cpu_s": round(med[".nii"][1], 2), "gz_cpu_s": round(med[".nii.gz"][1], 2),
                     "wall_ratio": round(med[".nii.gz"][0] / med[".nii"][0], 3),
                     "cpu_ratio": round(med[".nii.gz"][1] / med[".nii"][1], 3),
                     "nii_mb": round(sizes[".nii"] / 2**20, 1), "gz_mb": round(sizes[".nii.gz"] / 2**20, 1)})
    return rows


def table(title: str, rows: list[dict]) -> list[str]:
    lines = [title, "",
             "| output | .nii wall (s) | .nii.gz wall (s) | wall ratio | .nii CPU (s) | .nii.gz CPU (s) | CPU ratio "
             "| size .nii → .nii.gz (MB) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['nii_wall_s']} | {r['gz_wall_s']} | {r['wall_ratio']:.2f}× | {r['nii_cpu_s']} "
                     f"| {r['gz_cpu_s']} | {r['cpu_ratio']:.2f}× | {r['nii_mb']} → {r['gz_mb']} |")
    return lines + [""]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="worst-case set: volume edge (default 256)")
    ap.add_argument("--model", default=None, help="worst-case set: IR to run (default: the demo model)")
    ap.add_argument("--tile", default="96", help="worst-case set: tile (a fixed tiling, so that rows stream; 96)")
    ap.add_argument("--ref-size", type=int, default=192,
                    help="realistic set: volume edge for the reference U-Net (default 192; 0 skips the set)")
    ap.add_argument("--ref-tile", default="128", help="realistic set: tile of the reference U-Net (default 128)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kinds", default="labels,probabilities", help="output kinds, comma-separated")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where gzip_output.{md,json} go")
    return ap.parse_args()


def realistic_set(a: argparse.Namespace, kinds: list[str], tmp: Path, sets: list[dict]) -> str | None:
    """Measure the reference U-Net set into ``sets``; returns why it was skipped (no PyTorch), else None."""
    from volinfer.bench.cli import reference_model
    from volinfer.bench.volumes import make_volume
    from volinfer.errors import VolinferError

    try:
        ref = reference_model(tmp / "ref", int(a.ref_tile))
    except VolinferError as e:
        print(f"realistic set skipped: {e}", file=sys.stderr)
        return str(e)
    vol = make_volume(tmp / f"v{a.ref_size}.nii", (a.ref_size,) * 3)
    sets.append({"set": "realistic", "model": ref.name, "size": a.ref_size, "tile": a.ref_tile,
                 "rows": measure(vol, str(ref), a.ref_tile, a.rounds, kinds, tmp)})
    return None


def main() -> None:
    from volinfer.bench.volumes import make_volume
    from volinfer.demo import demo_model_path
    from volinfer.io.gzipio import BACKEND

    a = parse_args()
    kinds = [k.strip() for k in a.kinds.split(",") if k.strip()]
    model = a.model or str(demo_model_path())
    sets = []
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        vol = make_volume(tmp / "v.nii", (a.size,) * 3)
        sets.append({"set": "worst case", "model": Path(model).name, "size": a.size, "tile": a.tile,
                     "rows": measure(vol, model, a.tile, a.rounds, kinds, tmp)})
        skipped = realistic_set(a, kinds, tmp, sets) if a.ref_size else None
    lines = [f"`.nii.gz` vs `.nii` output, int16 input, f32, gzip backend {BACKEND}, median of {a.rounds} alternating "
             f"fresh-process runs, {os.cpu_count()} cores. CPU: user + system time of the run's process.", ""]
    what = {"worst case": "the demo model: inference costs next to nothing, so compression weighs as much as it can",
            "realistic": "the benchmark's reference U-Net: random weights, softmax, converted from PyTorch"}
    for s in sets:
        lines += table(f"**{s['set'].capitalize()}**: {s['size']}³, tile {s['tile']}, model `{s['model']}` "
                       f"({what[s['set']]}).", s["rows"])
    if skipped:
        lines += [f"Realistic set skipped: {skipped}", ""]
    lines += [f"Command: `python benchmarks/gzip_output.py {' '.join(sys.argv[1:])}`".rstrip()]
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "gzip_output.md").write_text("\n".join(lines) + "\n")
    (a.results / "gzip_output.json").write_text(json.dumps({"backend": BACKEND, "rounds": a.rounds, "sets": sets},
                                                           indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
