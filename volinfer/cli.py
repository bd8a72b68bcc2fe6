"""The ``volinfer`` command: run, info, demo, convert, bench."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from volinfer.version import __version__
from volinfer import validate as V
from volinfer.cliutil import (SIZE, TILES, OneLineUsage, emit, friendly_errors, note, output_options, progress_bar,
                      runtime_options)
from converters.cli import convert
from volinfer import options
from volinfer.api import BlockSettings, run_any
from volinfer.bench.cli import bench
from volinfer.demo import run_demo
from volinfer.describe import describe_model, info_text
from volinfer.errors import VolinferError
from volinfer.io.zarr_convert import nifti_to_zarr, zarr_to_nifti
from volinfer.io.zarr_io import open_zarr_array
from volinfer.run.plan import plan_run
from volinfer.run.settings import from_cli, output_float_dtype


@click.group(cls=OneLineUsage, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="volinfer")
def main() -> None:
    """Run 3D networks on whole volumes of any size, tile by tile, with nearly flat memory.

    \b
    volinfer demo                                   try it on a generated volume
    volinfer run ct.nii.gz -m model.xml -o seg.nii.gz
    volinfer plan ct.nii.gz -m model.xml            predicted peak RAM and time, before running
    volinfer info model.xml                         what a model expects
    volinfer convert model.onnx -o model.xml        any framework -> verified OpenVINO IR
    volinfer to-zarr ct.nii.gz -o ct.zarr           NIfTI -> OME-Zarr (to-nifti: back)
    volinfer bench -s 256 --vs monai                peak RAM and time against peers

    Every command takes its input first, the model as -m/--model and what it writes as -o/--output; sizes are N or
    XxYxZ, overlaps a fraction or whole voxels. Summaries and progress bars go to stderr, --json output alone to
    stdout, -q/--quiet silences both.
    """


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-m", "--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="OpenVINO IR (.xml) or ONNX (.onnx) model.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Output: a .nii / .nii.gz file, a .tif stack, a .zarr (OME-Zarr) store, or a directory for batch "
              "runs.")
@click.option("--tile", type=V.TILE, help="Tile size: 128 or 128x128x64 (whole numbers >= 1), or auto (default): "
              "the fastest tiling whose crop margins cover the model's receptive field (up to one tile over the whole "
              "volume) within --max-memory. A given size is used as is; the summary then says whether the run is "
              "exact.")
@click.option("--norm-stats", type=click.Choice(["volume", "tile"]),
              help="InstanceNorm/GroupNorm statistics: volume (default; whole-volume statistics found in streamed "
              "passes before the run, exact) or tile (per-tile, for models trained to run patch-wise).")
@click.option("--engine", type=click.Choice(["auto", "tiles", "stream"]), default="auto", show_default=True,
              help="stream: run the network layer by layer along z, every voxel of every layer computed once "
              "(whole-volume inference, no tile margins; convolution/pooling/element-wise models); tiles: tile by "
              "tile; auto: the planner's choice, the least predicted time within the memory budget (the leanest "
              "within 10% of it). A Zarr input runs block by block (tiles) unless the planner streams it (then in "
              "this process).")
@click.option("--mirror", help="Test-time mirroring over these axes (any of x, y, z, e.g. xyz): each tile's output "
              "is averaged over its flips, 2^axes inferences per tile; exact with crop stitching, same memory.")
@click.option("--overlap", type=V.OVERLAP, help="Overlap between neighbouring tiles: " + V.OVERLAP_RULE + "; "
              "1.5 is refused as ambiguous, and the overlap must stay below the tile. Crop stitching discards half "
              "of it on each side. Default: stored in the model, else 2x its receptive field (crop) or 0.25.")
@click.option("--stitch", type=click.Choice(["crop", "gaussian", "mean"]),
              help="crop: keep each tile's centre, exact when the margin covers the receptive field (default); "
              "gaussian/mean: weighted blending of overlaps.")
@click.option("--sigma", type=V.POSITIVE, help="Gaussian stitching: sigma as a fraction of the tile (> 0; default "
              "0.125); refused with crop or mean stitching.")
@click.option("--pad", "pad_mode", type=click.Choice(["constant", "edge", "reflect"]), default="constant",
              show_default=True, help="How tiles are filled past the volume's end.")
@click.option("--layout", type=click.Choice(["NCDHW", "NDHWC"], case_sensitive=False),
              help="Model input layout, when the model does not declare it.")
@click.option("--kind", type=click.Choice(["labels", "probabilities", "raw"]), default="labels", show_default=True,
              help="labels: argmax (or threshold for one channel), smallest integer type; probabilities: activated "
              "output; raw: model output.")
@click.option("--activation", type=click.Choice(["softmax", "sigmoid", "none"]), is_eager=True,
              help="Output activation. Default: stored in the model, else softmax (several channels) or sigmoid.")
@click.option("--channels", help="Output channels to keep, e.g. 1,2 (probabilities/raw, or sigmoid labels; refused "
              "with argmax labels).")
@click.option("--threshold", type=V.FLOAT, callback=V.threshold_callback,
              help="Threshold for one-channel (or sigmoid) labels, on probabilities: 0 < T < 1 (any finite number "
              "with --activation none; default 0.5); refused for argmax labels and other kinds.")
@click.option("--float16", "float16", is_flag=True, help="Write probabilities as float16 (Zarr outputs; NIfTI has "
              "no float16 type and TIFF outputs are written as float32: those get float32 and the summary says so).")
@click.option("--normalize", type=options.NORMALIZE, help="Intensity normalisation: none, zscore, minmax, "
              "percentile:LO:HI (" + options.PERCENTILE_RULE + "), scale:A:B (x * A + B; finite, A != 0). "
              "Default: stored in the model, else none.")
@click.option("--output-name", help="Which model output to use (name or index) when there are several.")
@runtime_options()
@click.option("--streams", type=V.COUNT, help="OpenVINO streams, >= 1 (more speed for more memory).")
@click.option("--requests", type=V.COUNT, default=2, show_default=True,
              help="Infer requests in flight, >= 1 (each ~1 tile of I/O memory).")
@click.option("--cache-dir", type=click.Path(path_type=Path), help="OpenVINO model cache directory.")
@click.option("--nan-value", type=V.FLOAT, help="Replace NaN/Inf voxels with this (finite) value (default: refuse "
              "such volumes).")
@click.option("--no-constant-reuse", is_flag=True, help="Run every tile, even constant ones (default: constant tiles "
              "reuse one cached inference).")
@click.option("--no-resample", is_flag=True, help="Run at the volume's own voxel size even when the model stores "
              "another spacing (default: resample to it, linear, and map the output back; the stored orientation is "
              "always honoured, by exact axis permutations and flips).")
@click.option("--scheduler", help="Zarr runs: Dask scheduler address (tcp://host:8786) to run the blocks on.")
@click.option("--workers", type=V.COUNT, help="Zarr runs: start a local Dask cluster of this many (>= 1) worker "
              "processes.")
@click.option("--block", type=V.COUNT, help="Zarr inputs: block size in voxels, >= 1 (whole output chunks; default "
              "256).")
@click.option("--chunks", type=V.COUNT, help="Zarr outputs: chunk size, >= 1 (default: the input's, else 64).")
@click.option("--no-compression", is_flag=True, help="Zarr outputs: store chunks uncompressed (default zstd).")
@click.option("--pyramid", type=click.IntRange(0, 16), default=0, show_default=True,
              help="Zarr outputs: also write this many OME-Zarr levels, each half the previous along z, y, x "
              "(nearest for labels, mean otherwise), as blocks complete.")
@click.option("--max-memory", type=options.MEMORY, help="Peak RAM budget for the plan (e.g. 600M, 2G; "
              + options.SIZE_RULE + "; default a quarter of the machine's RAM or cgroup limit, never of the memory free now): the fastest "
              "exact plan within it runs, else the run says it is not exact.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run (same command) from its last finished "
              "row of tiles; refused if the model, input or settings changed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@output_options("the run report")
@friendly_errors
def run(**params: Any) -> None:
    """Segment/restore INPUTS (a NIfTI, TIFF stack, MHA/MHD/NRRD file or Zarr store, or one file per input
    channel) into OUTPUT; a model storing an orientation/spacing gets the volume reoriented/resampled to them and
    the output mapped back onto the input's grid.

    \b
    Batch: give one directory or glob (quoted) as INPUTS and a directory as OUTPUT; each volume is written to
    OUTPUT/<its file name>, the model is compiled once, and a failing volume does not stop the others.
    """

    inputs, output, quiet, as_json = params["inputs"], params["output"], params["quiet"], params["as_json"]
    prob_dtype, dtype_note = output_float_dtype(params["float16"], params["kind"], output)
    settings = from_cli({**params, "prob_dtype": prob_dtype})
    blocks = BlockSettings(params["block"], params["scheduler"], params["workers"])
    human = not quiet and not as_json
    result = run_any(inputs, params["model_path"], output, settings, blocks=blocks, note=dtype_note,
                     notify=(lambda text: click.echo(text, err=True)) if human else None)
    emit(result.as_dict(), result.summary, as_json=as_json, quiet=quiet)
    if getattr(result, "failed", None):
        sys.exit(1)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-m", "--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="OpenVINO IR (.xml) or ONNX (.onnx) model.")
@click.option("--tile", type=V.TILE, help="Tile size: 128 or 128x128x64 (whole numbers >= 1), or auto (default): the "
              "run's own planning, fidelity first; the plan lists the tilings it weighed.")
@click.option("--tiles", "tile_list", type=TILES, help="Several tile sizes to compare, comma-separated, each N or "
              "XxYxZ (e.g. 64,96,128x128x64).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="As for `run`: the output the run would write "
              "(.nii / .nii.gz, .tif, .zarr; nothing is written here), planned as the run plans for it: a .zarr store "
              "keeps whole cross-sections, so it takes no bands of y rows, and a Zarr input may then run block by "
              "block. Default: planned as for a NIfTI output.")
@click.option("--max-memory", type=options.MEMORY, help="As for `run`: peak RAM budget for choosing the tile (e.g. 600M, "
              "2G; " + options.SIZE_RULE + "; default the runtime, the weights and 1 GiB, at most a quarter of the "
              "machine's RAM or cgroup limit).")
@click.option("--norm-stats", type=click.Choice(["volume", "tile"]), help="As for `run`: InstanceNorm/GroupNorm "
              "statistics from the whole volume (default; streamed passes, counted in the time) or per tile.")
@click.option("--mirror", help="As for `run`: test-time mirroring axes (any of x, y, z, e.g. xyz); 2^axes "
              "inferences per tile, counted in the time.")
@click.option("--engine", type=click.Choice(["auto", "tiles", "stream"]), default="auto", show_default=True,
              help="As for `run`: whether the run would stream layer by layer (the plan then says so and predicts "
              "its peak and time; the tile figures are the tiling --engine tiles would run).")
@click.option("--overlap", type=V.OVERLAP, help="As for `run`: " + V.OVERLAP_RULE + ". Default: stored in the "
              "model, else 2x its receptive field (crop) or 0.25.")
@click.option("--stitch", type=click.Choice(["crop", "gaussian", "mean"]),
              help="As for `run`: crop (default; exact when the margin covers the receptive field) or "
              "gaussian/mean blending, which holds a blend window and costs more memory.")
@click.option("--kind", type=click.Choice(["labels", "probabilities", "raw"]), default="labels", show_default=True,
              help="As for `run`: what is written; decides the output buffers' type and size.")
@click.option("--nan-value", type=V.FLOAT, help="As for `run`: replace NaN/Inf voxels with this (finite) value "
              "(default: refuse such volumes, as the run would).")
@runtime_options()
@click.option("--requests", type=V.COUNT, default=2, show_default=True,
              help="Infer requests in flight, >= 1 (each ~1 tile of I/O memory).")
@output_options("the plans (a list)")
@friendly_errors
def plan(**params: Any) -> None:
    """Predict the peak RAM and time of `volinfer run` on INPUTS (NIfTI files or one Zarr store), from measuring
    the compiled model in a fresh process at each tile size."""
    from dataclasses import replace

    import numpy as np


    quiet, as_json = params["quiet"], params["as_json"]
    settings = from_cli(params)
    sizes = params["tile_list"] or [settings.tiling.tile]
    plans = []
    with progress_bar(len(sizes), "measuring", "size", disable=quiet or as_json) as bar:
        for t in sizes:
            bar.set_postfix_str("tile " + ("auto" if t is None else "x".join(map(str, np.atleast_1d(t)))))
            one = replace(settings, tiling=replace(settings.tiling, tile=t))
            plans.append(plan_run(list(params["inputs"]), params["model_path"], one, target=params["output"]))
            bar.update()
    emit([p.as_dict() for p in plans], lambda: "\n".join(p.summary() for p in plans), as_json=as_json, quiet=quiet)


@main.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--tile", type=V.TILE, help="Tile size to measure the receptive field at: 128 or 128x128x64 (whole "
              "numbers >= 1; default: the model's).")
@click.option("--no-measure", is_flag=True, help="Skip measuring the receptive field (faster).")
@output_options("the model description")
@friendly_errors
def info(model_path: Path, tile: str | None, no_measure: bool, quiet: bool, as_json: bool) -> None:
    """Show a model's inputs, outputs, layout, stored settings and receptive field."""
    data = describe_model(model_path, tile, measure=not no_measure)
    emit(data, lambda: info_text(data), as_json=as_json, quiet=quiet)


