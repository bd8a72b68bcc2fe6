"""What every loader hands on: a loaded model (:class:`Source`), the signal that its own framework cannot run it
here (:class:`ReferenceUnavailable`), and the one-line import of an optional framework (:func:`require`).

Shared by :mod:`converters.sources` (PyTorch, Keras, format detection) and :mod:`converters.frontends` (the formats
OpenVINO reads itself), which both build :class:`Source` objects.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import openvino as ov

from volinfer.errors import VolinferError


class ReferenceUnavailable(Exception):
    """The source framework cannot run the original here: parity is "not checked", never "ok"."""


def require(module: str, extra: str) -> Any:
    """Import an optional framework, or fail with one line naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise VolinferError(
            f"this model needs {module}, which is not installed: pip install 'volinfer[{extra}]' (or pip install {module})"
        ) from None


@dataclass
class Source:
    """A loaded model: ``to_openvino(shape)`` converts it; ``run(x)`` runs the *original* on a numpy input (raises
    :class:`ReferenceUnavailable` when its framework is missing)."""

    framework: str
    path: Path | None
    to_openvino: Callable[..., ov.Model]  # (input shape with -1 for dynamic dims, example shape) -> model
    run: Callable[[np.ndarray], list[np.ndarray]]
    layout: str | None = None  # layout the framework implies (TensorFlow: channels last)
    reference_note: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    #: ``--set`` values still to be frozen in the converted OpenVINO model (frontends); torch modules consume them.
    pending_fixed: dict[str, Any] = field(default_factory=dict)
