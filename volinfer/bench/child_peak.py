"""`volinfer run` in a fresh child process, measured by the child itself: the OS's ru_maxrss of a child carries its
parent's resident size (a test runner or benchmark that has loaded OpenVINO, maybe PyTorch) across fork and exec, so
the child writes its own high-water mark (``VmHWM``, Linux) to a file as it exits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

#: The child: pops the file to write its VmHWM (MB) to, then runs the volinfer command line with the rest.
HWM_CHILD = """
import atexit, sys
path = sys.argv.pop(1)
def hwm():
    with open("/proc/self/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    with open(path, "w") as f:
        f.write(str(kb / 1024))
atexit.register(hwm)
from volinfer.cli import main
sys.argv[0] = "volinfer"
main()
"""


def measured_run(args: Sequence[Any], hwm: Path, timeout: float = 1800,
                 prelude: str = "") -> tuple[float, dict[str, Any]]:
    """Peak RSS (MB, the child's own VmHWM, written to ``hwm``) and the ``--json`` report of
    ``volinfer run ARGS -q --json`` in a fresh process; RuntimeError with the end of its stderr if it fails.
    ``prelude``: Python the child runs first (benchmarks forcing a planner setting)."""
    p = subprocess.run([sys.executable, "-c", prelude + HWM_CHILD, str(hwm), "run", *map(str, args), "-q", "--json"],
                       capture_output=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(p.stderr.decode()[-2000:])
    return float(Path(hwm).read_text()), json.loads(p.stdout)