@main.command()
@click.option("-o", "--output", "out_dir", default="volinfer-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write the demo volume, its ground truth and its segmentation into (created).")
@click.option("--out-dir", "legacy_out_dir", hidden=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", type=SIZE, default="160x144x112", show_default=True,
              help="Demo volume shape in voxels: N (a cube) or XxYxZ, whole numbers >= 1.")
@runtime_options()
@output_options("the run report")
@friendly_errors
def demo(out_dir: Path, legacy_out_dir: Path | None, size: list[int], device: str, precision: str,
         threads: int | None, quiet: bool, as_json: bool) -> None:
    """Generate a volume of bright blobs in noise, segment it with the built-in model, and report (with the Dice
    score against the generated ground truth)."""

    if legacy_out_dir is not None:
        note("--out-dir is now -o/--output", quiet=quiet or as_json)
        out_dir = legacy_out_dir
    report = run_demo(out_dir, tuple(size), device=device, precision=precision, threads=threads,  # type: ignore
                      progress=not quiet and not as_json)
    emit(report.as_dict(), report.summary, as_json=as_json, quiet=quiet)


def resolve_output(legacy: Path | None, output: Path | None, quiet: bool) -> Path:
    """``-o/--output``, or the old positional OUTPUT (still accepted, with a note)."""
    if legacy is not None and output is not None:
        raise VolinferError(f"two outputs given ({legacy} and -o {output}); give only -o/--output")
    if legacy is None and output is None:
        raise VolinferError("no output: give -o/--output")
    if legacy is not None:
        note(f"the output as a second argument is deprecated; use -o {legacy}", quiet=quiet)
    return output or legacy  # type: ignore[return-value]


