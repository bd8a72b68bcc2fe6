"""The scale headline (issue 14): volinfer with default settings at 512³, 1024³ and 2048³ against naive OpenVINO and
MONAI, in one run of one command. Volumes are generated on disk slab by slab (never whole in RAM: 2048³ int16 is
16 GiB of disk); naive OpenVINO and MONAI run where their predicted peak fits under the harness's memory cap and are
otherwise reported as skipped with the peak extrapolated from their measured growth (labelled so in the table).
Every method z-scores the input with the whole volume's statistics (volinfer: stored in the reference IR).

    python benchmarks/scale.py                              # 512³, 1024³, 2048³: hours on 2 cores; ~20 GB disk
    python benchmarks/scale.py --sizes 512,1024             # without the 2048³ run

Writes benchmarks/results/scale.md, scale.json and scale_peak_rss.png. Not yet run to completion on the project
machine (see the README's limitations).
"""

from pathlib import Path

from volinfer.bench.cli import main_with_defaults

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {"--sizes": "512,1024,2048", "--methods": "naive,crop,auto", "--vs": "monai", "--tile": "128",
            "--overlap": "0.25", "--precision": "f32", "--output": str(RESULTS), "--name": "scale"}

if __name__ == "__main__":
    main_with_defaults(DEFAULTS, "scale.py")
