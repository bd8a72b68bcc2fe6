"""Output targets: the one place that decides whether volinfer may write (or replace) an output.

Every command that writes (``run`` on NIfTI, batch and Zarr paths, ``to-zarr``, ``to-nifti``) goes through
:func:`check_output` and holds an :class:`OutputLock` while it writes:

* inputs and outputs are compared by *resolved identity*: the file's inode (``st_dev, st_ino``: symlinks, hard links
  and bind mounts all resolve to it), and for directories (Zarr stores) containment either way — the output may not
  be, contain, or lie inside any input's store;
* ``--overwrite`` only replaces what volinfer itself writes: a regular NIfTI file, or a Zarr store carrying
  volinfer's marker file. An arbitrary directory is never deleted;
* whether the replacement can succeed (directory writable, sticky directory owned by someone else) is checked before
  any work starts, not at the final rename hours later;
* a per-output exclusive lock (``flock`` on a lock file beside the output; an ``O_EXCL`` lock file with the
  owner's pid where ``fcntl`` is missing, e.g. Windows: see :mod:`volinfer.portable`) makes a second run on the same
  output fail at once;
* names of the files volinfer keeps beside an output (temporary data, journal, lock) stay under the 255-byte limit
  of file names, by shortening long names with a hash (:func:`aux_path`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Iterable

from volinfer import portable
from volinfer.errors import VolinferError
from volinfer.version import __version__

#: Marker file volinfer writes at the root of every Zarr store it creates; only such stores are replaced.
STORE_MARKER = ".volinfer-store"  # the marker file earlier volinfer versions wrote; still recognised
STORE_ATTR = "volinfer"  # the root group attribute that marks a store volinfer wrote (see store_mark)
_META_MAX = 1 << 24  # a zarr.json larger than this is not one volinfer wrote
_ZARR_META = ("zarr.json", ".zarray", ".zgroup")
_NAME_MAX = 255


def aux_path(target: Path, suffix: str) -> Path:
    """``.<name><suffix>`` beside ``target``, shortened with a hash of the full name when it would pass 255 bytes."""
    name = f".{target.name}{suffix}"
    if len(name.encode()) <= _NAME_MAX:
        return target.with_name(name)
    digest = hashlib.blake2b(target.name.encode(), digest_size=8).hexdigest()
    keep = target.name.encode()[: _NAME_MAX - len(suffix.encode()) - len(digest) - 3].decode(errors="ignore")
    return target.with_name(f".{keep}~{digest}{suffix}")


def resolved(path: Path) -> Path:
    """The absolute path with every symlink resolved, also for a path that does not exist yet."""
    return Path(os.path.realpath(os.path.abspath(path)))


def zarr_store_root(path: Path) -> Path | None:
    """The outermost directory of the Zarr store that ``path`` is (or lies in), or None outside any store."""
    p = resolved(path)
    root = None
    for d in (p, *p.parents):
        if d.is_dir() and (any((d / m).exists() for m in _ZARR_META) or (d / STORE_MARKER).exists()):
            root = d
        elif root is not None:
            break
    return root


def _ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list[tuple[int, int]]:
    """Identities of ``path`` and of every existing ancestor: containment by inode, not by spelling."""
    p = resolved(path)
    out = []
    for d in (p, *p.parents):
        i = _ident(d)
        if i is not None:
            out.append(i)
    return out


def _extent(path: Path) -> Path:
    """What an input occupies: its Zarr store root when inside a store, else the path itself."""
    return zarr_store_root(path) or resolved(path)


def check_disjoint(output: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that is an input, contains one, or lies inside one (by inode, symlinks resolved)."""
    out_chain = _chain(output)
    out_id = _ident(output)
    for inp in inputs:
        ext = _extent(Path(inp))
        ext_id, inp_id = _ident(ext), _ident(Path(inp))
        if out_id is not None and out_id in (ext_id, inp_id):
            raise VolinferError(f"{output}: output path is also an input ({inp}, same file); "
                                f"choose another output name")
        if ext_id is not None and ext_id in out_chain:
            raise VolinferError(f"{output}: output lies inside the input {ext}; choose an output outside it")
        if out_id is not None and any(i == out_id for i in _chain(Path(inp))):
            raise VolinferError(f"{output}: output contains the input {inp}; choose another output")


def _check_replaceable(target: Path) -> None:
    """Refuse, before any work, a replacement the OS would refuse at the end (rename/unlink in ``parent``)."""
    parent = target.parent if str(target.parent) else Path(".")
    st_parent = parent.stat()
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VolinferError(f"{target}: cannot replace it, {parent} is not writable")
    euid = os.geteuid() if hasattr(os, "geteuid") else 0
    if st_parent.st_mode & stat.S_ISVTX and euid != 0:
        owner = target.lstat().st_uid
        if owner != euid and st_parent.st_uid != euid:
            raise VolinferError(f"{target}: cannot replace it, it belongs to another user in the sticky directory "
                                f"{parent}; choose another output name")


