"""A minimal process that starts benchmark workers and reports their peak RSS. Standard library only.

Why it exists: Linux carries a process's memory high-water mark across ``exec`` (``ru_maxrss`` of a child starts at
its parent's resident size when it forked). A benchmark parent that has loaded PyTorch or a volume would make every
child look at least that big. This spawner is started as a plain script (``python spawner.py``, without importing
volinfer), stays at ~10 MB, and starts every worker itself, so each worker's ``ru_maxrss`` from ``wait4`` is its own.

Protocol: one JSON request per line on stdin ``{"argv": [...], "cap_mb": N, "timeout_s": T}``; one JSON line back
``{"rc": int, "peak_mb": float, "cpu_s": float, "wall_s": float, "killed": bool, "stderr_tail": str}`` — peak RSS,
user + system CPU time and wall time of the whole child process (interpreter start and imports included).
"""

import json
import os
import subprocess
import sys
import time


def _rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def run(argv, cap_mb, timeout_s=None):
    err_path = f"volinfer-bench-{os.getpid()}.err"  # in the working directory the harness gave us
    with open(err_path, "wb") as err:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    killed = False
    t0 = time.time()
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if not killed and (_rss_mb(p.pid) > cap_mb or (timeout_s and time.time() - t0 > timeout_s)):
            p.kill()
            killed = True
        time.sleep(0.05)
    p.returncode = os.waitstatus_to_exitcode(status)
    with open(err_path, "rb") as f:
        tail = f.read().decode(errors="replace").strip().splitlines()[-1:] or [""]
    os.unlink(err_path)
    return {"rc": p.returncode, "peak_mb": ru.ru_maxrss / 1024.0, "cpu_s": ru.ru_utime + ru.ru_stime,
            "wall_s": time.time() - t0, "killed": killed, "stderr_tail": tail[0][-500:]}


def main():
    for line in sys.stdin:
        req = json.loads(line)
        res = run(req["argv"], req.get("cap_mb", float("inf")), req.get("timeout_s"))
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
