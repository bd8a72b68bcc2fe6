"""What a skewed band costs: the same volume streamed (``--engine stream``) in forced band counts, spilled or not, one
fresh process each, the plans alternating round by round (this machine's speed drifts by several percent an hour).

    python benchmarks/band_counts.py --shape 2048x2048x512 --plans 8:never,12:auto,16:auto --rounds 2
    python benchmarks/band_counts.py --shape 2048 --plans 8:never --rounds 1      # 16 GiB of input, ~10 min a run

A plan is COUNT:SPILL: COUNT skewed bands (``volinfer.run.skewed_bands.FORCE_COUNT``), SPILL ``never`` (nothing
spilled) or ``auto`` (the planner's choice among that count's plans: all skip connections spilled where the leaner plan
is within its 10%). Each row: segment calls, wall and inference seconds (the run's ``--json``), spill and strip files
written and read, and the child's own peak RSS (VmHWM). The README's "Larger volumes" quotes these rows; the planner's
STREAM_CALL_S (``volinfer.run.setup``) is fitted to them.
"""

import argparse
from pathlib import Path

from volinfer.bench.child_peak import measured_run
from volinfer.bench.cli import reference_model
from volinfer.bench.report import save_rows
from volinfer.bench.volumes import make_volume

PRELUDE = ("from volinfer.run import skewed_bands, stream\n"
           "skewed_bands.FORCE_COUNT = {count}\nstream.SPILL = {spill!r}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="2048x2048x512", help="N (a cube) or XxYxZ: the int16 volume generated")
    ap.add_argument("--plans", default="8:never,12:auto,16:auto", help="COUNT:SPILL, comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", type=Path, help="IR to run (default: the reference U-Net, built in --work-dir)")
    ap.add_argument("--work-dir", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/band_counts.md"))
    a = ap.parse_args()
    dims = [int(v) for v in a.shape.lower().split("x")]
    shape = tuple(dims * 3 if len(dims) == 1 else dims)
    name = "x".join(map(str, shape))
    a.work_dir.mkdir(parents=True, exist_ok=True)
    model = a.model or reference_model(a.work_dir, 128)
    vol = make_volume(a.work_dir / f"volume_{name}.nii", shape, slab=16)
    out = a.work_dir / "band_counts_out.nii"
    rows = ["| volume | skewed bands | spill | segment calls | wall (s) | inference (s) | files written / read "
            "(GiB) | peak (MiB) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    raw = []
    for r in range(a.rounds):
        for spec in a.plans.split(","):
            count, spill = spec.split(":")
            args = [vol, "-m", model, "-o", out, "--overwrite", "--engine", "stream"]
            peak, rep = measured_run(args, out.with_suffix(".hwm"), timeout=7200,
                                     prelude=PRELUDE.format(count=int(count), spill=spill))
            s = rep.get("spill") or {}
            rows.append(f"| {name} | {count} | {spill}: {s.get('tensors', 0)} spilled | "
                        f"{rep['tiles']} | {rep['wall_s']:.1f} | {rep['infer_busy_s']:.1f} | "
                        f"{s.get('written_mb', 0) / 1024:.1f} / {s.get('read_mb', 0) / 1024:.1f} | {peak:.0f} |")
            raw.append({"round": r, "plan": spec, "peak_mb": peak, "run": rep})
            print(rows[-1], flush=True)
    out.unlink(missing_ok=True)
    out.with_suffix(".hwm").unlink(missing_ok=True)
    save_rows(a.out, rows, raw)


if __name__ == "__main__":
    main()
