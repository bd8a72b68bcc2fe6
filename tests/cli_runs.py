"""What the CLI tests of Zarr outputs share (tests/test_zarr_partial.py, tests/test_ome_zarr.py): run volinfer's
command line, read a level of a store, stop a call part-way."""

from typing import Any

from click.testing import CliRunner

from volinfer.cli import main


def invoke(*args: Any) -> Any:
    """``volinfer ARGS`` in this process (arguments as strings); the click result."""
    return CliRunner().invoke(main, [str(a) for a in args])


def ok(*args: Any) -> Any:
    """:func:`invoke`, which must exit 0."""
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    return r


def level(path: Any, n: int = 0) -> Any:
    """Level ``n`` of the OME-Zarr store at ``path``, read whole."""
    import zarr

    return zarr.open_group(str(path), mode="r")[str(n)][:]


def stop_nth(monkeypatch: Any, target: tuple[Any, str], n: int, error: Any = KeyboardInterrupt) -> None:
    """Make ``target`` (module or class, name) raise ``error`` (a class or an instance) on its ``n``-th call."""
    owner, name = target
    real, calls = getattr(owner, name), [0]

    def wrapped(*a: Any, **k: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise error() if isinstance(error, type) else error
        return real(*a, **k)

    monkeypatch.setattr(owner, name, wrapped)
