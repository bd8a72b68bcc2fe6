"""The plan's prediction for a run that makes a statistics pass before its tile loop (percentile normalisation of a
float volume: NaN/Inf scan, then percentiles, mean and std), against the peak RSS of the same run measured in a
fresh child process."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from models import save_unet2

import volinfer.bench.spawner as spawner_module
from volinfer.run.plan import plan_run

SHAPE = (200, 184, 160)  # 5.9 M float32 voxels: the percentile sample (the whole volume here) dominates the loop


def measure_peak_mb(argv: list[str], timeout_s: float = 300) -> tuple[int, float, str]:
    """Run ``argv`` from volinfer's bench spawner (a ~10 MB process that imports nothing of volinfer), so the peak RSS
    the OS reports for the child is the child's own; returns (exit code, peak MB, last stderr line)."""
    p = subprocess.Popen([sys.executable, spawner_module.__file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        out, _ = p.communicate(json.dumps({"argv": argv, "timeout_s": timeout_s}) + "\n", timeout=timeout_s + 30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    res = json.loads(out.strip().splitlines()[-1])
    return res["rc"], res["peak_mb"], res["stderr_tail"]


def test_plan_counts_the_statistics_pass(tmp_path: Path):
    rng = np.random.default_rng(5)
    vol = (rng.standard_normal(SHAPE) * 100 + rng.standard_exponential(SHAPE) ** 3).astype(np.float32)
    path = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    del vol
    xml = save_unet2(tmp_path / "m.xml", normalization=json.dumps({"kind": "percentile", "lower": 1, "upper": 99}))
    plan = plan_run([path], xml, tile=64, overlap=16, stitch="crop")
    rc, peak, err = measure_peak_mb([sys.executable, "-m", "volinfer", "run", str(path), "-m", str(xml), "-o",
                                     str(tmp_path / "o.nii"), "--tile", "64", "--overlap", "16", "--stitch", "crop",
                                     "-q"])
    assert rc == 0, err
    loop_only = plan.parts_mb["model (steady)"] + sum(v for k, v in plan.parts_mb.items()
                                                      if k in ("reader", "stitch", "tile temporaries"))
    assert peak > 1.2 * loop_only, (plan, peak)  # the statistics pass matters here: a plan without it is red
    assert abs(plan.peak_rss_mb - peak) / peak < 0.20, (plan, peak)