def refuse_existing(output: Path, overwrite: bool) -> None:
    """One line for an existing output (before any work), naming the one way on these commands: --overwrite."""
    import os

    if os.path.lexists(output) and not overwrite:
        raise VolinferError(f"{output}: already exists (pass --overwrite to replace it)")


@main.command("to-zarr")
@click.argument("nifti", type=click.Path(path_type=Path))
@click.argument("legacy_output", required=False, metavar="", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="OME-Zarr store to write (a .zarr directory; required).")
@click.option("--chunks", type=V.COUNT, default=64, show_default=True, help="Chunk edge in voxels, >= 1 (cubic "
              "chunks).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store (only one volinfer wrote).")
@output_options("what was written")
@friendly_errors
def to_zarr(nifti: Path, legacy_output: Path | None, output: Path | None, chunks: int, overwrite: bool,
            quiet: bool, as_json: bool) -> None:
    """Stream the NIfTI volume NIFTI into an OME-Zarr store (z, y, x): NGFF scale and translation from its affine,
    the whole affine kept for `to-nifti`."""
    import time


    out = resolve_output(legacy_output, output, quiet or as_json)
    refuse_existing(out, overwrite)
    t0 = time.perf_counter()
    nifti_to_zarr(nifti, out, chunks=chunks, overwrite=overwrite, progress=not quiet and not as_json)
    arr = open_zarr_array(out)
    data = {"input": str(nifti), "output": str(out), "format": "OME-Zarr", "shape": list(arr.shape),
            "axes": "czyx"[-arr.ndim:], "dtype": str(arr.dtype), "chunks": list(arr.chunks),
            "wall_s": round(time.perf_counter() - t0, 3)}
    emit(data, f"wrote {out}: OME-Zarr ({', '.join(data['axes'])}) {'x'.join(map(str, arr.shape))} {arr.dtype}, "
               f"chunks {'x'.join(map(str, arr.chunks))}, {data['wall_s']:.1f} s", as_json=as_json, quiet=quiet)


