"""Shared helpers of the command-line tools: one-line errors, option parsing."""

from __future__ import annotations

import functools
import os
import signal
import sys
from typing import Any, Callable

import click

from .errors import Interrupted, VolinferError, framework_message


#: The signal that interrupted this process (SIGINT or SIGTERM), for the exit status 128 + signal.
_received: list[int] = []


def _raise_interrupt(signum: int, frame: Any) -> None:
    if not _received:
        _received.append(signum)
    raise KeyboardInterrupt


def interrupt_status() -> int:
    """Exit status for an interrupted run: 130 for SIGINT (Ctrl-C), 143 for SIGTERM, as shells report them."""
    return 128 + (_received[0] if _received else int(signal.SIGINT))


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one line on stderr and exit code 2; SIGINT/SIGTERM into exit 130/143. No tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if hasattr(signal, "SIGXFSZ"):  # a file-size limit then fails the write (EFBIG) instead of killing us
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _raise_interrupt)  # batch schedulers send SIGTERM before killing
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, _raise_interrupt)
        try:
            return fn(*args, **kwargs)
        except Interrupted as e:
            click.echo(f"interrupted: {e}", err=True)
            sys.exit(interrupt_status())
        except VolinferError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: no output was written", err=True)
            sys.exit(interrupt_status())
        except MemoryError:
            click.echo("error: out of memory; use a smaller --tile or fewer --requests", err=True)
            sys.exit(2)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own control flow (usage errors, --help inside a command)
        except Exception as e:  # a bug or an unforeseen library error: still one line, with the way to see more
            if os.environ.get("VOLINFER_DEBUG"):
                raise
            click.echo(f"error: internal error ({type(e).__name__}: {framework_message(e)}); rerun with "
                       f"VOLINFER_DEBUG=1 for the traceback", err=True)
            sys.exit(1)

    return wrapper


def parse_tile(value: str | None) -> Any:
    if not value or value.strip().lower() == "auto":
        return None
    try:
        parts = [int(v) for v in value.lower().replace("x", ",").split(",")]
    except ValueError:
        raise VolinferError(f"--tile expects a size (128) or three sizes (128,128,64); got {value!r}") from None
    return parts[0] if len(parts) == 1 else parts
