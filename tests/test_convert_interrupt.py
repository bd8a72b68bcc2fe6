"""SIGINT/SIGTERM end `volinfer convert` within 2 s at any stage — also inside a long framework call (PyTorch
tracing, OpenVINO conversion and compilation, inference) — with exit status 130/143 and no output, partial or whole,
left behind. The child's stderr is a pseudo-terminal so that its progress bar names the stage it is in: the signal
is sent when the wanted stage shows."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest
from models import _conv, tiny_unet

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def _stop_at(stage: str, sig: int, args: list[str], cwd: Path, after: float = 0.0) -> tuple[int, float, str]:
    """Run ``volinfer ARGS`` with stderr on a pty, send ``sig`` ``after`` seconds after ``stage`` appears;
    (status, seconds from the signal to the exit, what stderr said)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal 160 columns wide
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VOLINFER_DEBUG": ""}
    p = subprocess.Popen([sys.executable, "-m", "volinfer", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    seen, deadline = b"", time.monotonic() + 240
    try:
        while stage.encode() not in seen:
            assert p.poll() is None, f"ended before {stage!r}: {seen.decode(errors='replace')[-300:]}"
            assert time.monotonic() < deadline, f"{stage!r} never showed"
            if select.select([master], [], [], 0.05)[0]:
                seen += os.read(master, 4096)
                seen = seen[-4096:]
        time.sleep(after)
        t0 = time.monotonic()
        p.send_signal(sig)
        status = p.wait(timeout=30)
        took = time.monotonic() - t0
        while select.select([master], [], [], 0.1)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        if p.poll() is None:
            p.kill()
        os.close(master)
    return status, took, seen.decode(errors="replace")


def heavy() -> ov.Model:
    """Two 5³ convolutions of 48 channels: one inference at 128³ is one call into OpenVINO of several seconds."""
    rng = np.random.default_rng(0)
    p = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    x = ops.relu(_conv(p, 1, 48, 5, rng, "NCDHW"))
    return ov.Model([_conv(ops.relu(_conv(x, 48, 48, 5, rng, "NCDHW")), 48, 2, 1, rng, "NCDHW")], [p], "heavy")


CASES = [  # (source, stage, signal)
    ("factory", "convert: loading the source", signal.SIGINT),
    ("factory", "convert: export to OpenVINO", signal.SIGTERM),
    ("ir", "convert: speed profile", signal.SIGTERM),
    ("ir", "convert: parity check", signal.SIGINT),
    ("heavy", "convert: parity check", signal.SIGTERM),  # inside one inference of ~30 s: the watcher ends it
]


@pytest.mark.parametrize("source,stage,sig", CASES, ids=[f"{s}-{st.split(': ')[1]}" for s, st, _ in CASES])
def test_a_signal_ends_convert_within_two_seconds_leaving_nothing(tmp_path, source, stage, sig):
    if source == "factory":  # PyTorch: import, tracing and OpenVINO's conversion are long calls into C++
        args = [f"{HERE / 'in_unet.py'}:build", "--factory-args", '{"base": 4}', "--random-weights", "--no-fp16"]
    elif source == "ir":  # an IR at a large tile: compilation and inference are calls into OpenVINO
        ov.save_model(tiny_unet(levels=2), str(tmp_path / "src.xml"))
        args = [str(tmp_path / "src.xml"), "--tile", "160"]
    else:
        ov.save_model(heavy(), str(tmp_path / "src.xml"))
        args = [str(tmp_path / "src.xml"), "--tile", "128", "--precision", "f32", "--no-speed-profile"]
    status, took, said = _stop_at(stage, sig, ["convert", *args, "-o", "out.xml"], tmp_path,
                                  after=3.0 if source == "heavy" else 0.0)
    assert status == 128 + int(sig), said[-300:]
    assert took <= 2.0, f"{took:.2f} s"
    assert "interrupted" in said.splitlines()[-1]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("src.xml", "src.bin"))
    assert left == [], left
