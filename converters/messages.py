"""Turning framework errors (OpenVINO, torch, TensorFlow, Keras) into the one line that says what is wrong.

OpenVINO prefixes its messages with source locations (``Exception from src/inference/src/cpp/core.cpp:84:``,
``Check '...' failed at src/...``); TensorFlow and Keras add advice paragraphs and tracebacks. The meaningful line
is the most specific one left once those are dropped.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

from volinfer.errors import VolinferError

_NOISE = re.compile(r"^(Exception from \S+:\d+:?$|Check '.*' failed at \S+|\[ ?\w+ ?\]$|Traceback |File \"|"
                    r"Please |You can |For more information|Summary:|-+$|\^+$)")
_LOCATION = re.compile(r"^(Exception from |\[ ?(GENERAL_ERROR|NOT_FOUND|PARAMETER_MISMATCH) ?\]\s*)?"
                       r"(src|\.\./)\S*:\d+:?\s*")


def framework_message(e: BaseException, limit: int = 300) -> str:
    """The most specific line of a (often multi-paragraph) framework error, without source locations."""
    lines = []
    for raw in str(e).splitlines():
        ln = _LOCATION.sub("", raw.strip()).strip()
        if ln and not _NOISE.match(ln):
            lines.append(ln)
    if not lines:
        return type(e).__name__
    # OpenVINO puts the cause first after the locations, Python frameworks last: prefer a line that reads as an
    # error statement, else the first remaining one.
    text = lines[0] if len(lines) == 1 else next(
        (ln for ln in lines if re.search(r"(?i)\b(error|unable|cannot|can't|not found|invalid|unsupported|"
                                         r"mismatch|expected|missing|unknown|failed)\b", ln)), lines[0])
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def framework_errors(what: str) -> Iterator[None]:
    """Re-raise any non-volinfer exception inside as ``VolinferError("{what}: <meaningful line>")``."""
    try:
        yield
    except VolinferError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:
        raise VolinferError(f"{what}: {framework_message(e)}") from None
