"""The disk-backed plane store of the layer-streaming engine: planes that must wait long (a U-Net's skip connections,
held until the decoder reaches them) are written once to a temporary file and read back sequentially, a small
window at a time, instead of being held in RAM.

* :class:`PlaneFile` — one tensor's planes on disk: positioned writes and reads in bounded chunks
  (:mod:`volinfer.portable`), never ``mmap`` (mapped pages would count as the process's resident memory);
* :class:`PlaneWindow` — a consumer's planes read back into one reused array, refilled as far as it holds (read-ahead),
  the OS asked to fetch the next ones (``POSIX_FADV_WILLNEED``);
* :class:`JoinedPlanes` — planes read back from two files side by side (a strip's rows, then a spill's);
* :class:`PlaneStore` — a run's spill files (and, tagged, the statistics passes' checkpoints): in a directory beside the output, named after it and the owning process
  (``.<output>.volinfer-spill-<pid>-<n>``), deleted on close; on POSIX a file is unlinked as soon as it is open, so
  not even a SIGKILL leaves it behind, and :func:`remove_stale` deletes what a killed run left where that is not
  possible.

I/O only: numpy, :mod:`volinfer.portable` and :mod:`volinfer.errors`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from volinfer import portable
from volinfer.errors import VolinferError

#: What every spill file's name contains (after the output's name, before the owner's pid).
SPILL_MARK = ".volinfer-spill-"
#: Unlink each spill file as soon as it is open (POSIX: the open descriptor keeps its blocks until it is closed, by
#: the process's end at the latest, SIGKILL included). Where the OS refuses (Windows), the file is deleted on close.
UNLINK_OPEN = os.name != "nt"
#: Room kept free beyond a spill's own bytes (MB): a spill must not fill the disk the output is written to.
SPACE_MARGIN_MB = 256.0
_NAME_MAX = 200  # a spill file's name stays under the 255-byte limit of file names with its suffix


def spill_location(output: str | os.PathLike | None) -> tuple[Path, str]:
    """(directory, name prefix) of a run's spill files: beside ``output``, named after it (a later run on the same
    output finds a killed run's leftovers); the temporary directory for in-memory outputs."""
    if output is None:
        return Path(tempfile.gettempdir()), ".volinfer"
    out = Path(output).absolute()
    name = "." + out.name
    if len(name.encode()) > _NAME_MAX:
        name = "." + hashlib.sha1(out.name.encode()).hexdigest()
    return out.parent, name


def remove_stale(directory: str | os.PathLike, prefix: str) -> list[Path]:
    """Delete the spill files named ``prefix``... in ``directory`` whose owning process is gone (a run that was
    killed); returns the paths deleted."""
    gone = []
    try:
        entries = list(Path(directory).glob(glob_escape(prefix) + SPILL_MARK + "*"))
    except OSError:
        return gone
    for path in entries:
        pid = path.name[len(prefix) + len(SPILL_MARK):].split("-", 1)[0]
        if not pid.isdigit() or portable.pid_alive(int(pid)):
            continue
        try:
            path.unlink()
            gone.append(path)
        except OSError:
            pass
    return gone


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def check_space(directory: str | os.PathLike, need_bytes: int, what: str = "spilling planes to disk") -> None:
    """Refuse, before any work, a spill the disk holding ``directory`` has no room for (with a margin)."""
    free = portable.disk_free(directory)
    need_mb = need_bytes / 2**20
    if free is not None and free / 2**20 < need_mb + SPACE_MARGIN_MB:
        raise VolinferError(f"{what} needs {need_mb:.0f} MB of disk (+{SPACE_MARGIN_MB:.0f} MB kept free) in "
                            f"{directory}, which has {free / 2**20:.0f} MB free: free some space, or give "
                            f"--max-memory more so that fewer planes spill")


