"""Peak RAM and time of volinfer vs lean naive whole-volume OpenVINO inference across volume sizes, up to 1024³
(naive is skipped where it would not fit in RAM). For the comparison with MONAI and nnU-Net see headline.py.

    python benchmarks/memory_reduction.py                      # 256, 512, 768, 1024 cubes; naive, crop, gaussian
    python benchmarks/memory_reduction.py --sizes 128,256

Every configuration runs in its own process; results go to benchmarks/results/ (results.md, results.json,
results_peak_rss.png) next to this script.
"""

import sys
from pathlib import Path

from volinfer.bench.cli import bench

RESULTS = Path(__file__).resolve().parent / "results"

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith(("--sizes", "-s")) for a in args):
        args = ["--sizes", "256,512,768,1024", *args]
    if not any(a.startswith(("--output", "-o")) for a in args):
        args = ["--output", str(RESULTS), *args]
    sys.argv = [sys.argv[0], *args]  # the report records the full command, defaults included
    bench.main(args=args, prog_name="memory_reduction.py")
