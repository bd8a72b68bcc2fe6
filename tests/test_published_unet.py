"""A published-style stride-16 InstanceNorm U-Net (tests/in_unet.py: 27 InstanceNorm3d, LeakyReLU, Dropout3d,
trilinear align_corners=True upsampling, softmax), through `file.py:factory --weights` as people publish it: the
conversion reads the receptive field from the graph (no probe), stays within its memory budget — peak RSS of the
child process read from /proc/<pid>/status (VmHWM) — and the IR run with default settings agrees with the model's
own PyTorch whole-volume prediction. A narrow version (base 4 instead of 23 channels: the ~16 M-parameter one is
benchmarks/convert_memory.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import in_unet  # noqa: E402

import volinfer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGET_MB = 2048


def _vm_hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def convert_in_child(args: list[str], cwd: Path) -> tuple[dict, float]:
    """``volinfer convert ARGS --json`` in a child; (its JSON, its peak RSS in MB polled from /proc)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "volinfer", "convert", *args, "--json"], cwd=cwd, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while p.poll() is None:
        peak = max(peak, _vm_hwm_mb(p.pid) or 0.0)
        time.sleep(0.05)
    out, err = p.communicate()
    assert p.returncode == 0, err
    return json.loads(out), peak


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS read from /proc")
def test_in_unet_converts_within_budget_from_the_graph_and_runs_at_dice(tmp_path):
    torch.manual_seed(0)
    net = in_unet.build(base=4, classes=2).eval()
    assert sum(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules()) == 27
    rng = np.random.default_rng(1)
    vol = rng.standard_normal((37, 30, 26)).astype(np.float32)
    vol[8:28, 6:24, 5:20] += 2.0  # a bright box: structure, not only noise
    padded = [-(-n // 16) * 16 for n in vol.shape]  # the model's own whole-volume input: zero-padded to 16
    x = torch.from_numpy(np.pad(vol, [(0, p - n) for p, n in zip(padded, vol.shape)])[None, None])
    with torch.no_grad():  # balance the random head so that both labels cover about half the volume
        prob = net(x)[0]
        net.head.bias[1] -= float(torch.log(prob[1] / prob[0]).median())
        want = net(x).numpy()[0].argmax(0)[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
    assert 0.2 < (want == 1).mean() < 0.8
    torch.save(net.state_dict(), tmp_path / "w.pth")
    data, peak = convert_in_child([f"{ROOT / 'tests' / 'in_unet.py'}:build", "--factory-args", '{"base": 4}',
                                   "--weights", "w.pth", "-o", "m.xml", "--no-fp16", "--no-speed-profile",
                                   "--max-memory", f"{BUDGET_MB}M"], tmp_path)
    s = data["settings"]
    assert s["receptive_field_method"].startswith("from the graph") and s["size_multiple"] == 16
    assert s["receptive_field"] == [168] * 3  # 3x(1+2+4+8+16) + pools 15 + upsampling 1.5x30 + decoder 2x15
    assert 0 < peak <= BUDGET_MB and data["peak_rss_mb"] == pytest.approx(peak, rel=0.1)
    # default settings against PyTorch on the whole volume (odd shape)
    labels = volinfer.predict(vol, str(tmp_path / "m.xml"))
    a, b = labels == 1, want == 1
    assert labels.shape == vol.shape and 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99
