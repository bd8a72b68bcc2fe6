"""``volinfer convert``: any supported model → verified, self-describing OpenVINO IR."""

from __future__ import annotations

import functools
import importlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from volinfer import options, portable
from volinfer import validate as V
from volinfer import watchdog
from volinfer.cliutil import runtime_options, emit, friendly_errors, output_options, progress_bar
from volinfer.errors import VolinferError
from volinfer.options import parse_normalization, parse_size_mb, parse_tile

from .convert import convert as run_convert
from .inputs import parse_set
from .settings import ConvertSettings


def _list(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


TRUST_HELP = ("Allow loading model files that carry code: fully pickled torch modules (.pt/.pth), pickles inside "
              "torch.export .pt2 and TorchScript archives beyond tensors, Keras Lambda layers (Python bytecode), "
              "and TensorFlow graphs with file/Python ops. Without it these are refused (ONNX, IR, plain weights "
              "need no trust). Only for files whose author you trust: loading them can run any code.")


@click.command()
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="IR path to write (.xml).")
@click.option("--weights", help="state_dict for a file.py:factory / package.module:factory model (always loaded "
              "with torch.load(weights_only=True); .npz arrays without pickles also work).")
@click.option("--random-weights", is_flag=True, help="Convert a factory without --weights, with the random "
              "weights it builds (refused otherwise).")
@click.option("--factory-args", help="JSON keyword arguments for the factory, e.g. '{\"out_channels\": 3}'.")
@click.option("--trust-pickle", is_flag=True, help=TRUST_HELP)
@click.option("--input", "inputs", help="The image input's name (graph input, TF node to cut a frozen graph at, e.g. "
              "a PlaceholderWithDefault fed by an iterator, or a torch forward argument). A wrong name lists the "
              "real ones.")
@click.option("--set", "set_values", multiple=True, metavar="NAME=VALUE",
              help="Freeze a model input to a constant (repeatable), e.g. --set training=false; the parity "
              "reference gets the same value.")
@click.option("--output-node", "outputs", help="TF frozen graph: output node name(s) to cut the graph at.")
@click.option("--output-name", help="Which output `volinfer run` uses when the model has several (name or index).")
@click.option("--tile", type=V.TILE, help="Tile size the model will run at: 128 or 128x128x64 (whole numbers >= 1). "
              "Default: the tile an IR already stores, else the model's static shape, else 64 (or its size "
              "multiple).")
@click.option("--channels", type=V.COUNT, help="Input channels (>= 1), when the model does not fix them.")
@click.option("--layout", type=click.Choice(["NCDHW", "NDHWC"], case_sensitive=False),
              help="Input layout (default: NCDHW; NDHWC for TensorFlow/Keras).")
@click.option("--static", is_flag=True, help="Store a static input shape (the tile) instead of dynamic spatial dims.")
@click.option("--activation", type=click.Choice(["softmax", "sigmoid", "none"]), help="Output activation to store.")
@click.option("--labels", help="Comma-separated label names (background first).")
@click.option("--channel-names", help="Comma-separated input channel names (e.g. t1,t2,flair).")
@click.option("--normalize", type=options.NORMALIZE, help="Normalisation to store: none, zscore, minmax, percentile:LO:HI "
              "(" + options.PERCENTILE_RULE + "), scale:A:B (finite, A != 0).")
@click.option("--spacing", type=V.SPACING, help="Voxel spacing the model expects, in mm, > 0 (e.g. 1,1,1).")
@click.option("--orientation", type=V.ORIENTATION, help="Orientation the model expects, three letters (e.g. RAS): "
              "`run` reorients other volumes to it (axis permutations and flips).")
@click.option("--overlap", type=V.OVERLAP, help="Default overlap to store, as for `run`: " + V.OVERLAP_RULE + ".")
@click.option("--stitch", type=click.Choice(["crop", "gaussian", "mean"]), help="Default stitching to store.")
@click.option("--fp16/--no-fp16", default=None, help="Weights as FP16 (--fp16: refuse the conversion when they fail "
              "parity) or FP32 (--no-fp16). Default: FP16 when they pass parity, else FP32 when those pass (the "
              "summary and --json say so, with the FP16 try's deviation).")
