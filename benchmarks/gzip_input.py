"""`.nii.gz` against `.nii` input: the cost of decompression (ISA-L, on a reader thread) in a default run.

The same generated int16 volume is stored both ways (the `.nii.gz` compressed at level 1, with ISA-L where installed);
each run is a fresh `volinfer run` process with default settings on the benchmark's reference U-Net (labels out to a
`.nii`), alternating the two inputs; wall and CPU time are the OS's figures, medians of ``--rounds``. A `.nii.gz`
input is decompressed twice per run: once by the pre-pass (statistics, fingerprint), once by the run itself.

    python benchmarks/gzip_input.py                     # 512³, 3 rounds (~3 minutes)
    python benchmarks/gzip_input.py --size 256 --rounds 5

Writes benchmarks/results/gzip_input.{md,json} (``--results DIR`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
from pathlib import Path

from gzip_output import RESULTS, timed_run


def main() -> None:
    from volinfer.bench.cli import reference_model
    from volinfer.bench.volumes import make_volume
    from volinfer.io.gzipio import BACKEND

    try:
        from isal import igzip as gzip_module
    except ImportError:
        import gzip as gzip_module

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--results", type=Path, default=RESULTS)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = reference_model(tmp / "ref", 128)
        nii = make_volume(tmp / f"v{a.size}.nii", (a.size,) * 3)
        gz = tmp / f"v{a.size}.nii.gz"
        with open(nii, "rb") as src, gzip_module.open(gz, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        times: dict[str, list[tuple[float, float]]] = {".nii": [], ".nii.gz": []}
        for _ in range(a.rounds):
            for ext, vol in ((".nii", nii), (".nii.gz", gz)):
                times[ext].append(timed_run([str(vol), "-m", str(model), "-o", str(tmp / "out.nii")]))
        med = {ext: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for ext, t in times.items()}
        row = {"size": a.size, "model": model.name, "gzip_backend": BACKEND, "rounds": a.rounds,
               "nii_wall_s": round(med[".nii"][0], 2), "gz_wall_s": round(med[".nii.gz"][0], 2),
               "nii_cpu_s": round(med[".nii"][1], 2), "gz_cpu_s": round(med[".nii.gz"][1], 2),
               "wall_ratio": round(med[".nii.gz"][0] / med[".nii"][0], 3),
               "cpu_ratio": round(med[".nii.gz"][1] / med[".nii"][1], 3),
               "nii_mb": round(nii.stat().st_size / 2**20, 1), "gz_mb": round(gz.stat().st_size / 2**20, 1)}
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "gzip_input.json").write_text(json.dumps(row, indent=1) + "\n")
    md = [f"`.nii.gz` vs `.nii` input, {a.size}³ int16, `volinfer run` defaults, model `{row['model']}`, gzip backend "
          f"{BACKEND}, median of {a.rounds} alternating fresh-process runs, 2 cores.", "",
          "| input | wall (s) | CPU (s) | size (MB) |", "|---|---:|---:|---:|",
          f"| .nii | {row['nii_wall_s']} | {row['nii_cpu_s']} | {row['nii_mb']} |",
          f"| .nii.gz | {row['gz_wall_s']} | {row['gz_cpu_s']} | {row['gz_mb']} |", "",
          f"Wall ratio .nii.gz / .nii: {row['wall_ratio']:.2f}×; CPU ratio {row['cpu_ratio']:.2f}×.", "",
          f"Command: `python benchmarks/gzip_input.py --size {a.size} --rounds {a.rounds}`"]
    (a.results / "gzip_input.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