@main.command("to-nifti")
@click.argument("zarr_path", type=click.Path(path_type=Path))
@click.argument("legacy_output", required=False, metavar="", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="NIfTI file to write (.nii or .nii.gz; required).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@output_options("what was written")
@friendly_errors
def to_nifti(zarr_path: Path, legacy_output: Path | None, output: Path | None, overwrite: bool, quiet: bool,
             as_json: bool) -> None:
    """Stream the Zarr array ZARR_PATH (z, y, x) or (c, z, y, x), or an OME-Zarr store's full-resolution level, into
    a NIfTI volume (x, y, z) with the affine the store records."""
    import time

    import nibabel as nib


    out = resolve_output(legacy_output, output, quiet or as_json)
    refuse_existing(out, overwrite)
    t0 = time.perf_counter()
    zarr_to_nifti(zarr_path, out, overwrite=overwrite, progress=not quiet and not as_json)
    img = nib.load(str(out))
    data = {"input": str(zarr_path), "output": str(out), "format": "NIfTI", "shape": list(img.shape),
            "dtype": str(img.get_data_dtype()), "wall_s": round(time.perf_counter() - t0, 3)}
    emit(data, f"wrote {out}: NIfTI {'x'.join(map(str, img.shape))} {data['dtype']}, {data['wall_s']:.1f} s",
         as_json=as_json, quiet=quiet)


main.add_command(convert)
main.add_command(bench)


if __name__ == "__main__":
    main()