def is_volinfer_store(path: Path) -> bool:
    """A store volinfer wrote: its root ``zarr.json`` says so (``attributes.volinfer.written_by``), or it holds the
    marker file earlier versions wrote."""
    if not path.is_dir() or path.is_symlink():
        return False
    if (path / STORE_MARKER).is_file():
        return True
    meta = path / "zarr.json"
    try:
        if meta.is_symlink() or meta.stat().st_size > _META_MAX:
            return False
        mark = (json.loads(meta.read_text()).get("attributes") or {}).get(STORE_ATTR)
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(mark, dict) and mark.get("written_by") == "volinfer"


def check_output(output: Path, inputs: Iterable[Path], overwrite: bool, kind: str) -> None:
    """The one check before writing ``output`` (``kind`` ``"nifti"``, ``"tiff"`` or ``"zarr"``): see module docs."""
    name = output.name.lower()
    if kind == "nifti" and not name.endswith((".nii", ".nii.gz")):
        raise VolinferError(f"{output}: output must end in .nii or .nii.gz (or .tif/.tiff, or .zarr)")
    if kind == "tiff" and not name.endswith((".tif", ".tiff")):
        raise VolinferError(f"{output}: output must end in .tif or .tiff")
    if len(output.name.encode()) > _NAME_MAX:
        raise VolinferError(f"{output}: file name longer than {_NAME_MAX} bytes")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise VolinferError(f"{parent}: output directory does not exist")
    check_disjoint(output, inputs)
    if os.path.lexists(output):
        if not overwrite:
            raise VolinferError(f"{output}: already exists (pass --overwrite to replace it)")
        if kind in ("nifti", "tiff") and (output.is_dir() or not (output.is_file() or output.is_symlink())):
            raise VolinferError(f"{output}: is a directory or special file; --overwrite only replaces files")
        if kind == "zarr" and not is_volinfer_store(output):
            raise VolinferError(f"{output}: --overwrite only replaces Zarr stores that volinfer wrote (its zarr.json "
                                f"does not say so); remove it yourself or choose another output")
        _check_replaceable(output)
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise VolinferError(f"{parent}: output directory is not writable")


def remove_store(path: Path) -> None:
    """Delete a Zarr store volinfer wrote (checked by :func:`check_output` first; never an arbitrary directory)."""
    if not is_volinfer_store(path):
        raise VolinferError(f"{path}: not a store volinfer wrote; refusing to delete it")
    shutil.rmtree(path)


def store_mark() -> dict[str, str]:
    """What marks a Zarr store as written by volinfer (so that a later ``--overwrite`` may replace it): the root
    group's ``volinfer`` attribute, set when the group is created (a marker file would make zarr warn about an
    object it does not recognise)."""
    return {"written_by": "volinfer", "version": __version__}


class OutputLock:
    """Exclusive lock on one output, held for the whole run; a second run on the same output fails at once."""

    def __init__(self, target: Path) -> None:
        self.target = Path(target)
        self.path = aux_path(self.target, ".lock")
        self._fd = -1
        self._flock = False

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _busy(self) -> VolinferError:
        return VolinferError(f"{self.target}: another volinfer run is writing this output (lock {self.path}); "
                             f"wait for it to finish or choose another output")

    def acquire(self) -> "OutputLock":
        try:
            if portable.HAS_FCNTL:
                self._acquire_flock()
            else:
                self._acquire_excl()
        except OSError as e:
            raise VolinferError(f"cannot lock {self.path}: {e.strerror or e}") from None
        return self

    def _acquire_flock(self) -> None:
        while True:
            fd = portable.open_fd(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                portable.lock_exclusive(fd)
            except BlockingIOError:
                os.close(fd)
                raise self._busy() from None
            except BaseException:
                os.close(fd)
                raise
            if _ident(self.path) == (os.fstat(fd).st_dev, os.fstat(fd).st_ino):
                break  # still the file at that name (the previous holder may have unlinked it meanwhile)
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._flock = True

    def _acquire_excl(self) -> None:
        for _ in range(2):
            try:
                fd = portable.open_fd(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if _pid_alive(self.path):
                    raise self._busy() from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            try:
                os.write(fd, str(os.getpid()).encode())
            except BaseException:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise
            self._fd = fd
            self._flock = False
            return
        raise self._busy()

    def release(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        if not self._flock:  # O_EXCL file: close first (Windows cannot delete an open file), then remove
            os.close(fd)
            self.path.unlink(missing_ok=True)
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiting run re-checks the inode
        finally:
            os.close(fd)  # closing drops the flock


def _pid_alive(path: Path) -> bool:
    """Whether the process named in lock file ``path`` still runs (never signals it: see portable.pid_alive)."""
    try:
        text = path.read_text().strip()
        if not text:  # just created, its pid not yet written: stale only once it has stayed empty a while
            return time.time() - path.stat().st_mtime < 10
        pid = int(text)
    except (ValueError, OSError):
        return False
    return portable.pid_alive(pid)
