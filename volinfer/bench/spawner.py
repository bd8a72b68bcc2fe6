"""A minimal process that starts benchmark workers and reports their peak RSS. Standard library only.

Why it exists: Linux carries a process's memory high-water mark across ``exec`` (``ru_maxrss`` of a child starts at
its parent's resident size when it forked). A benchmark parent that has loaded PyTorch or a volume would make every
child look at least that big. This spawner is started as a plain script (``python spawner.py``, without importing
volinfer), stays at ~10 MB, and starts every worker itself, so each worker's ``ru_maxrss`` from ``wait4`` is its own.

Protocol: one JSON request per line on stdin ``{"argv": [...], "cap_mb": N, "timeout_s": T}``; one JSON line back
``{"rc": int, "peak_mb": float, "cpu_s": float, "wall_s": float, "killed": bool, "stderr_tail": str}`` — peak RSS,
user + system CPU time and wall time of the whole child process (interpreter start and imports included). Where
``wait4`` is missing (Windows) the figures come from polling the child (psutil), or are NaN without psutil.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time


def _load_portable():
    """volinfer's platform module (standard library only), loaded by path: importing the package would load
    OpenVINO and numpy into this process, whose small size is the point."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "portable.py")
    spec = importlib.util.spec_from_file_location("_volinfer_portable", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


portable = _load_portable()


def _rss_mb(pid):
    """The child's resident memory now (MB): /proc, else psutil; 0.0 where unknown (then no cap is enforced)."""
    return portable.rss_mb(pid) or 0.0


def _number(value):
    """A figure the OS could not give (no wait4 and no psutil) is NaN, so the harness's arithmetic still runs."""
    return float("nan") if value is None else float(value)


def run(argv, cap_mb, timeout_s=None):
    err_path = f"volinfer-bench-{os.getpid()}.err"  # in the working directory the harness gave us
    with open(err_path, "wb") as err:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    t0 = time.time()

    def over():
        return _rss_mb(p.pid) > cap_mb or bool(timeout_s and time.time() - t0 > timeout_s)

    ans = portable.wait_child(p, over)  # wait4's exact figures on Linux/macOS; polling elsewhere
    with open(err_path, "rb") as f:
        tail = f.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
    os.unlink(err_path)
    return {"rc": ans["rc"], "peak_mb": _number(ans["peak_mb"]), "cpu_s": _number(ans["cpu_s"]),
            "wall_s": time.time() - t0, "killed": ans["killed"], "stderr_tail": tail[0][-500:]}


def main():
    for line in sys.stdin:
        req = json.loads(line)
        res = run(req["argv"], req.get("cap_mb", float("inf")), req.get("timeout_s"))
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
