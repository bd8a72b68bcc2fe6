"""Peak RAM and time of volinfer vs naive whole-volume OpenVINO inference (and MONAI where installed).

This is the command behind the README's results table; it is `volinfer bench` with the README's settings:

    python benchmarks/memory_reduction.py                      # 256, 512, 768, 1024 cubes; naive, crop, gaussian
    python benchmarks/memory_reduction.py --sizes 128,256 --vs monai

Every configuration runs in its own process; results go to benchmarks/results/ (results.md, .json, peak_rss.png).
"""

import sys

from volinfer.bench.cli import bench

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a.startswith("--sizes") for a in args):
        args = ["--sizes", "256,512,768,1024", *args]
    bench.main(args=args, prog_name="memory_reduction.py")
