"""What a batch run finished, and with which settings: ``--resume`` skips a volume only when its output is the one
this batch wrote with the same model, input and settings.

A batch writes each volume to ``OUTPUT/<its file name>``. Two rules keep that safe:

* the outputs are unique: two inputs with one file name (``a/s.nii``, ``b/s.nii``) would write one file, the second
  replacing the first; the batch is refused before any work (names compared case-folded, as a case-insensitive
  file system would);
* a finished volume is recorded in ``OUTPUT/.volinfer-batch.json`` (written atomically after each volume): a key of
  the run's settings, the input's and the model's content hashes, and the output's size and modification time. A
  resumed batch skips a volume only when that record matches; an output finished with other settings (a ``--kind
  labels`` batch resumed with ``--kind probabilities``), by another model or from another input, or replaced since,
  is not skipped but run again, which refuses to replace it without ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from volinfer import portable
from volinfer.errors import VolinferError
from volinfer.io.journal import content_bytes_hash, file_identity, model_identity
from volinfer.io.targets import resolved

#: The record's file name inside the batch's output directory.
RECORD_NAME = ".volinfer-batch.json"
#: A record larger than this is not one volinfer wrote (read as empty: nothing is skipped).
_RECORD_MAX = 1 << 24
#: Settings that do not change what a volume's output holds (top level, and per settings group).
_NOT_OUTPUT = ("resume", "overwrite", "progress")
_NOT_OUTPUT_IN = {"runtime": ("threads", "streams", "cache_dir", "requests")}


def check_unique(batch: Sequence[Path], output: Path) -> None:
    """Refuse a batch in which two inputs would write the same output file, or an input would be its own output (the
    output directory is the input's), in one line before any work."""
    seen: dict[str, Path] = {}
    out_dir = resolved(output)
    for path in batch:
        if resolved(path.parent) == out_dir:  # OUTPUT/<name> is this very directory entry
            raise VolinferError(f"{output}: the batch output directory holds the input {path}, whose output would "
                                f"replace it; choose another output directory")
        key = path.name.casefold()
        if key in seen:
            raise VolinferError(f"{seen[key]} and {path} would both be written to {output / path.name}: batch "
                                f"outputs must be unique (rename one, or run them into separate directories)")
        seen[key] = path


def settings_view(settings: Any) -> dict[str, Any]:
    """The run settings that decide a volume's output, as JSON-ready values."""
    data = asdict(settings)
    # options not given stand for their defaults, as records written before they could be left unset say them
    data["tiling"]["sigma"], data["output"]["threshold"] = \
        settings.tiling.gaussian_sigma, settings.output.labels_threshold
    for key in _NOT_OUTPUT:
        data.pop(key, None)
    for group, keys in _NOT_OUTPUT_IN.items():
        for key in keys:
            (data.get(group) or {}).pop(key, None)
    return json.loads(json.dumps(data, default=str, sort_keys=True))


def _changed(new: dict[str, Any], old: Any, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between ``new`` and ``old`` (``output.kind``)."""
    old = old if isinstance(old, dict) else {}
    out = []
    for key in sorted(set(new) | set(old)):
        a, b = new.get(key), old.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(prefix + key)
    return out


class BatchRecord:
    """The finished volumes of the batch writing into ``output`` (a directory), for a model and run settings."""

    def __init__(self, output: Path, model: Path | None, settings: Any) -> None:
        self.path = Path(output) / RECORD_NAME
        self.settings = settings_view(settings)
        self.model = model_identity(model) if model is not None else None
        self._entries: dict[str, Any] | None = None

    def _read(self) -> dict[str, Any]:
        if self._entries is None:
            try:
                st = os.lstat(self.path)
                if not stat.S_ISREG(st.st_mode) or st.st_size > _RECORD_MAX:  # a link, a device, a huge file
                    raise ValueError(self.path)
                data = json.loads(self.path.read_text())
                self._entries = data["done"] if isinstance(data, dict) and isinstance(data.get("done"), dict) else {}
            except (OSError, ValueError):
                self._entries = {}
        return self._entries

    def _key(self, source: Path) -> str:
        ident = {"settings": self.settings, "model": self.model, "input": file_identity(source)}
        return content_bytes_hash(json.dumps(ident, sort_keys=True).encode())

    def finished(self, source: Path, target: Path) -> str | None:
        """None when ``target`` is the output this batch finished from ``source`` with these settings; else why
        it is not (for the batch's line about the volume)."""
        entry = self._read().get(target.name)
        if not isinstance(entry, dict):
            return "not recorded as finished by a batch into this directory"
        try:
            st = os.stat(target)
        except OSError:
            return "its output is missing"
        if [st.st_size, st.st_mtime_ns] != entry.get("file"):
            return "its output was replaced since the batch finished it"
        if entry.get("key") != self._key(source):
            changed = _changed(self.settings, entry.get("settings"))
            return (f"finished with other settings ({', '.join(changed)} differ)" if changed
                    else "finished from another input or model")
        return None

    def mark(self, source: Path, target: Path) -> None:
        """Record ``target`` as finished from ``source`` (atomic replace of the record file)."""
        st = os.stat(target)
        self._entries = None  # read again: another batch into this directory may have recorded volumes since
        entries = self._read()
        entries[target.name] = {"key": self._key(source), "settings": self.settings,
                                "file": [st.st_size, st.st_mtime_ns]}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.unlink(missing_ok=True)  # a stale one, or a planted link: removed, never written through
        with os.fdopen(portable.open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as f:
            json.dump({"done": entries}, f)
            f.flush()
            portable.fsync(f.fileno())
        os.replace(tmp, self.path)
        portable.fsync_dir(self.path.parent)
