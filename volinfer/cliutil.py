"""Shared helpers of the command-line tools: one-line errors, option parsing, and the conventions every command
follows (shared runtime options, human text on stderr and ``--json`` on stdout, progress bars on stderr)."""

from __future__ import annotations

import functools
import signal
import sys
from typing import Any, Callable

import click

from volinfer import noise, portable
from volinfer import validate as V
from volinfer import watchdog
from volinfer.errors import Interrupted, VolinferError, framework_message
from volinfer.progress import discard_finished, flush_finished
from volinfer.progress import progress_bar as progress_bar  # noqa: F401  (the commands' one way to show progress)


#: The signal that interrupted this process (SIGINT or SIGTERM), for the exit status 128 + signal.
_received: list[int] = []


def _interrupted_while_starting() -> Any:
    """The package's start-up Ctrl-C handler (set while the command line imports), if it was installed."""
    return getattr(sys.modules.get("volinfer"), "_interrupted_while_starting", None)


def _raise_interrupt(signum: int, frame: Any) -> None:
    if not _received:
        _received.append(signum)
    raise KeyboardInterrupt


def interrupt_status() -> int:
    """Exit status for an interrupted run: 130 for SIGINT (Ctrl-C), 143 for SIGTERM, as shells report them."""
    return 128 + (_received[0] if _received else int(signal.SIGINT))


def out_of_memory(error: BaseException | None) -> str:
    """The one line for a run that ran out of memory or threads, naming the address-space limit when one is set."""
    cause = f" ({framework_message(error)})" if error is not None else ""
    limit = portable.virtual_memory_limit_mb()
    where = f"; this process may use at most {limit:.0f} MB of virtual memory (ulimit -v)" if limit else ""
    return (f"out of memory{cause}{where}: raise the limit, or lower --max-memory, use --engine tiles, a smaller "
            f"--tile or fewer --requests")


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user errors into one line on stderr and exit code 2; SIGINT/SIGTERM into exit 130/143. No tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if hasattr(signal, "SIGXFSZ"):  # a file-size limit then fails the write (EFBIG) instead of killing us
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _raise_interrupt)  # batch schedulers send SIGTERM before killing
        portable.limit_malloc_arenas()  # under ulimit -v: a few malloc arenas, not 64 MB of address space per thread
        portable.lean_allocator()  # this process is volinfer's: freed planes go back to the system
        if signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _interrupted_while_starting()):
            signal.signal(signal.SIGINT, _raise_interrupt)
        cap = noise.Captured()
        try:
            with noise.captured() as cap:
                return fn(*args, **kwargs)
        except Interrupted as e:
            _fail(f"interrupted: {e}", interrupt_status())
        except VolinferError as e:
            _fail(f"error: {e}", 2)
        except KeyboardInterrupt:
            _fail("interrupted: no output was written", interrupt_status())
        except MemoryError:
            _fail(f"error: {out_of_memory(None)}", 2)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own control flow (usage errors, --help inside a command)
        except Exception as e:  # a bug or an unforeseen library error: still one line, with the way to see more
            if noise.debugging():
                raise
            if portable.exhausted_memory(e):
                _fail(f"error: {out_of_memory(e)}", 2)
            logged = cap.reason()
            _fail(f"error: internal error ({type(e).__name__}: {framework_message(e)}"
                  f"{f'; logged: {logged}' if logged else ''}); rerun with VOLINFER_DEBUG=1 for the traceback", 1)

    return wrapper


def _fail(line: str, status: int) -> None:
    """End the command with ``line`` as its only stderr output (stage lines of a failed command are dropped); an
    interrupted command-line process ends without the interpreter's teardown (slow, and it aborted an interrupted run
    in ~1 of 3 tries when the signal came as inference started: OpenVINO's threads outlived the interpreter)."""
    discard_finished()
    click.echo(line, err=True)
    _quiet_teardown()
    if status > 128 and watchdog.command_line():  # (not in a caller's process: a test runner, a notebook)
        watchdog.exit_now(status)
    sys.exit(status)


class _UsageLine(click.UsageError):
    """A usage error shown as every volinfer error is: one line on stderr (click's own adds the usage and a hint)."""

    def show(self, file: Any = None) -> None:
        where = self.ctx.command_path if self.ctx is not None else "volinfer"
        click.echo(f"error: {self.format_message()} (see '{where} --help')", err=True)


