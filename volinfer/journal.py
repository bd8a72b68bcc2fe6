"""Progress journal for resumable runs.

Beside the temporary output (``.seg.nii.gz.partial.nii``) lies ``.seg.nii.gz.partial.json``: what run this is (a
fingerprint of model, inputs and every option that changes the output) and how many z-rows of tiles are final on
disk. The engine rewrites it atomically after each z-row, once that row's output has been written and synced, so
after a kill at any instant the journal never claims more than the file holds. ``--resume`` continues from there and
refuses, with the reason, when the fingerprint differs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .errors import VolinferError


def file_identity(path: Path) -> dict[str, Any]:
    """Cheap identity of a file: resolved path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def model_identity(path: Path) -> dict[str, Any]:
    """The model's graph by content hash, its weights by identity (hashing GBs of weights would cost minutes)."""
    ident = {"xml_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "file": str(path.resolve())}
    if path.suffix.lower() == ".xml" and path.with_suffix(".bin").exists():
        ident["bin"] = file_identity(path.with_suffix(".bin"))
    return ident


class Journal:
    """Reads, checks and updates the journal of one output target."""

    def __init__(self, target: Path, fingerprint: dict[str, Any]) -> None:
        self.path = target.with_name(f".{target.name}.partial.json")
        self.fingerprint = json.loads(json.dumps(fingerprint, default=str))

    def exists(self) -> bool:
        return self.path.exists()

    def resume_row(self) -> int:
        """Rows already complete, after checking that the interrupted run is this run."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            raise VolinferError(f"{self.path}: no readable progress journal; nothing to resume (run without --resume)"
                                ) from None
        old = data.get("fingerprint", {})
        diffs = _differences(old, self.fingerprint)
        if diffs:
            raise VolinferError(f"cannot resume: {', '.join(diffs[:3])} differ(s) from the interrupted run "
                                f"(run without --resume to start over)")
        return int(data.get("rows_done", 0))

    def update(self, rows_done: int, rows_total: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "rows_done": rows_done,
                                   "rows_total": rows_total}))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        for p in (self.path, self.path.with_name(self.path.name + ".tmp")):
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
