"""A gzip file written while its source is still being written: :class:`GzipStreamer` compresses a growing file
range by range, as ranges become final, on background threads, in independently compressed parts joined into one
gzip member (the ``.nii.gz`` output of :class:`volinfer.io.writer.NiftiWriter`). The compressed bytes depend only
on the source's bytes, never on when rows became final: a resumed run writes the same file."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path
from typing import BinaryIO

from volinfer import portable
from volinfer.io import gzipio


#: Bytes read back and compressed per step: bounds the compressor's memory, and fixes the grid on which each part is
#: cut (the compressed bytes must not depend on when rows became final, so that a resumed run writes the same bytes).
SLAB_BYTES = 2 << 20

#: Most threads compressing at once (one per part at most, and no more than the cores): parts of a multi-channel
#: output (one per channel) compress side by side, above all the tail that is left when the last row is final.
MAX_GZIP_THREADS = 8


def gzip_threads(parts: int) -> int:
    """Threads for ``parts`` parts: one per part, at most one per usable core and :data:`MAX_GZIP_THREADS`. The
    compressed bytes do not depend on it (each part is compressed on its own, on the same slab grid)."""
    affinity = getattr(os, "sched_getaffinity", None)
    cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, min(parts, cores, MAX_GZIP_THREADS))


class _Part:
    """One independently compressed byte range ``[start, end)`` of the source file, compressed into ``out``."""

    def __init__(self, index: int, start: int, end: int, out: BinaryIO, path: Path, level: int) -> None:
        self.index = index
        self.start, self.end, self.pos = start, end, start
        self.out, self.path = out, path
        self.crc = 0
        self.comp = gzipio.compressor(level)

    def slab_end(self) -> int:
        return min(self.pos + SLAB_BYTES, self.end)


class GzipStreamer:
    """Gzips a file while it is being written, range by range as the ranges become final, on background threads.

    The source is cut into parts whose prefixes grow final together (for NIfTI: the header with channel 0's planes,
    then each further channel's planes). Each part is raw deflate of its own, compressed in slabs on a fixed grid and
    ended by a sync flush (the last part by the final block); the parts are joined behind one reproducible gzip header
    (no name, mtime 0) with their CRCs combined: one ordinary gzip member, as pigz writes it. Part 0 streams into
    ``out`` directly, later parts into files of their own that :meth:`finish` appends. Parts are shared among
    :func:`gzip_threads` threads (part i on thread i mod n); each reads slabs back into a buffer of its own, reused
    (no allocation per slab), and ISA-L / zlib release the GIL while they deflate.
    """

    def __init__(self, src: Path, out: Path, ranges: list[tuple[int, int]], part_paths: list[Path],
                 level: int = 1, threads: int | None = None) -> None:
        self.out, self._level = out, level
        self._limits = [start for start, _ in ranges]
        self._cond = threading.Condition()
        self._stop = False
        self.error: BaseException | None = None
        self._parts: list[_Part] = []
        self._threads: list[threading.Thread] = []
        self._local = threading.local()
        self._src = -1
        try:
            self._src = portable.open_fd(src, os.O_RDONLY)
            for i, (start, end) in enumerate(ranges):
                path = out if i == 0 else part_paths[i - 1]
                f = open(path, "wb")
                self._parts.append(_Part(i, start, end, f, path, level))
            self._parts[0].out.write(gzipio.gzip_header(level))
        except BaseException:
            self.discard()
            raise
        n = threads or gzip_threads(len(self._parts))
        for w in range(n):
            t = threading.Thread(target=self._run, args=(self._parts[w::n],), name=f"volinfer-gzip-{w}", daemon=True)
            self._threads.append(t)
            t.start()

    def advance(self, limits: list[int]) -> None:
        """Bytes below ``limits[i]`` of part i are final: compress them (in the background). Raises a background
        thread's error, if one had one."""
        self.check()
        with self._cond:
            self._limits = [max(a, b) for a, b in zip(self._limits, limits)]
            self._cond.notify_all()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def _part_ready(self, part: _Part) -> bool:
        return part.pos < part.end and part.slab_end() <= self._limits[part.index]

    def _ready(self, parts: list[_Part] | None = None) -> bool:
        return any(self._part_ready(p) for p in (self._parts if parts is None else parts))

    def _run(self, parts: list[_Part]) -> None:
        """One compressing thread: compresses the final slabs of its ``parts`` until they are done or it is stopped."""
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._ready(parts):
                        if all(p.pos == p.end for p in parts):
                            return
                        self._cond.wait()
                    if self._stop:
                        return
                    limits = [self._limits[p.index] for p in parts]
                for part, lim in zip(parts, limits):
                    while part.pos < part.end and part.slab_end() <= lim and not self._stop:
                        self._compress_slab(part)
        except BaseException as e:  # reported to the writing thread by advance()/finish()
            if self.error is None:
                self.error = e

    def _slab_buffer(self) -> memoryview:
        """This thread's read-back buffer (one slab), made once: a fresh ``bytes`` per slab costs page faults."""
        buf = getattr(self._local, "buf", None)
        if buf is None or len(buf) < SLAB_BYTES:
            buf = self._local.buf = memoryview(bytearray(SLAB_BYTES))
        return buf

    def _compress_slab(self, part: _Part) -> None:
        n = part.slab_end() - part.pos
        data = self._slab_buffer()[:n]
        got = portable.pread_into(self._src, data, part.pos)
        if got != n:
            raise OSError(f"temporary file ends early at byte {part.pos + got}")
        part.crc = gzipio.crc32(data, part.crc)
        part.out.write(part.comp.compress(data))
        part.pos += n

    def finish(self) -> None:
        """Everything is final: compress the tail, join the parts, write the trailer and make the file durable."""
        self.advance([p.end for p in self._parts])
        for t in self._threads:
            t.join()
        self.check()
        first = self._parts[0]
        crc, size = 0, 0
        for i, part in enumerate(self._parts):
            last = i == len(self._parts) - 1
            part.out.write(part.comp.flush(gzipio.FINISH if last else gzipio.SYNC_FLUSH))
            crc = gzipio.crc32_combine(crc, part.crc, part.end - part.start) if i else part.crc
            size += part.end - part.start
            if i:
                part.out.close()
                with open(part.path, "rb") as f:
                    shutil.copyfileobj(f, first.out, 1 << 22)
                part.path.unlink()
        first.out.write(gzipio.gzip_trailer(crc, size))
        first.out.flush()
        portable.fsync(first.out.fileno())
        self._close()

    def _close(self, quiet: bool = False) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in getattr(self, "_threads", ()):
            t.join()
        for part in self._parts:
            try:
                part.out.close()
            except OSError:
                if not quiet:
                    raise
        if self._src >= 0:
            os.close(self._src)
            self._src = -1

    def discard(self) -> None:
        """Stop the background threads and remove every compressed file (the source is untouched)."""
        self._close(quiet=True)
        for part in self._parts:
            part.path.unlink(missing_ok=True)
        self.out.unlink(missing_ok=True)