class OneLineUsage(click.Group):
    """The ``volinfer`` group: an unknown option, a bad value or a missing argument, of the group or of any command,
    is a one-line error with exit status 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None


def _one_line(e: click.UsageError) -> click.UsageError:
    """``e`` as a one-line error; a bare ``volinfer`` (click's "no arguments: show the help") as it is."""
    return e if type(e).__name__ == "NoArgsIsHelpError" else _UsageLine(e.format_message(), e.ctx)


def _quiet_teardown() -> None:
    """Nothing more on stderr once the one line is out: a failed read leaves a library's asyncio tasks pending (a
    Zarr chunk that does not decode), and the interpreter's teardown would print their tracebacks."""
    import logging
    import warnings

    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    warnings.simplefilter("ignore")  # ("coroutine ... was never awaited")
    sys.unraisablehook = lambda *_: None


# ---- one convention for every command: shared options, output streams, progress ----

#: Choices, default and help of the options that say how the model is compiled; every command that runs a model
#: declares them through :func:`runtime_options`, so they read the same everywhere.
PRECISIONS = ["auto", "f32", "bf16", "f16"]
DEVICE_HELP = "OpenVINO device (CPU, GPU, NPU, AUTO, ...)."
PRECISION_HELP = ("Inference precision. auto: bf16/f16 where the device runs it natively AND `volinfer convert` "
                  "verified on a calibration tile that this model's outputs stay faithful in it (labels >= 99.9% "
                  "equal, probabilities within 0.05), else f32. f32 computes in float32 with the weights as "
                  "`volinfer convert` stored them (FP16 by default where they pass its parity check against the "
                  "source; `convert --no-fp16` keeps FP32).")
THREADS_HELP = "Inference threads, >= 1 (default: all cores)."
QUIET_HELP = "No progress bar, no summary (errors still go to stderr)."


def runtime_options(precision_default: str = "auto", precision_note: str = "") -> Callable[[Any], Any]:
    """``--device``, ``--precision`` and ``--threads`` exactly as ``volinfer run`` declares them."""

    def apply(fn: Any) -> Any:
        for opt in reversed([
            click.option("--device", default="CPU", show_default=True, help=DEVICE_HELP),
            click.option("--precision", type=click.Choice(PRECISIONS), default=precision_default, show_default=True,
                         help=PRECISION_HELP + precision_note),
            click.option("--threads", type=V.COUNT, help=THREADS_HELP),
        ]):
            fn = opt(fn)
        return fn

    return apply


def output_options(what: str) -> Callable[[Any], Any]:
    """``-q/--quiet`` and ``--json``: human text on stderr, ``what`` as JSON on stdout, nothing else there."""

    def apply(fn: Any) -> Any:
        fn = click.option("--json", "as_json", is_flag=True,
                          help=f"Print {what} as JSON on stdout (nothing else goes there; no progress bar).")(fn)
        return click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)(fn)

    return apply


def emit(data: Any, summary: str | Callable[[], str], *, as_json: bool, quiet: bool) -> None:
    """The one way a command reports: ``data`` as JSON on stdout with ``--json``; otherwise the human ``summary``
    on stderr (unless ``--quiet``), so that stdout stays clean for pipes."""
    import json

    if as_json:
        discard_finished()
        click.echo(json.dumps(data, indent=2, default=str))
    elif quiet:
        discard_finished()
    else:
        flush_finished(lambda line: click.echo(line, err=True))
        click.echo(summary() if callable(summary) else summary, err=True)


def note(text: str, *, quiet: bool) -> None:
    """A one-line remark on stderr (suppressed by ``--quiet``; ``--json`` keeps stderr for humans)."""
    if not quiet:
        click.echo(f"note: {text}", err=True)


def _size(name: str, value: Any) -> list[int]:
    """A volume size: ``N`` (a cube) or ``XxYxZ`` (``X,Y,Z`` also accepted), whole numbers >= 1."""
    try:
        sizes = V.tile(value)
    except VolinferError:
        sizes = None
    if not sizes:
        raise VolinferError(f"{name} must be N or XxYxZ, whole numbers >= 1 (e.g. 96 or 160x144x112); got {value!r}")
    return sizes * 3 if len(sizes) == 1 else sizes


#: click type of ``--size``-like options (three whole numbers, parsed by :func:`validate.tile`).
SIZE = V.Checked("size", _size)


def _sizes(name: str, value: Any) -> list[list[int]]:
    """Several sizes, comma-separated, each ``N`` or ``XxYxZ`` (``64,96,128x128x64``)."""
    items = [v.strip() for v in str(value).split(",")]
    if not all(items):
        raise VolinferError(f"{name} expects sizes separated by commas, each N or XxYxZ (64,96,128x128x64); got "
                            f"{value!r}")
    return [_size(name, v) for v in items]


#: click type of ``--tiles``-like options (a list of sizes).
TILES = V.Checked("sizes", _sizes)
