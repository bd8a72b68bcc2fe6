"""How close `volinfer plan` gets to the measured peak RSS, across tile sizes (the README's plan table).

    python benchmarks/plan_accuracy.py                       # 512³, tiles 64, 96, 128, crop and gaussian

Each measured run is `volinfer run` (through the benchmark worker) in its own fresh process; the prediction is
made before it, from a separate probe process.
"""

import argparse
import json
import tempfile
from pathlib import Path

from volinfer.bench.cli import reference_model
from volinfer.bench.harness import Spawner, total_ram_mb
from volinfer.bench.volumes import make_volume
from volinfer.run.plan import plan_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tiles", default="64,96,128")
    ap.add_argument("--stitch", default="crop,gaussian")
    ap.add_argument("--work-dir", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_accuracy.md"))
    a = ap.parse_args()
    model = reference_model(a.work_dir, 128)
    vol = make_volume(a.work_dir / f"volume_{a.size}x{a.size}x{a.size}.nii", (a.size,) * 3)
    rows = ["| stitch | tile | tiles | predicted peak (MB) | measured peak (MB) | error | predicted time (s) | "
            "measured time (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    raw = []
    with Spawner() as spawner:
        for stitch in a.stitch.split(","):
            for t in (int(v) for v in a.tiles.split(",")):
                plan = plan_run([vol], model, tile=t, stitch=stitch, overlap=0.25)
                res = Path(tempfile.mkstemp(suffix=".json")[1])
                out = a.work_dir / "plan_check.nii"
                rc, peak, _ = spawner.run([stitch, "--volume", str(vol), "--model", str(model), "--out", str(out),
                                           "--result", str(res), "--tile", str(t), "--overlap", "0.25"],
                                          total_ram_mb() * 0.85)
                wall = json.loads(res.read_text())["wall_s"] if rc == 0 else float("nan")
                res.unlink()
                out.unlink(missing_ok=True)
                err = (plan.peak_rss_mb - peak) / peak
                rows.append(f"| {stitch} | {t}³ | {plan.tiles} | {plan.peak_rss_mb:.0f} | {peak:.0f} | "
                            f"{100 * err:+.1f}% | {plan.time_s:.0f} | {wall:.0f} |")
                raw.append({"stitch": stitch, "tile": t, "plan": plan.as_dict(), "measured_mb": peak, "wall_s": wall})
                print(rows[-1], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(rows) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(raw, indent=2))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
