"""Run settings stored inside an OpenVINO IR (``rt_info["volinfer"]``), so a model file says how it wants to be run.

Each setting is one key under ``volinfer`` whose value is JSON text. Keys this version does not know are kept as they
are and written back unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import openvino as ov

RT_KEY = "volinfer"


@dataclass
class ModelSettings:
    """What a model needs to be run correctly. ``None`` means "not stored; use the default or ask the user"."""

    layout: str | None = None  # "NCDHW" or "NDHWC"
    in_channels: int | None = None
    channel_names: list[str] | None = None
    tile: list[int] | None = None
    size_multiple: int | None = None
    overlap: float | int | None = None
    stitch: str | None = None  # "crop", "gaussian", "mean"
    receptive_field: list[int] | None = None  # radius in voxels per axis, measured
    normalization: dict[str, Any] | None = None
    activation: str | None = None  # "softmax", "sigmoid", "none"
    labels: list[str] | None = None
    spacing: list[float] | None = None
    output: str | None = None  # output name to use when the model has several
    instance_norm: bool | None = None  # per-tile statistics: crop stitching is not exact
    source_framework: str | None = None
    source_file: str | None = None
    source_sha256: str | None = None
    volinfer_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_model(cls, model: ov.Model) -> "ModelSettings":
        """Read the settings stored in ``model``; an IR without any gives all-``None`` settings."""
        if not model.has_rt_info([RT_KEY]):
            return cls()
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, raw in model.get_rt_info()[RT_KEY].items():
            text = raw.astype(str)
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = text
            (values if key in known else extra)[key] = value
        return cls(**values, extra=extra)

    def to_model(self, model: ov.Model) -> None:
        """Write every non-``None`` setting (and the unknown keys read earlier) into ``model``'s rt_info."""
        data = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        data.update(self.extra)
        for key, value in data.items():
            model.set_rt_info(json.dumps(value), [RT_KEY, key])

    def as_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        data.update(self.extra)
        return data
