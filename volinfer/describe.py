"""What ``volinfer info`` says about a model: its inputs and outputs, layout, stored settings, receptive field,
speed profile and normalisation layers, as a dict (the ``--json`` output) and as text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from volinfer.errors import VolinferError
from volinfer.model import speed_profile as sp
from volinfer.model.activation import graph_activation
from volinfer.model.layout import Layout
from volinfer.model.receptive_field import GRAPH, PROBE, measure_receptive_field
from volinfer.model.tile_model import TileModel, read_model
from volinfer.model.tiling_check import note
from volinfer.options import parse_tile
from volinfer.run.setup import model_norm_layers, stored_receptive_field


def describe_model(model_path: Path, tile: str | None, measure: bool) -> dict[str, Any]:
    """What `volinfer info` reports about a model, as a dict (the ``--json`` output)."""
    raw = read_model(model_path)
    data: dict[str, Any] = {
        "model": str(model_path),
        "inputs": [{"names": sorted(p.get_names()), "shape": str(p.get_partial_shape()),
                    "type": p.get_element_type().get_type_name()} for p in raw.inputs],
        "outputs": [{"names": sorted(p.get_names()), "shape": str(p.get_partial_shape()),
                     "type": p.get_element_type().get_type_name()} for p in raw.outputs],
    }
    try:
        tm = TileModel(model_path, tile=parse_tile(tile))
    except VolinferError as e:
        data["note"] = str(e)
        return data
    data.update(layout=tm.layout, in_channels=tm.in_channels, out_channels=tm.out_channels, tile=list(tm.tile),
                size_multiple=tm.multiple)
    data["settings"] = tm.settings.as_dict()
    check = tm.settings.extra.get("tiling_check")
    if isinstance(check, dict):  # tiled vs whole, measured by `volinfer convert` (volinfer.model.tiling_check)
        data["tiling_check"] = check
    data["speed"] = speed_text(tm)
    data.update(receptive_fields(tm, measure))
    layers, global_ops = model_norm_layers(tm)
    data["normalization_layers"] = [f"{layer.kind} {layer.name}" for layer in layers]
    data["final_activation"] = graph_activation(tm.model, tm.output_index, Layout.of(tm.layout).channel_axis)
    if layers:
        data["note"] = (f"{len(layers)} InstanceNorm/GroupNorm layer(s): `volinfer run` freezes them to "
                        f"whole-volume statistics (streamed passes) unless --norm-stats tile")
    if global_ops:
        data["warning"] = (f"spatial reductions volinfer cannot freeze ({', '.join(global_ops[:3])}): tiled runs "
                           f"are exact only when one tile covers the volume")
    return data


def receptive_fields(tm: TileModel, measure: bool) -> dict[str, Any]:
    """The receptive field `run` and `plan` use, as ``receptive_field`` with its ``source``: the one stored in the
    model (:func:`volinfer.run.setup.stored_receptive_field`), else (``measure``) the one found now as a run finds
    it. With a stored one and ``measure``, the one found now beside it as ``found_receptive_field``: from the graph
    it is an upper bound by kernel arithmetic, which may exceed the stored one (a run uses the stored one)."""
    out: dict[str, Any] = {}
    stored = stored_receptive_field(tm)
    if stored is not None:
        out["receptive_field"] = {**_rf_dict(stored), "source": "stored"}
    if measure:
        rf = measure_receptive_field(tm)
        out["found_receptive_field" if stored is not None else "receptive_field"] = {
            **_rf_dict(rf), "source": rf.method if rf.measured else "unknown"}
    return out


def _rf_dict(rf: Any) -> dict[str, Any]:
    return {"radius": list(rf.radius), "bounded": rf.bounded, "text": str(rf)}


#: How ``volinfer info`` labels a receptive field by where it came from.
RF_SOURCES = {"stored": "stored in the model; what run and plan use",
              GRAPH: "from the graph: an upper bound by kernel arithmetic",
              PROBE: "probed by perturbation, f32", "unknown": "could not be found"}


def speed_text(tm: Any) -> str:
    """The model's stored speed profile in words (``volinfer info``), or why there is none."""
    prof = sp.stored(tm.settings.extra)
    if prof is None:
        return str(tm.settings.extra.get(sp.NOTE_KEY) or "not measured (`volinfer convert` measures it)")
    return prof.summary(here=sp.device_name(tm.core, tm.options.device))


def info_text(data: dict[str, Any]) -> str:
    """The human form of :func:`describe_model`'s dict."""
    lines = [f"model        {data['model']}"]
    for kind in ("inputs", "outputs"):
        for p in data[kind]:
            lines.append(f"{kind[:-1]:<12} {','.join(p['names']) or '-'}  {p['shape']}  {p['type']}")
    for key in ("layout", "in_channels", "out_channels", "tile", "size_multiple"):
        if key in data:
            lines.append(f"{key:<12} {data[key]}")
    for key in ("receptive_field", "found_receptive_field"):
        if key in data:
            rf = data[key]
            used = "" if key == "found_receptive_field" or rf["source"] == "stored" else "; what run and plan use"
            lines.append(f"{'receptive' if key == 'receptive_field' else '':<12} radius {rf['text']} voxels "
                         f"({RF_SOURCES[rf['source']]}{used})")
    if "tiling_check" in data:
        lines.append(f"{'tiling':<12} {note(data['tiling_check'])} (measured at convert)")
    if data.get("speed"):
        lines.append(f"{'speed':<12} {data['speed']}")
    for k, v in (data.get("settings") or {}).items():
        if k == "speed_profile" and data.get("speed"):
            continue  # shown above, in words
        lines.append(f"  stored {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    if "settings" in data and not data["settings"]:
        lines.append("  (no volinfer settings stored; `volinfer convert` adds them)")
    for key in ("warning", "note"):
        if key in data:
            lines.append(f"{key}: {data[key]}")
    return "\n".join(lines)
