"""Stopping promptly on SIGINT/SIGTERM, even inside a long framework call.

Python runs a signal handler only between bytecodes of the main thread: while OpenVINO compiles a large model or
PyTorch runs a big convolution, Ctrl-C or a scheduler's SIGTERM waits for that call to return (tens of seconds on a
large model). :func:`arm` makes the C-level signal handler also write the signal's number to a socket (Python's
``signal.set_wakeup_fd``); a watcher thread blocked on that socket wakes at once and gives the main thread
``grace_s`` seconds to unwind normally (the command's own handler: one line, partial outputs removed, exit 130/143).
If it has not exited by then, the watcher removes the files registered with :func:`partial` itself, says one line
and ends the process with the same status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

#: Files being written that must not survive an interruption.
_partial: set[Path] = set()
_lock = threading.Lock()
_armed: list[socket.socket] = []
#: Where the watcher's line goes (the real stderr, also while framework noise is captured; see volinfer.noise).
stderr_fd = [2]


@contextlib.contextmanager
def partial(*paths: Path) -> Iterator[None]:
    """Register ``paths`` as partial outputs for the block: removed if the process is stopped by the watcher."""
    with _lock:
        _partial.update(Path(p) for p in paths)
    try:
        yield
    finally:
        with _lock:
            _partial.difference_update(Path(p) for p in paths)


def command_line() -> bool:
    """Whether this process is the volinfer command line (not a library caller or a test runner: `python -m pytest`
    also runs a ``__main__.py``, and a watcher armed there would end the test run with the first interrupted
    command)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:  # python -m NAME
        return spec.name in ("volinfer", "volinfer.__main__")
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("volinfer", "volinfer.exe")


def armed() -> bool:
    """Whether the watcher runs in this process."""
    return bool(_armed)


def exit_now(status: int) -> None:
    """End an interrupted command at once (its cleanup has run): no interpreter teardown, whose framework
    destructors can take seconds, or abort the process ("terminate called without an active exception", exit 134,
    when OpenVINO's threads are still running). Only in a command-line process (:func:`command_line`)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def arm(grace_s: float = 1.0) -> bool:
    """Start the watcher (once per process; the command line's main thread only). False where it is not
    started."""
    if _armed:
        return True
    if threading.current_thread() is not threading.main_thread() or not command_line():
        return False  # a library caller (or a test runner) keeps its own signal handling
    read, write = socket.socketpair()
    write.setblocking(False)
    try:
        signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):
        read.close()
        write.close()
        return False
    _armed.extend([read, write])
    threading.Thread(target=_watch, args=(read, grace_s), name="volinfer-watchdog", daemon=True).start()
    return True


def _watch(read: socket.socket, grace_s: float) -> None:
    stops = {int(signal.SIGINT), int(signal.SIGTERM)}
    while True:
        data = read.recv(64)
        if not data:
            return
        hits = [b for b in data if b in stops]
        if hits:
            break
    time.sleep(grace_s)  # the main thread normally exits during this
    with _lock:
        for p in list(_partial):
            with contextlib.suppress(OSError):
                p.unlink()
    with contextlib.suppress(OSError):
        os.write(stderr_fd[0], b"interrupted: stopped; no output was written\n")
    os._exit(128 + hits[0])
