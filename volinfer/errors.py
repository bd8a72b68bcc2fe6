"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""

from __future__ import annotations

import re
from typing import Any


class VolinferError(Exception):
    """Something about the user's input, model or options is wrong; the message says what and how to fix it."""


class Interrupted(VolinferError):
    """The run was interrupted (Ctrl-C, SIGTERM); the message says whether it can be resumed."""


#: Lines of OpenVINO / framework messages that say where, not what: source locations and check boilerplate.
_BOILERPLATE = (
    re.compile(r"^Exception from \S+:\d+:?$"),
    re.compile(r"^Check '.*' failed at \S+:\d+:?$"),
    re.compile(r"^While validating node '.*'"),
    re.compile(r"^\[ ?(GENERAL_ERROR|NOT_IMPLEMENTED|NETWORK_NOT_LOADED|PARAMETER_MISMATCH) ?\]$"),
    re.compile(r"^Traceback \(most recent call last\):$"),
)


def framework_message(error: BaseException, limit: int = 300) -> str:
    """The meaningful part of an OpenVINO (or other framework) exception, as one line: location lines such as
    ``Exception from src/inference/src/cpp/core.cpp:84:`` and ``Check '...' failed at ...`` boilerplate are
    dropped, the lines that say what is wrong are joined. Falls back to the exception's type name."""
    lines = [ln.strip() for ln in str(error).splitlines()]
    kept = [ln for ln in lines if ln and not any(p.match(ln) for p in _BOILERPLATE)]
    if not kept:
        kept = [ln for ln in lines if ln][:1] or [type(error).__name__]
    text = " ".join(kept)
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def strip_path(message: str, path: Any) -> str:
    """``message`` without a leading ``"<path>: "``, and any further mention of the path shortened to its file name
    (errors name their file; a line that already says which file failed should not say it twice)."""
    prefix = f"{path}: "
    message = message[len(prefix):] if message.startswith(prefix) else message
    name = getattr(path, "name", None)
    return message.replace(str(path), name) if name else message  # a library's own text may quote it again