@click.option("--int8", is_flag=True, help="Post-training INT8 quantisation with NNCF, calibrated on "
              "--calibration-volume (parity against FP32 is reported).")
@click.option("--calibration-tiles", type=V.COUNT, default=8, show_default=True,
              help="Tiles sampled for INT8 calibration (>= 1).")
@click.option("--no-check", is_flag=True, help="Skip the parity check against the source model.")
@click.option("--tolerance", type=V.POSITIVE, help="Max relative error (> 0) of the parity check "
              "(default 1e-2 with FP16 weights, 1e-4 without). Segmentation outputs also pass when argmax labels "
              "agree on >= 99.9% of voxels and the relative error is <= max(0.05, 10 x default tolerance) (10 x an "
              "explicit --tolerance). --int8 is accepted when labels agree with FP32 on >= 99% of the calibration "
              "tiles' voxels and mean foreground Dice >= 0.95.")
@click.option("--calibration-volume", type=click.Path(exists=True), help="Check parity on a crop of this NIfTI volume.")
@click.option("--no-receptive-field", is_flag=True, help="Skip measuring the receptive field.")
@click.option("--no-speed-profile", is_flag=True, help="Skip timing the model at a few tile shapes (a few seconds; "
              "without a profile `volinfer run --tile auto` assumes every tile shape costs the same per voxel).")
@click.option("--max-memory", type=options.MEMORY, help="Peak RAM budget of the conversion (e.g. 2G; "
              + options.SIZE_RULE + "; default as for `run`: a quarter of the machine's RAM or cgroup limit): the "
              "receptive-field probe (when the graph cannot be read), the tiling, precision and parity checks and the "
              "speed profile each run at a size that fits it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing IR.")
@runtime_options(precision_note=" For convert: the reduced precision to verify and store the verdict of (auto: "
                 "the device's native one; f32: none); parity itself is always checked at f32 on the CPU.")
@output_options("the result")
@friendly_errors
def convert(model: str, **params: Any) -> None:
    """Convert MODEL to OpenVINO IR, check it computes what the source computes, store its run settings.

    \b
    MODEL is one of:
      model.onnx                 ONNX
      traced.pt                  TorchScript (torch.jit.trace / script)
      exported.pt2              torch.export ExportedProgram
      nets.py:build_unet         nn.Module factory (with --weights state_dict.pth)
      package.module:factory     same, importable
      saved_model_dir/           TensorFlow SavedModel
      frozen.pb                  TF1 frozen graph (cut with --input / --output-node)
      model.keras / model.h5     Keras
      model.xml                  an existing IR (re-check and re-describe it)

    Parity runs the source in its own framework (PyTorch, onnxruntime, TensorFlow); when that framework is not
    installed the report says "not checked". Importing file.py runs that file: name only code you trust. See
    SECURITY.md for what is data and what is code.
    """
    watchdog.arm()  # SIGINT/SIGTERM end the conversion within ~2 s, even inside a long framework call
    p = params
    settings = convert_settings(p)
    quiet, as_json = p["quiet"], p["as_json"]
    stages_module = importlib.import_module(__package__ + ".convert")  # the module (the package exports the function)
    with stage_progress(stages_module, measure_rf=not p["no_receptive_field"], int8=p["int8"],
                        check=not p["no_check"], disable=quiet or as_json, speed=not p["no_speed_profile"]):
        result = run_convert(model, p["output"], settings)
    data = {"path": str(result.path), "parity": result.parity.__dict__ if result.parity else None,
            "int8": result.int8.__dict__ if result.int8 else None,
            "weights": result.weights.as_dict() if result.weights else None,
            "settings": result.settings.as_dict(), "notes": result.notes, "peak_rss_mb": _peak_mb()}
    emit(data, lambda: summary(result), as_json=as_json, quiet=quiet)


