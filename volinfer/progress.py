"""The one place progress is shown: a tqdm bar on a terminal, plain lines elsewhere.

tqdm redraws its bar with carriage returns; written to a file (a batch job's log, CI, ``2>log``) those frames are
noise in front of the line that matters. So a bar is drawn only when stderr is a terminal. Otherwise each finished
stage (a conversion stage, a run's tile loop, a pass of statistics) becomes one line, kept until the command
reports success (:func:`flush_finished`, called by ``cliutil.emit``): a failing command's stderr stays the one
``error:`` line, a successful one says what took how long.
"""

from __future__ import annotations

import sys
import time
from typing import Any

#: Lines of stages that finished while stderr is not a terminal, printed with the command's summary.
_finished: list[str] = []


def progress_bar(total: int | float | None = None, desc: str = "", unit: str = "it", *, disable: bool = False,
                 initial: int = 0, leave: bool = False) -> Any:
    """A progress display on stderr (never stdout: ``--json`` output stays parseable): a tqdm bar on a terminal,
    a :class:`StageLines` recorder otherwise; nothing at all with ``disable`` (``--quiet``, ``--json``)."""
    from tqdm import tqdm

    if disable or not _is_terminal(sys.stderr):
        return StageLines(total, desc, unit, initial=initial, record=not disable)
    return tqdm(total=total, desc=desc or None, unit=unit, initial=initial, file=sys.stderr, leave=leave,
                dynamic_ncols=True)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class StageLines:
    """tqdm's interface (``update``, ``set_description_str``, ``set_postfix_str``, ``close``, context manager)
    without drawing: a bar counting stages (``unit="stage"``) records one line per finished stage, any other one
    line when it closes having counted something."""

    def __init__(self, total: int | float | None, desc: str, unit: str, *, initial: int = 0,
                 record: bool = True) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.initial, self.record, self.postfix = initial, record, ""
        self.start = self.stage_start = time.monotonic()
        self.closed = False

    def update(self, n: int | float = 1) -> None:
        """Count ``n`` more; a stage counter records the stage that just finished."""
        self.n += n
        if self.unit == "stage":
            now = time.monotonic()
            self._record(f"{self.desc}: done in {now - self.stage_start:.1f} s")
            self.stage_start = now

    def set_description_str(self, desc: str | None = None, refresh: bool = True) -> None:
        """Name what runs now (a stage counter's next stage starts its clock here)."""
        self.desc = desc or ""
        self.stage_start = time.monotonic()

    set_description = set_description_str

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """A detail for the closing line (e.g. the throughput)."""
        self.postfix = s

    def refresh(self) -> None:
        """Nothing to redraw."""

    @staticmethod
    def write(s: str, file: Any = None, end: str = "\n") -> None:
        """A log line written at once, as ``tqdm.write`` does beside a bar."""
        (file or sys.stderr).write(s + end)

    def close(self) -> None:
        """Record the closing line of a counter that counted something (once)."""
        if self.closed:
            return
        self.closed = True
        if self.unit != "stage" and self.n > self.initial:
            of = f"/{self.total:g}" if self.total else ""
            tail = f", {self.postfix}" if self.postfix else ""
            label = f"{self.desc}: " if self.desc else ""
            self._record(f"{label}{self.n:g}{of} {self.unit}(s) in {time.monotonic() - self.start:.1f} s{tail}")

    def _record(self, line: str) -> None:
        if self.record:
            _finished.append(line)

    def __enter__(self) -> "StageLines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def flush_finished(write: Any) -> None:
    """Hand the recorded stage lines to ``write`` (one call per line) and forget them."""
    lines, _finished[:] = list(_finished), []
    for line in lines:
        write(line)


def discard_finished() -> None:
    """Forget the recorded stage lines (a failing command prints only its error)."""
    _finished.clear()
