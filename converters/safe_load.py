"""The one place where ``volinfer convert`` reads model files that could carry code.

What is data and what is code (see SECURITY.md):

* ONNX files and OpenVINO IR are data: protobuf / XML plus raw weights, read by parsers that run no user code.
* Python pickles are code: unpickling can import and call any Python function. Every pickle a model file holds
  (``torch.save`` files, the weights, constants and sample inputs inside a ``torch.export`` ``.pt2`` archive, the
  pickles inside a TorchScript archive) is read here, and only with ``--trust-pickle`` may it import anything
  beyond tensors and the plain containers torch's own ``weights_only`` loader accepts.
* TorchScript archives (``torch.jit.load``): their pickles are read by TorchScript's own C++ unpickler, which only
  rebuilds tensors and TorchScript types and cannot import Python; their ``code/`` is TorchScript, run by the
  TorchScript interpreter (no Python imports). volinfer still scans their pickles before loading and refuses one
  that names a Python callable outside that set.
* Keras Lambda layers hold Python bytecode: refused without ``--trust-pickle`` (Keras ``safe_mode``).
* ``file.py:factory`` imports the user's own Python file: that runs code the user named explicitly on the command
  line, like ``python file.py`` would; ``--weights`` for it are always loaded ``weights_only``.
* NumPy files are loaded with ``allow_pickle=False``.

Every check raises :class:`VolinferError` with one line saying what was found and that ``--trust-pickle`` would
allow it.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from volinfer.errors import VolinferError

#: Imports a TorchScript archive's own pickles use (resolved by TorchScript's C++ unpickler, never by Python).
_TORCHSCRIPT_GLOBALS = re.compile(r"^(__torch__\.[\w.]+|torch\.jit\._pickle\.\w+|torch\.\w+Storage|"
                                  r"torch\._utils\._rebuild_\w+|collections\.OrderedDict|builtins\.(set|list|dict))$")
_IDENT = re.compile(r"^[A-Za-z_][\w.]*$")
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_PICKLE_NAMES = (".pkl", ".pickle")
TRUST_HINT = "pass --trust-pickle only if you trust whoever made the file"


def torch_allowed_globals() -> set[str]:
    """Import names torch's own ``weights_only`` unpickler accepts (tensors, storages, dtypes, plain containers),
    minus the one that calls a function it is handed (``_rebuild_from_type_v2``)."""
    try:
        from torch import _weights_only_unpickler as wou

        names = set(wou._get_allowed_globals().keys())
    except Exception:  # torch missing or its private module moved: fall back to the core set
        names = {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                 "torch.FloatStorage", "torch.Size", "torch.device"}
    return names - {"torch._tensor._rebuild_from_type_v2"}


def pickle_imports(data: bytes) -> list[str]:
    """Every ``module.name`` a pickle imports (GLOBAL, STACK_GLOBAL, INST; STACK_GLOBAL arguments resolved through
    the memo), read with :mod:`pickletools` without executing anything. Imports it cannot resolve (extension
    registry codes, computed names) are reported as ``<unresolved ...>`` so that they are refused too. A stream that
    stops parsing returns what was found before the error (pickle would have run those ops too)."""
    found: list[str] = []
    strings: list[str | None] = []  # recent pushes, strings or None for anything else
    memo: dict[int, str | None] = {}
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL":
                mod, attr = (strings[-2:] + [None, None])[:2] if len(strings) >= 2 else (None, None)
                found.append(f"{mod}.{attr}" if mod and attr else "<unresolved STACK_GLOBAL>")
            elif name in ("EXT1", "EXT2", "EXT4"):
                found.append(f"<unresolved {name} {arg}>")
            if name in _STRING_OPS:
                strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            elif name in ("MEMOIZE",):
                memo[len(memo)] = strings[-1] if strings else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = strings[-1] if strings else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                strings.append(memo.get(int(arg)))
            elif name not in ("PROTO", "FRAME"):
                strings.append(None)
            strings = strings[-4:]
            if name == "STOP":
                break
    except Exception:
        pass
    return found


def _looks_like_pickle(name: str, data: bytes) -> bool:
    """Entries torch may unpickle: named ``.pkl``, or starting with a pickle PROTO header (protocol 2-5)."""
    return name.endswith(_PICKLE_NAMES) or (len(data) > 2 and data[0] == 0x80 and 2 <= data[1] <= 5)


def scan_zip(data: bytes | Path, allowed: set[str], pattern: re.Pattern[str] | None = None,
             prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """``(entry, import)`` for every import outside ``allowed`` (or ``pattern``) in any pickle of a zip archive,
    nested archives (``torch.save`` files inside a ``.pt2``) included."""
    hits: list[tuple[str, str]] = []
    src = io.BytesIO(data) if isinstance(data, bytes) else data
    with zipfile.ZipFile(src) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            blob = z.read(info)
            entry = f"{prefix}{info.filename}"
            if blob[:4] == b"PK\x03\x04" and depth < 4:
                with contextlib.suppress(zipfile.BadZipFile):
                    hits += scan_zip(blob, allowed, pattern, entry + "!/", depth + 1)
                continue
            if not _looks_like_pickle(info.filename, blob):
                continue
            for g in pickle_imports(blob):
                if g in allowed or (pattern is not None and pattern.match(g)):
                    continue
                if g.startswith("<") or _IDENT.match(g) or info.filename.endswith(_PICKLE_NAMES):
                    hits.append((entry, g))
    return hits


def scan_pickle_file(path: Path, allowed: set[str]) -> list[tuple[str, str]]:
    """Like :func:`scan_zip` for a file that is either a zip archive or a bare (legacy) pickle stream."""
    if zipfile.is_zipfile(path):
        return scan_zip(path, allowed)
    return [(path.name, g) for g in pickle_imports(path.read_bytes()[: 64 << 20]) if g not in allowed]


def refuse(path: Path | str, what: str, hits: list[tuple[str, str]]) -> None:
    """Raise the one-line refusal for a file whose pickles import Python callables."""
    entry, name = hits[0]
    more = f" (and {len(hits) - 1} more)" if len(hits) > 1 else ""
    raise VolinferError(f"{path}: {what} holds a pickle that imports {name} (entry {entry}){more}; unpickling runs "
                        f"code, so it is refused: {TRUST_HINT}")


@contextlib.contextmanager
def torch_unpickling_restricted() -> Iterator[None]:
    """While active, ``torch.load`` always uses torch's ``weights_only`` unpickler and ``pickle.loads`` refuses,
    whatever the caller (e.g. torch.export's loader, which falls back to ``weights_only=False``) asks for. A second
    line of defence behind the scan: it catches payloads the static scan could not parse."""
    import pickle

    import torch

    real_load, real_loads = torch.load, pickle.loads

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    def no_loads(*_: Any, **__: Any) -> Any:
        raise pickle.UnpicklingError("a plain pickle (arbitrary Python objects) inside the archive")

    torch.load, pickle.loads = safe_load, no_loads  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.load, pickle.loads = real_load, real_loads  # type: ignore[assignment]


def load_state_dict(path: Path) -> Any:
    """A ``--weights`` file: always ``torch.load(weights_only=True)`` (tensors and plain containers only), or
    ``.npz`` arrays with ``allow_pickle=False``."""
    import torch

    if not path.exists():
        raise VolinferError(f"{path}: no such weights file")
    if path.suffix.lower() == ".npz":
        return {k: torch.from_numpy(v) for k, v in load_numpy(path).items()}
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        text = " ".join(str(e).split())
        m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if m:
            raise VolinferError(f"{path}: the weights file holds Python objects beyond tensors (it imports "
                                f"{m.group(1)}); --weights are always loaded weights-only: re-save it with "
                                f"torch.save(model.state_dict(), path)") from None
        raise VolinferError(f"{path}: cannot load as a state_dict (torch.load weights_only=True): "
                            f"{text[:250]}") from None


def load_numpy(path: Path) -> dict[str, np.ndarray]:
    """``.npy`` / ``.npz`` without pickles: object arrays are refused with one line."""
    try:
        data = np.load(str(path), allow_pickle=False)
        return dict(data.items()) if hasattr(data, "items") else {"arr_0": np.asarray(data)}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise VolinferError(f"{path}: holds pickled Python objects (object arrays); numpy files are read "
                                f"without pickles: save plain numeric arrays") from None
        raise VolinferError(f"{path}: cannot read as a numpy file: {e}") from None


def keras_lambda_layers(path: Path) -> list[str]:
    """Names of layers in a Keras ``.keras`` / ``.h5`` file whose config carries Python code (Lambda layers),
    read from the stored JSON config without deserialising anything."""
    config: Any = None
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if "config.json" in z.namelist():
                config = json.loads(z.read("config.json"))
    else:
        try:
            import h5py

            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
                if raw is not None:
                    config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        except (ImportError, OSError, ValueError):
            config = None
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                found.append(str((node.get("config") or {}).get("name", "?")))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return found