def convert_settings(p: dict[str, Any]) -> Any:
    """The :class:`converters.settings.ConvertSettings` of `volinfer convert`'s parsed options."""
    try:
        kwargs = json.loads(p["factory_args"]) if p["factory_args"] else None
        spacing_v = [float(v) for v in p["spacing"].split(",")] if p["spacing"] else None
    except (ValueError, json.JSONDecodeError) as e:
        raise VolinferError(f"bad option value: {e}") from None
    return ConvertSettings.from_kwargs(
        weights=p["weights"], trust_pickle=p["trust_pickle"], random_weights=p["random_weights"],
        factory_kwargs=kwargs, inputs=_list(p["inputs"]), outputs=_list(p["outputs"]),
        fixed=parse_set(p["set_values"]), select_output=p["output_name"], tile=parse_tile(p["tile"]),
        channels=p["channels"], layout=p["layout"].upper() if p["layout"] else None, static=p["static"],
        activation=p["activation"], labels=_list(p["labels"]), channel_names=_list(p["channel_names"]),
        normalization=parse_normalization(p["normalize"]), spacing=spacing_v,
        orientation=p.get("orientation"), overlap=stored_overlap(p["overlap"]),
        stitch=p["stitch"], fp16=p["fp16"], int8=p["int8"], calibration_tiles=p["calibration_tiles"],
        check=not p["no_check"], tolerance=p["tolerance"], calibration_volume=p["calibration_volume"],
        measure_rf=not p["no_receptive_field"], overwrite=p["overwrite"], device=p["device"],
        precision=p["precision"], threads=p["threads"], speed_profile=not p["no_speed_profile"],
        max_memory_mb=parse_size_mb(p["max_memory"]) if p.get("max_memory") else None)


def stored_overlap(text: str | None) -> float | int | list[float | int] | None:
    """``--overlap`` as stored in the IR: one number (a fraction, or whole voxels as an int) or three per axis."""
    values = V.overlap(text)
    if values is None:
        return None
    out: list[float | int] = [int(v) if v >= 1 else v for v in values]
    return out[0] if len(set(out)) == 1 else out


def _peak_mb() -> float | None:
    """This process's peak resident memory so far (MB): the conversion's own, from the OS."""
    return portable.memory_status()["peak_mb"]


def summary(result: Any) -> str:
    """The human report of a conversion (stderr)."""
    lines = [f"wrote {result.path} (+ {result.path.with_suffix('.bin').name})",
             str(result.parity) if result.parity else "parity check skipped (--no-check)"]
    if result.int8:
        lines.append(str(result.int8))
    if result.weights is not None and result.weights.fp16_parity is not None:  # FP16 rejected, FP32 kept
        lines.append(str(result.weights))
    s = result.settings
    lines.append(f"layout {s.layout}, {s.in_channels} channel(s), tile {s.tile}, size multiple {s.size_multiple}, "
                 f"receptive field {s.receptive_field}")
    peak = _peak_mb()
    if peak is not None:
        lines.append(f"peak RSS {peak:.0f} MB (this conversion)")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)


#: The stages of a conversion that take time, as (function of converters.convert, label); see stage_progress.
STAGES = [("load", "loading the source"), ("_prepare", "export to OpenVINO"),
          ("_measure_rf", "receptive field"), ("_check_tiling", "tiling check"),
          ("_check_precision", "precision check"), ("_measure_speed", "speed profile"),
          ("quantize_int8", "INT8 calibration"), ("_save_checked", "parity check")]


@contextmanager
def stage_progress(module: Any, *, measure_rf: bool, int8: bool, check: bool, disable: bool,
                   speed: bool = True) -> Iterator[None]:
    """A stage bar on stderr for `volinfer convert`: each stage function of :mod:`converters.convert` is wrapped,
    for the duration of the command only, so that the bar names the stage running and advances when it ends (the
    conversion itself knows nothing of the bar). A stage that is renamed or gone is simply not shown."""
    skip = {"_measure_rf": not measure_rf, "_check_tiling": not measure_rf, "_check_precision": int8,
            "quantize_int8": not int8, "_measure_speed": int8 or not speed}
    chosen = [(n, label) for n, label in STAGES if not skip.get(n) and callable(getattr(module, n, None))]
    if not check:
        chosen = [(n, "saving" if n == "_save_checked" else label) for n, label in chosen]
    saved = {n: getattr(module, n) for n, _ in chosen}
    bar = progress_bar(len(chosen), "convert", "stage", disable=disable)

    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def staged(*args: Any, **kwargs: Any) -> Any:
            bar.set_description_str(f"convert: {label}")
            out = fn(*args, **kwargs)
            bar.update()
            return out
        return staged

    try:
        for n, label in chosen:
            setattr(module, n, wrap(saved[n], label))
        yield
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)
        bar.close()
