"""The README's headline comparison, in one run of one command: volinfer (crop and Gaussian stitching) against lean
naive whole-volume inference (OpenVINO and PyTorch), MONAI's ``sliding_window_inference`` and nnU-Net v2's
sliding-window predictor (where installed), plus OpenVINO inference alone on the same tiles, at 256³ and 512³.
Every method z-scores the input with the whole volume's statistics (volinfer: stored in the reference IR).

    python benchmarks/headline.py                  # about 10 minutes on 2 cores; needs ~14 GB RAM for naive PyTorch
    python benchmarks/headline.py --sizes 256      # one size (any `volinfer bench` option may be added)

Writes benchmarks/results/headline.md, headline.json and headline_peak_rss.png (next to this script, wherever it is
run from); generated volumes and the reference model go to a temporary directory (or --work-dir).
"""

from pathlib import Path

from volinfer.bench.cli import main_with_defaults

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = {"--sizes": "256,512", "--methods": "naive,crop,gaussian,auto,infer-only", "--vs": "all",
            "--tile": "128", "--overlap": "0.25", "--precision": "f32", "--output": str(RESULTS), "--name": "headline"}

if __name__ == "__main__":
    main_with_defaults(DEFAULTS, "headline.py")
