"""Progress journal for resumable runs.

Beside the temporary output (``.seg.nii.gz.partial.nii``) lies ``.seg.nii.gz.partial.json``: what run this is (a
fingerprint of model, inputs and every option that changes the output) and how many z-rows of tiles are final on
disk. After each z-row the data file is fsync'ed first, then the journal is written to a temporary name, fsync'ed,
renamed over the old one and its directory fsync'ed: after a kill or a power cut at any instant the journal never
claims more than the file holds. ``--resume`` continues from there and refuses, with the reason, when the
fingerprint differs.

The fingerprint identifies inputs and model by *content*: a streaming hash of their bytes (xxh3-128 when the
``xxhash`` package is there, BLAKE2b otherwise), not by path, size and mtime, which a copy or ``touch`` can fake.
A Zarr input is hashed file by file in sorted order (metadata and chunks), so a changed chunk changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from volinfer import portable
from volinfer.errors import VolinferError
from volinfer.io.targets import aux_path

_CHUNK = 1 << 22  # 4 MiB reads: bounded memory, large enough for full disk/cache speed

try:
    import xxhash

    def hasher() -> Any:
        return xxhash.xxh3_128()

    HASH_NAME = "xxh3_128"
except ImportError:  # pragma: no cover - xxhash is an install dependency, this is the fallback

    def hasher() -> Any:
        return hashlib.blake2b(digest_size=16)

    HASH_NAME = "blake2b128"


def content_bytes_hash(data: bytes) -> str:
    """The fingerprint hash of a few bytes (a header)."""
    h = hasher()
    h.update(data)
    return h.hexdigest()


class ResumableError(VolinferError):
    """A failure after which the partial output and its journal are kept, so that ``--resume`` can continue."""


def _feed_file(h: Any, path: Path) -> None:
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])


def content_hash(path: str | os.PathLike, skip: Callable[[str], bool] = lambda rel: False) -> str:
    """Streaming hash of a file's bytes, or of a directory's files (relative name, size, bytes; sorted)."""
    p = Path(path)
    h = hasher()
    if p.is_dir():
        for root, dirs, files in os.walk(p):
            dirs.sort()
            for name in sorted(files):
                full = Path(root) / name
                rel = full.relative_to(p).as_posix()
                if skip(rel):
                    continue
                h.update(f"{rel}\0{full.stat().st_size}\0".encode())
                _feed_file(h, full)
    else:
        _feed_file(h, p)
    return f"{HASH_NAME}:{h.hexdigest()}"


def _skip_volinfer_files(rel: str) -> bool:
    return rel.startswith(".volinfer") or "/.volinfer" in rel or rel.endswith(".lock")


def file_identity(path: Path) -> dict[str, Any]:
    """Identity of an input (file or Zarr store) by content (its name or place do not matter)."""
    return {"content": content_hash(path, _skip_volinfer_files)}


def model_identity(path: Path) -> dict[str, Any]:
    """The model by content: the ``.xml`` graph and its ``.bin`` weights (or the ``.onnx`` file)."""
    path = Path(path)
    ident = {"graph": content_hash(path)}
    if path.suffix.lower() == ".xml" and path.with_suffix(".bin").exists():
        ident["weights"] = content_hash(path.with_suffix(".bin"))
    return ident


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (skipped where directories cannot be flushed, e.g. Windows: see
    :func:`volinfer.portable.fsync_dir`)."""
    portable.fsync_dir(path)


def journal_path(target: Path) -> Path:
    """Where the journal of ``target`` lies (beside it, hidden, shortened for long names)."""
    return aux_path(Path(target), ".partial.json")


class Journal:
    """Reads, checks and updates the journal of one output target (or the explicit ``path``)."""

    def __init__(self, target: Path, fingerprint: dict[str, Any], path: Path | None = None) -> None:
        self.path = path or journal_path(Path(target))
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))

    def exists(self) -> bool:
        return self.path.exists()

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            raise VolinferError(f"{self.path}: no readable progress journal; nothing to resume (run without --resume)"
                                ) from None

    def check(self) -> dict[str, Any]:
        """The journal's contents, after checking that the interrupted run is this run."""
        data = self.read()
        diffs = _differences(data.get("fingerprint", {}), self.fingerprint)
        if diffs:
            raise VolinferError(f"cannot resume: {', '.join(diffs[:3])} differ(s) from the interrupted run "
                                f"(run without --resume to start over)")
        return data

    def resume_row(self) -> int:
        """Rows already complete, after checking that the interrupted run is this run."""
        return int(self.check().get("rows_done", 0))

    def update(self, rows_done: int, rows_total: int, **extra: Any) -> None:
        """Atomically and durably record progress. Call only once the data it describes are fsync'ed."""
        tmp = self.path.with_name(self.path.name[: 255 - 4] + ".tmp")
        body = json.dumps({"fingerprint": self.fingerprint, "rows_done": rows_done, "rows_total": rows_total,
                           **extra}).encode()
        try:
            fd = portable.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(body)
                while view:
                    view = view[os.write(fd, view):]
                portable.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ResumableError(f"cannot write the progress journal {self.path}: {e.strerror or e}; free space and "
                                 f"run the same command with --resume to continue") from None
        fsync_dir(self.path.parent)

    def remove(self) -> None:
        for p in (self.path, self.path.with_name(self.path.name[: 255 - 4] + ".tmp")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys: Sequence[str] = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out
