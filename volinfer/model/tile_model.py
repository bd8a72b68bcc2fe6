"""The model side: read an IR/ONNX file, fix it to one static tile shape, compile it once.

Everything the engine needs to know about a model is resolved here, in one place, with one clear error each:
input layout (NCDHW or NDHWC), channel counts, tile size (option, then stored settings, then the static input shape),
the size multiple the model requires, and which output to use.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import openvino as ov

from volinfer.errors import VolinferError, framework_message
from volinfer.model.precision import resolve as resolve_precision
from volinfer.model.settings import ModelSettings
from volinfer.model.layout import LAYOUTS, Layout

PRECISIONS = ("auto", "f32", "bf16", "f16")


@dataclass(frozen=True)
class CompileOptions:
    """How to compile: device, precision hint (``auto``: see :mod:`volinfer.model.precision`), threads, streams, cache
    directory."""

    device: str = "CPU"
    precision: str = "auto"
    threads: int | None = None
    streams: int | None = None
    cache_dir: str | None = None

    def config(self, precision: str | None = None) -> dict[str, Any]:
        """OpenVINO compile properties; ``precision`` is the resolved one (``auto`` resolves to f32 here)."""
        if self.precision not in PRECISIONS:
            raise VolinferError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        p = precision or (self.precision if self.precision != "auto" else "f32")
        cfg: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": p}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        if self.streams:
            cfg["NUM_STREAMS"] = int(self.streams)
        return cfg


def read_model(path: str | os.PathLike, core: ov.Core | None = None) -> ov.Model:
    """Read an OpenVINO IR (``.xml`` + ``.bin``) or an ONNX file, with one-line errors for the usual mistakes."""
    p = Path(path)
    if not p.exists():
        raise VolinferError(f"{p}: no such model file")
    if p.is_dir():
        raise VolinferError(f"{p}: is a directory; expected an OpenVINO IR (.xml) or ONNX (.onnx) file")
    suffix = p.suffix.lower()
    if suffix not in (".xml", ".onnx"):
        raise VolinferError(f"{p}: unsupported model type {suffix or '(none)'}; expected .xml (OpenVINO IR) or .onnx")
    if suffix == ".xml":
        _check_weights_file(p)
    try:
        return (core or ov.Core()).read_model(str(p))
    except Exception as e:
        raise VolinferError(f"{p}: cannot read model ({framework_message(e)})") from None


def _check_weights_file(xml: Path) -> None:
    """The .bin must exist and hold every constant the .xml points into (a truncated .bin would otherwise surface as
    garbage output or a crash at inference time)."""
    import re

    binp = xml.with_suffix(".bin")
    if not binp.exists():
        raise VolinferError(f"{xml}: weights file {binp.name} is missing beside it")
    text = xml.read_text(errors="replace")
    ends = [int(o) + int(n) for o, n in re.findall(r'offset="(\d+)"\s+size="(\d+)"', text)]
    need, have = max(ends, default=0), binp.stat().st_size
    if have < need:
        raise VolinferError(f"{binp}: weights file holds {have} bytes but the model needs {need} (truncated?)")


def _layout_of(port: ov.Output, settings: ModelSettings, override: str | None) -> str:
    if override:
        layout = override.upper()
    elif settings.layout:
        layout = settings.layout.upper()
    else:
        declared = ov.layout_helpers.get_layout(port)
        text = declared.to_string().replace(",", "").strip("[]") if not declared.empty else ""
        layout = text if text in LAYOUTS else "NCDHW"
    if layout not in LAYOUTS:
        raise VolinferError(f"layout must be NCDHW or NDHWC; got {layout!r}")
    return layout


class TileModel:
    """A model compiled once at a static tile shape ``(1, C, tx, ty, tz)`` (or channels last).

    ``compile=False`` resolves shapes and settings only (for planning)."""

    def __init__(
        self,
        model: str | os.PathLike | ov.Model,
        *,
        tile: Sequence[int] | int | None = None,
        layout: str | None = None,
        output: str | int | None = None,
        options: CompileOptions = CompileOptions(),
        core: ov.Core | None = None,
        compile: bool = True,
        multiple: int | None = None,
    ) -> None:
        self.core = core or ov.Core()
        if options.cache_dir:
            try:
                self.core.set_property({"CACHE_DIR": str(options.cache_dir)})
            except RuntimeError as e:  # a directory OpenVINO cannot create: a bad option, said in one line
                found = re.search(r"err=([^)\]\n]+)", str(e))
                why = found.group(1).strip() if found else framework_message(e)
                raise VolinferError(f"--cache-dir {options.cache_dir}: cannot use it as OpenVINO's model cache "
                                    f"({why})") from None
        self.path = None if isinstance(model, ov.Model) else Path(model)
        self.tile_given = tile is not None  # the caller fixed the tile: planning must not change it
        self.compiled: ov.CompiledModel | None = None
        self.model = model if isinstance(model, ov.Model) else read_model(model, self.core)
        self.settings = ModelSettings.from_model(self.model)
        self.options = options
        if len(self.model.inputs) != 1:
            raise VolinferError(f"model has {len(self.model.inputs)} inputs; volinfer runs single-input models")
        port = self.model.input(0)
        pshape = port.get_partial_shape()
        self.declared_input = pshape  # the input shape as the file declares it (before the tile reshape)
        if pshape.rank.is_dynamic or pshape.rank.get_length() != 5:
            raise VolinferError(f"model input must be 5-D (N, C, D, H, W or N, D, H, W, C); it is {pshape}")
        self.layout = _layout_of(port, self.settings, layout)
        cdim = pshape[Layout.of(self.layout).channel_axis]
        if cdim.is_dynamic:
            if not self.settings.in_channels:
                raise VolinferError(f"model input {pshape} has a dynamic channel dimension and no stored channel count")
            self.in_channels = int(self.settings.in_channels)
        else:
            self.in_channels = cdim.get_length()
        self.multiple = int(self.settings.size_multiple or 1)
        if multiple is not None:  # the run's own (a model storing none: probed, see volinfer.run.setup.run_multiple;
            self.multiple = int(multiple)  # 1 for one tile at a volume's own size: volinfer.run.own_size)
        self.tile = self._resolve_tile(tile, pshape)
        self.multiple_known = multiple is not None or self.settings.size_multiple is not None or pshape.is_static
        self.output_index = self._resolve_output(output)
        self._reshape()
        self.precision, self.precision_reason = resolve_precision(
            self.options.precision, self.settings.extra.get("precision_check"), self.core, self.options.device)
        self._check_output_shape(self.model.output(self.output_index).get_partial_shape())
        if not compile:  # shapes only (planning, the layer-streaming engine): output shape from shape inference
            self.input_dtype = self.model.input(0).get_element_type().to_dtype()
            self.out_channels = self.model.output(self.output_index).get_partial_shape()[Layout.of(self.layout).channel_axis].get_length()
            return
        self.compiled = self._compile()
        self._check_output_shape(self.compiled.output(self.output_index).get_partial_shape())
        self.out_channels = self.compiled.output(self.output_index).get_shape()[Layout.of(self.layout).channel_axis]
        self.input_dtype = self.compiled.input(0).get_element_type().to_dtype()

    def _check_output_shape(self, shape: ov.PartialShape) -> None:
        """Every engine (tiles, and the layer-streaming engine planning without compiling) runs only models whose
        output keeps the input's spatial size: the output geometry is checked here, where every path builds its
        model, at the tile shape (a dimension shape inference leaves open is checked once compiled)."""
        if shape.rank.is_dynamic or shape.rank.get_length() != 5:
            raise VolinferError(f"model output shape {shape} is not 5-D; only same-size (segmentation/restoration) "
                                f"models are supported")
        dims = [shape[i] for i in Layout.of(self.layout).spatial_axes]
        if any(d.is_static and d.get_length() != t for d, t in zip(dims, self.tile)):
            raise VolinferError(
                f"model output shape {shape.to_string()} does not keep its input's spatial size {list(self.tile)} "
                f"(layout {self.layout}); only same-size (segmentation/restoration) models are supported"
            )

    def _resolve_tile(self, tile: Sequence[int] | int | None, pshape: ov.PartialShape) -> tuple[int, int, int]:
        if tile is None and self.settings.tile:
            tile = self.settings.tile
        if tile is None:
            dims = [pshape[i] for i in Layout.of(self.layout).spatial_axes]
            if any(d.is_dynamic for d in dims):  # a provisional size: the planner chooses the run's tile
                tile = [max(self.multiple, 64 // self.multiple * self.multiple)] * 3
            else:
                tile = [d.get_length() for d in dims]
        t = (int(tile),) * 3 if isinstance(tile, (int, np.integer)) else tuple(int(v) for v in tile)
        if len(t) != 3 or min(t) < 1:
            raise VolinferError(f"tile must be one or three positive sizes; got {tile}")
        bad = [v for v in t if v % self.multiple]
        if bad:
            ok = sorted({max(self.multiple, v // self.multiple * self.multiple) for v in t})
            raise VolinferError(
                f"tile size {'x'.join(map(str, t))} rejected: this model needs sizes divisible by {self.multiple} "
                f"(try {'x'.join(map(str, ok)) if len(ok) > 1 else ok[0]})"
            )
        return t  # type: ignore[return-value]

    def _resolve_output(self, output: str | int | None) -> int:
        outs = self.model.outputs
        want = output if output is not None else self.settings.output
        if want is None:
            return 0
        if isinstance(want, int) or (isinstance(want, str) and want.isdigit()):
            i = int(want)
            if not 0 <= i < len(outs):
                raise VolinferError(f"output {i} does not exist; the model has {len(outs)} output(s)")
            return i
        for i, o in enumerate(outs):
            if want in o.get_names():
                return i
        names = ", ".join(sorted(n for o in outs for n in o.get_names()))
        raise VolinferError(f"model has no output named {want!r}; outputs: {names}")

    def at(self, tile: Sequence[int], model: ov.Model | None = None, compile: bool = True) -> "TileModel":
        """This model compiled at ``tile`` (itself when it already is), or ``model`` (a transformed copy of it, e.g.
        with frozen normalisation statistics) compiled with the same layout, output and options. ``compile=False``:
        shapes only (the layer-streaming engine compiles pieces of the model instead)."""
        tile = tuple(int(t) for t in tile)
        if not compile:
            tm = self._derived(model if model is not None else self.model.clone(), tile, self.options, compile=False)
            tm.precision_reason = self.precision_reason
            return tm
        if model is None and self.compiled is not None and tile == self.tile:
            return self
        cached = getattr(self, "_last_at", None)
        if model is None and cached is not None and cached.tile == tile:
            return cached  # batch runs: volumes that plan the same tile share one compiled model
        tm = self._derived(model if model is not None else self.model.clone(), tile, self.options)
        if tm.precision == self.precision:
            tm.precision_reason = self.precision_reason  # e.g. why a guard chose f32 (see with_precision)
        if model is None:
            self._last_at = tm
        return tm

    @property
    def auto_reduced(self) -> bool:
        """Whether ``--precision auto`` chose a reduced precision (from the verdict stored in the IR)."""
        return self.options.precision == "auto" and self.precision != "f32"

    def with_multiple(self, multiple: int) -> "TileModel":
        """This model (not compiled) with the size multiple a run found for it (a model that stores none)."""
        tm = self._derived(self.model, self.tile, self.options, compile=False, multiple=multiple)
        tm.precision_reason = self.precision_reason
        return tm

    def with_precision(self, precision: str, reason: str, compile: bool = True) -> "TileModel":
        """This model (same tile, layout, output) with ``precision`` instead, ``reason`` saying why."""
        tm = self._derived(self.model, self.tile, replace(self.options, precision=precision), compile)
        tm.precision_reason = reason
        return tm

    def _derived(self, model: ov.Model, tile: Sequence[int], options: CompileOptions, compile: bool = True,
                 multiple: int | None = None) -> "TileModel":
        """``model`` as a TileModel like this one (layout, output, file, the caller's tile, the size multiple)."""
        tm = TileModel(model, tile=tile, layout=self.layout, output=self.output_index, options=options,
                       core=self.core, compile=compile, multiple=multiple or self.multiple)
        tm.path, tm.tile_given, tm.declared_input = self.path, self.tile_given, self.declared_input
        tm.multiple_known = self.multiple_known or multiple is not None
        return tm

    def input_shape(self) -> list[int]:
        return self.input_shape_for(self.tile)

    def input_shape_for(self, spatial: Sequence[int]) -> list[int]:
        """The model's input shape for a (x, y, z) extent, in its layout."""
        return Layout.of(self.layout).tensor_shape(self.in_channels, spatial)

    def _reshape(self) -> None:
        try:
            self.model.reshape({self.model.input(0): ov.PartialShape(self.input_shape())})
        except Exception as e:
            if self.declared_input.is_static:  # a fixed-size model: one tile size, whatever its multiple says
                own = "x".join(str(self.declared_input[i].get_length()) for i in Layout.of(self.layout).spatial_axes)
                raise VolinferError(f"tile size {'x'.join(map(str, self.tile))} rejected: this model runs only at "
                                    f"{own} (a fixed input size): drop --tile, or re-export it with dynamic spatial "
                                    f"axes") from None
            hint = f"sizes divisible by {self.multiple}" if self.multiple > 1 else "a different tile size"
            raise VolinferError(
                f"tile size {'x'.join(map(str, self.tile))} rejected by the model (try {hint}; "
                f"`volinfer info` shows the stored size multiple): {framework_message(e)}"
            ) from None

    def _compile(self) -> ov.CompiledModel:
        try:
            return self.core.compile_model(self.model, self.options.device, self.options.config(self.precision))
        except VolinferError:
            raise
        except Exception as e:
            raise VolinferError(f"cannot compile the model for {self.options.device}: {framework_message(e)}"
                                ) from None

    def new_input_buffer(self) -> np.ndarray:
        """A zeroed host buffer of the tile input shape, to be shared (not copied) with one infer request."""
        return np.zeros(self.input_shape(), dtype=self.input_dtype)

    def output_view(self, request: ov.InferRequest) -> np.ndarray:
        """The request's output as a (C, x, y, z) view of OpenVINO's own buffer (no copy)."""
        data = request.get_output_tensor(self.output_index).data[0]
        return Layout.of(self.layout).to_cxyz(data)

    def output_view_of(self, data: np.ndarray) -> np.ndarray:
        """A (1, ...) output array in the model's layout as (C, x, y, z)."""
        return Layout.of(self.layout).to_cxyz(data[0])

    def input_view(self, buffer: np.ndarray) -> np.ndarray:
        """The host buffer as (C, x, y, z), whatever the layout."""
        return Layout.of(self.layout).to_cxyz(buffer[0])
