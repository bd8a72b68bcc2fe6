"""Framework log noise kept off the user's stderr.

TensorFlow, absl and OpenVINO's C++ code log straight to file descriptor 2 (``E0000 … text_format.cc:417] Error
parsing text-format …`` once per frontend that tries a file), torch warns through Python's ``warnings``
(``TracerWarning`` on every trace). None of it says what volinfer's one line does not already say, and a batch log
or a ``-q`` run should not carry it. :func:`captured` sends descriptor 2 to a temporary file for the duration of a
command while Python's own ``sys.stderr`` (volinfer's messages, progress bars, click) keeps writing to the real
stderr, and records warnings instead of printing them. With ``VOLINFER_DEBUG=1`` nothing is captured.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Iterator

from volinfer import watchdog

#: Python loggers of the frameworks, silenced while captured.
FRAMEWORK_LOGGERS = ("tensorflow", "absl", "keras", "h5py", "torch", "onnxruntime", "nncf")
#: A C++ log line of absl / TensorFlow / glog: ``E0000 00:00:1796524362.590101    6312 file.cc:417] message``.
_CPP_LOG = re.compile(r"^[EF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] (?P<msg>.+)$")


@dataclass
class Captured:
    """What the frameworks wrote while captured: descriptor-2 text (once the capture ends) and warnings."""

    text: str = ""
    warnings: list[str] = field(default_factory=list)

    def reason(self) -> str | None:
        """The last error a C++ framework logged (absl/glog ``E``/``F`` lines), as one line, or None."""
        hits = [m.group("msg").strip() for m in map(_CPP_LOG.match, self.text.splitlines()) if m]
        return hits[-1][:200] if hits else None


def debugging() -> bool:
    """``VOLINFER_DEBUG`` set (to anything but empty or 0): show tracebacks and every framework message."""
    return os.environ.get("VOLINFER_DEBUG", "") not in ("", "0")


def _descriptor(stream: object) -> int:
    try:
        return int(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return -1


@contextlib.contextmanager
def captured() -> Iterator[Captured]:
    """Capture descriptor 2 and Python warnings for the block (see the module text); yields a :class:`Captured`
    that is filled when the block ends. A no-op with ``VOLINFER_DEBUG`` or when stderr has no descriptor."""
    result = Captured()
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        original = -1
    if debugging() or original < 0:
        if original >= 0:
            os.close(original)
        yield result
        return
    sink = tempfile.TemporaryFile()
    saved_stderr = sys.stderr
    if _descriptor(saved_stderr) == 2:  # Python-level writers keep the real stderr (never closed: loggers made
        sys.stderr = io.TextIOWrapper(  # meanwhile may hold it); a stream of its own (a test runner's) stays
            os.fdopen(os.dup(original), "wb", buffering=0), encoding=getattr(saved_stderr, "encoding", None)
            or "utf-8", errors="replace", line_buffering=True, write_through=True)
    os.dup2(sink.fileno(), 2)
    watchdog.stderr_fd[0] = original  # its last word reaches the user
    loggers = [logging.getLogger(name) for name in FRAMEWORK_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # TensorFlow/absl/Keras log through Python too (deprecations, load notices)
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda msg, cat, *a, **k: result.warnings.append(f"{cat.__name__}: {msg}")
            yield result
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(original, 2)
        watchdog.stderr_fd[0] = 2
        os.close(original)
        sys.stderr = saved_stderr
        sink.seek(0)
        result.text = sink.read().decode("utf-8", "replace")
        sink.close()