class PlaneFile:
    """Planes of ``plane_bytes`` each, written once and read back. With ``ring`` planes the file is a ring (plane
    ``i`` at slot ``i % ring``): a reader that never lags the writer by more than ``ring`` planes needs no more
    disk, and the OS rewrites the same cached pages instead of caching (and writing back) the whole tensor."""

    def __init__(self, path: Path, plane_bytes: int, ring: int = 0, unlink: bool | None = None,
                 writer: Any = None) -> None:
        self.path, self.plane_bytes, self.ring, self.writer = path, plane_bytes, ring, writer
        self._pending: Any = None  # the write in flight (write_behind)
        self.waited = 0.0  # seconds the caller waited for writes in flight
        self.fd = portable.open_fd(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.linked = True
        if UNLINK_OPEN if unlink is None else unlink:
            try:
                os.unlink(path)
                self.linked = False
            except OSError:
                pass
        self.written = 0  # bytes written
        self.read_bytes = 0
        self.seconds = 0.0  # spent writing and reading
        self.read_s = 0.0  # of which reading (in the caller's thread)

    def _pieces(self, first: int, count: int) -> list[tuple[int, int, int]]:
        """(byte offset, first plane within the call, planes) of planes [first, first + count): one piece, or two
        where the ring wraps."""
        if not self.ring:
            return [(first * self.plane_bytes, 0, count)]
        out, done = [], 0
        while done < count:
            slot = (first + done) % self.ring
            n = min(count - done, self.ring - slot)
            out.append((slot * self.plane_bytes, done, n))
            done += n
        return out

    def write(self, first: int, planes: np.ndarray) -> None:
        """Planes ``first...`` from ``planes`` (z-first; a plane's bytes are best contiguous: one is copied
        where they are not)."""
        t0 = time.perf_counter()
        for offset, i, n in self._pieces(first, len(planes)):
            block = planes[i: i + n]
            if block.flags.c_contiguous:
                portable.pwrite_all(self.fd, block, offset)
                continue
            for k in range(n):  # a region of each plane (e.g. a few rows of rows-first planes): plane by plane
                portable.pwrite_all(self.fd, np.ascontiguousarray(block[k]), offset + k * self.plane_bytes)
        self.written += planes.nbytes
        self.seconds += time.perf_counter() - t0

    def write_behind(self, first: int, planes: np.ndarray) -> None:
        """:meth:`write`, in the background where the file has a ``writer`` (an executor): ``planes`` must stay
        unchanged until :meth:`settle` (called by the next write, read or close)."""
        self.settle()
        if self.writer is None:
            self.write(first, planes)
        else:
            self._pending = self.writer.submit(self.write, first, planes)

    def settle(self) -> None:
        """Wait for the write in flight, if any (its error raised here)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            t0 = time.perf_counter()
            pending.result()
            self.waited += time.perf_counter() - t0

    def read(self, first: int, out: np.ndarray) -> None:
        """Planes ``first...`` into the contiguous array ``out`` (all of them: a short read is an error)."""
        self._read([(offset, out[i: i + n], first) for offset, i, n in self._pieces(first, len(out))], out.nbytes)

    def read_part(self, first: int, out: np.ndarray, skip: int) -> None:
        """Of planes ``first...``, the bytes from ``skip`` on into each plane of ``out`` (each plane contiguous,
        e.g. the first rows of rows-first planes): a short read is an error."""
        self._read([(self._pieces(first + k, 1)[0][0] + skip, out[k], first + k) for k in range(len(out))],
                   out.nbytes)

    def _read(self, pieces: list[tuple[int, np.ndarray, int]], nbytes: int) -> None:
        """Each (byte offset, contiguous destination, plane it starts at) read whole, after the write in flight."""
        self.settle()
        t0 = time.perf_counter()
        for offset, buf, plane in pieces:
            got = portable.pread_into(self.fd, buf, offset)
            if got != buf.nbytes:
                raise OSError(f"spill file {self.path}: {got} of {buf.nbytes} bytes read at plane {plane}")
        self.read_bytes += nbytes
        self.seconds += time.perf_counter() - t0
        self.read_s += time.perf_counter() - t0

    def will_need(self, first: int, count: int) -> None:
        """Ask the OS to start reading planes [first, first + count) (no-op where it cannot be asked)."""
        if count <= 0 or not hasattr(os, "posix_fadvise"):
            return
        for offset, _, n in self._pieces(first, count if not self.ring else min(count, self.ring)):
            try:
                os.posix_fadvise(self.fd, offset, n * self.plane_bytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    def close(self) -> None:
        """Close and delete (idempotent)."""
        try:
            self.settle()
        except OSError:
            pass  # closing after a failed write: the file goes anyway
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.linked:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.linked = False


class PlaneWindow:
    """One consumer's view of a :class:`PlaneFile`: planes [lo, hi) held contiguously in one array of ``capacity``
    planes, reused. A window that moves forward keeps the planes it still covers (moved to the front) and reads the
    rest, as many as the array holds and have been written (read-ahead: few, large reads), asking the OS for the
    ones after."""

    def __init__(self, file: PlaneFile, plane_shape: tuple[int, ...], dtype: Any, capacity: int) -> None:
        self.file, self.capacity = file, capacity
        self.arr = np.empty((capacity, *plane_shape), dtype)
        self.lo = self.hi = 0  # planes held: [lo, hi)

    def get(self, lo: int, hi: int, written: int) -> np.ndarray:
        """Planes [lo, hi) (all written: ``hi <= written``), a view valid until the next call."""
        if hi - lo > self.capacity:
            raise RuntimeError(f"spill window of {self.capacity} planes asked for {hi - lo}")
        if lo < self.lo or hi > self.hi:
            keep = max(0, self.hi - lo) if self.lo <= lo < self.hi else 0
            if keep:
                self.arr[:keep] = self.arr[lo - self.lo: self.hi - self.lo]
            end = min(lo + self.capacity, written)
            self.file.read(lo + keep, self.arr[keep: end - lo])
            self.lo, self.hi = lo, end
            self.file.will_need(end, self.capacity)
        return self.arr[lo - self.lo: hi - self.lo]


class JoinedPlanes:
    """Planes read back from two files side by side (what a :class:`PlaneWindow` reads from in place of one
    file): each plane's first ``head_rows`` rows from ``head`` (rows ``[skip, skip + head_rows)`` of its planes,
    which it holds for planes below ``head_planes``; later ones read as zeros), the rest from ``tail``
    (None: no rows). Skewed bands: a spilled skip connection's decoder end reads the rows of the previous band's
    strip from the strip file, which holds them already, and only its own rows from the spill file."""

    def __init__(self, head: PlaneFile, skip: int, head_rows: int, head_planes: int, tail: PlaneFile | None) -> None:
        self.head, self.skip, self.head_rows, self.head_planes, self.tail = head, skip, head_rows, head_planes, tail

    def read(self, first: int, out: np.ndarray) -> None:
        """Planes ``first...`` into the contiguous array ``out`` (rows-first planes)."""
        if not len(out):
            return
        n = max(0, min(len(out), self.head_planes - first))
        row_bytes = out[0, 0].nbytes
        if n:
            self.head.read_part(first, out[:n, : self.head_rows], self.skip * row_bytes)
        out[n:, : self.head_rows] = 0
        if self.tail is not None:
            for k in range(len(out)):  # (one plane at a time: each plane's own rows are one piece of memory)
                self.tail.read(first + k, out[k: k + 1, self.head_rows:])

    def will_need(self, first: int, count: int) -> None:
        self.head.will_need(first, min(count, self.head_planes - first))
        if self.tail is not None:
            self.tail.will_need(first, count)


class PlaneStore:
    """The spill files of one run, in ``directory``, named after ``prefix`` and this process; :meth:`close` (or
    leaving the ``with`` block, however it is left) deletes them all. ``background``: one thread writes behind
    the caller (:meth:`PlaneFile.write_behind`), overlapping the writes with the caller's own work."""

    def __init__(self, directory: str | os.PathLike, prefix: str, background: bool = True, tag: str = "") -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.directory, self.prefix, self.tag = Path(directory), prefix, tag  # tag: a store of its own kind
        self.files: list[PlaneFile] = []
        self._count = 0
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="volinfer-spill") if background else None

    def open(self, plane_bytes: int, ring: int = 0) -> PlaneFile:
        """A new spill file of planes of ``plane_bytes`` (a ring of ``ring`` planes; 0: every plane its own place)."""
        self._count += 1
        path = self.directory / f"{self.prefix}{SPILL_MARK}{os.getpid()}-{self.tag}{self._count}"
        f = PlaneFile(path, plane_bytes, ring, writer=self.writer)
        self.files.append(f)
        return f

    @property
    def written(self) -> int:
        return sum(f.written for f in self.files)

    @property
    def read_bytes(self) -> int:
        return sum(f.read_bytes for f in self.files)

    @property
    def seconds(self) -> float:
        """Seconds spent writing (in the background, when it writes behind) and reading."""
        return sum(f.seconds for f in self.files)

    @property
    def read_s(self) -> float:
        """Seconds spent reading (in the caller's thread)."""
        return sum(f.read_s for f in self.files)

    @property
    def waited(self) -> float:
        """Seconds the caller waited for writes in flight."""
        return sum(f.waited for f in self.files)

    def close(self) -> None:
        errors = []
        for f in self.files:
            try:
                f.close()
            except OSError as e:  # close every file before saying so
                errors.append(e)
        if self.writer is not None:
            self.writer.shutdown(wait=True)
        if errors:
            raise errors[0]

    def __enter__(self) -> "PlaneStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
