"""``volinfer bench``: peak RAM, wall and CPU time of volinfer against lean baselines and peers, each run in a fresh
process; a Markdown/JSON report and a plot in a directory of the user's choosing (a new temporary one by default)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from volinfer import validate as V
from volinfer.cliutil import friendly_errors, output_options, progress_bar, runtime_options
from volinfer.errors import VolinferError
from volinfer.options import parse_overlap
from converters import convert
from volinfer.bench.volumes import make_volume
from volinfer.model.settings import ModelSettings
from volinfer.model.tile_model import CompileOptions, TileModel, read_model
from volinfer.bench.harness import METHOD_NAMES, BenchConfig, run_benchmark
from volinfer.bench.report import markdown_report, ratios, save_report

DEFAULT_FACTORY = "volinfer.bench.reference_unet:build_unet"
PEER_METHODS = {"monai": "monai", "nnunet": "nnunet", "torch": "naive-torch"}
BASELINES = ("naive", "naive-torch", "monai", "nnunet")  # the methods normalising on their own (not volinfer's)
PEER_NEEDS = {"monai": ("monai", "pip install monai 'volinfer[torch]'"),
              "nnunet": ("nnunetv2", "pip install 'volinfer[nnunet]' (see the README for keeping your torch)"),
              "naive-torch": ("torch", "pip install 'volinfer[torch]'")}


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """``128,256`` → cubes; ``197x233x189`` → that shape; both may be mixed in one comma-separated list."""
    sizes = []
    for item in text.split(","):
        try:
            dims = [int(v) for v in item.strip().lower().split("x")]
        except ValueError:
            raise VolinferError(f"--sizes expects N or XxYxZ, comma-separated (128,197x233x189); got {item!r}") from None
        if len(dims) not in (1, 3) or min(dims) < 1:
            raise VolinferError(f"--sizes expects N or XxYxZ, comma-separated (128,197x233x189); got {item!r}")
        sizes.append(tuple(dims * 3 if len(dims) == 1 else dims))
    return sizes  # type: ignore[return-value]


def choose_methods(methods: str, versus: str | None) -> list[str]:
    """The methods to run, in order, from ``--methods`` and ``--vs``; one-line errors for unknown or missing ones."""
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    peers = [v.strip() for v in (versus or "").split(",") if v.strip()]
    if peers == ["all"]:
        peers = [p for p in PEER_METHODS if importlib.util.find_spec(PEER_NEEDS[PEER_METHODS[p]][0])]
    for p in peers:
        if p not in PEER_METHODS:
            raise VolinferError(f"--vs: unknown peer {p!r}; choose from {', '.join(PEER_METHODS)} or all")
        chosen.append(PEER_METHODS[p])
    unknown = [m for m in chosen if m not in METHOD_NAMES]
    if unknown:
        raise VolinferError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    for m in chosen:
        if m in PEER_NEEDS and importlib.util.find_spec(PEER_NEEDS[m][0]) is None:
            raise VolinferError(f"{m} needs {PEER_NEEDS[m][0]}: {PEER_NEEDS[m][1]}")
    return list(dict.fromkeys(chosen))


def invocation() -> str:
    """The command line that started this process, as a user would type it (for the report)."""
    prog = sys.argv[0] if sys.argv else "volinfer"
    if prog.endswith("__main__.py"):
        head = ["python", "-m", "volinfer"]
    elif prog.endswith(".py"):
        head = ["python", prog]
    else:
        head = [Path(prog).name]
    return shlex.join(head + sys.argv[1:])


#: What the reference U-Net stores for `volinfer run` (and what every baseline therefore does too): z-score with the
#: whole volume's mean and std, as MONAI's NormalizeIntensity and nnU-Net's ZScoreNormalization do per image.
REFERENCE_NORMALIZATION = {"kind": "zscore"}


def reference_model(work_dir: Path, tile: int) -> Path:
    """The reference U-Net as IR with full-precision weights (the PyTorch peers compute with the same weights) and a
    stored z-score normalisation, converted once per work directory. Convert's precision and tiling checks are
    measured on a crop of a benchmark-like volume (:func:`volinfer.bench.volumes.make_volume`), normalised as runs
    normalise it."""
    path = work_dir / f"reference_unet_{tile}_z.xml"  # _z: stores the normalisation (older IRs did not)
    if path.exists():
        return path
    if importlib.util.find_spec("torch") is None:
        raise VolinferError("the reference U-Net is built with PyTorch: pip install 'volinfer[torch]', or pass -m")
    work_dir.mkdir(parents=True, exist_ok=True)
    # the precision check runs one tile of it, the tiling check a 128³ probe (receptive-field radius 44): no padding
    edge = max(2 * tile, 128)
    calibration = make_volume(work_dir / f"calibration_{edge}.nii", (edge,) * 3)
    convert("volinfer.bench.reference_unet:build_unet", path, tile=tile, activation="softmax",
            labels=["background", "foreground"], fp16=False, overwrite=True, random_weights=True,
            normalization=dict(REFERENCE_NORMALIZATION), calibration_volume=str(calibration))
    return path


def baseline_normalization(model: Path, methods: list[str]) -> str:
    """How the baselines normalise, matching what ``model`` stores for `volinfer run`: ``zscore`` (whole-volume
    mean and std) or ``none``. Other stored normalisations are refused when a baseline is measured (the baselines
    would see other values than volinfer)."""
    spec = ModelSettings.from_model(read_model(model)).normalization or {"kind": "none"}
    kind = spec.get("kind", "none")
    if kind == "zscore" and "mean" not in spec:
        return "zscore"
    if kind == "none":
        return "none"
    baselines = [m for m in methods if m in BASELINES]
    if baselines:
        raise VolinferError(f"{model.name} stores normalization {kind!r}; the baselines ({', '.join(baselines)}) "
                            f"z-score or leave the input raw: convert with --normalize zscore (or none) to compare")
    return "none"


def _cube(name: str, value: object) -> int:
    sizes = V.tile(value)
    if not sizes or len(set(sizes)) != 1:
        raise VolinferError(f"{name} must be one tile edge N (or NxNxN) in voxels, >= 1: every method here, the peers "
                            f"included, runs cubic tiles; got {value!r}")
    return sizes[0]


CUBE = V.Checked("tile", _cube)


def resolve_precision(model: Path, precision: str, device: str) -> str:
    """The precision resolved once, as `volinfer run` would for this model and device (``auto``; or bf16/f16 on a
    device without them, which runs f32), so that every method of the report runs (and the report names) one
    concrete precision."""
    return TileModel(model, options=CompileOptions(device=device, precision=precision), compile=False).precision


@dataclass(frozen=True)
class BenchRequest:
    """The ``volinfer bench`` command line, one field per option."""

    model_path: Path | None
    sizes: str
    methods: str
    versus: str | None
    tile: int
    overlap: str
    device: str
    precision: str
    threads: int | None
    cap_fraction: float
    output: Path | None
    name: str
    work_dir: Path | None
    torch_factory: str
    note: str
    quiet: bool
    as_json: bool


@click.command()
@click.option("-m", "--model", "model_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Model to measure (.xml/.onnx). Default: the reference MONAI-style U-Net, built with PyTorch "
                   "(needed for the PyTorch peers, which run its source network; see --torch-factory), storing a "
                   "whole-volume z-score. The baselines normalise as the model stores: z-score or none.")
@click.option("-s", "--sizes", default="256,512", show_default=True,
              help="Volume sizes in voxels: N (a cube) or XxYxZ, comma-separated.")
@click.option("--methods", default="naive,crop,gaussian,infer-only", show_default=True,
              help="Any of naive, crop, gaussian, mean, auto (volinfer with no options: planned exact tile, auto "
              "precision), infer-only (OpenVINO inference alone on the same tiles).")
@click.option("--vs", "versus", help="Peers to add, comma-separated: monai, nnunet, torch (naive PyTorch), or all "
                                     "(those installed). They run the PyTorch network of --torch-factory.")
@click.option("--tile", default="128", show_default=True, type=CUBE,
              help="Tile edge in voxels, every method the same: N (or NxNxN; the peers take cubic tiles).")
@click.option("--overlap", default="0.25", show_default=True, type=V.OVERLAP,
              help="Overlap between neighbouring tiles, as for `run`: " + V.OVERLAP_RULE.split(", optionally")[0]
              + ".")
@runtime_options(precision_default="f32", precision_note=" Default f32 here: the PyTorch peers compute in f32, and "
                 "every method of one report runs the one precision the report names (auto is resolved once).")
@click.option("--cap", "cap_fraction", default=0.85, show_default=True, type=click.FloatRange(0.05, 1.0),
              help="Skip or stop runs that need more than this fraction of RAM.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Directory for NAME.md, NAME.json and NAME_peak_rss.png. Default: a new temporary directory.")
@click.option("--name", default="results", show_default=True, help="File name stem of the report files.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep generated volumes and the reference model here and reuse them (default: a temporary "
                   "directory, removed at the end).")
@click.option("--torch-factory", default=DEFAULT_FACTORY, show_default=True,
              help="module:function building the PyTorch network the PyTorch peers run (the source of -m).")
@click.option("--note", default="", help="A remark printed with the report (e.g. that the machine was shared).")
@output_options("the report")
@friendly_errors
def bench(**options: Any) -> None:
    """Measure peak RAM, wall and CPU time of each method at each volume size, each run in a fresh process."""
    req = BenchRequest(**options)
    parse_overlap(req.overlap)  # one-line error for a malformed value before any work
    chosen = choose_methods(req.methods, req.versus)
    if req.model_path and req.torch_factory == DEFAULT_FACTORY and any(m in PEER_NEEDS for m in chosen):
        raise VolinferError("the PyTorch peers run --torch-factory's network: with -m, pass the factory the model "
                            "was converted from (module:function)")
    out_dir = req.output or Path(tempfile.mkdtemp(prefix="volinfer-bench-"))
    with tempfile.TemporaryDirectory(prefix="volinfer-bench-work-") as tmp:
        _run(req, chosen, (req.work_dir or Path(tmp)).resolve(), out_dir)


def _run(req: BenchRequest, chosen: list[str], wd: Path, out_dir: Path) -> None:
    size_list = parse_sizes(req.sizes)
    if req.model_path is not None:  # the same one-line refusal as run/info, before any process is spawned
        read_model(req.model_path)
    model = (req.model_path or reference_model(wd, req.tile)).resolve()
    precision = resolve_precision(model, req.precision, req.device)
    cfg = BenchConfig(sizes=size_list, methods=chosen, model=model, work_dir=wd, tile=req.tile, overlap=req.overlap,
                      precision=precision, device=req.device, threads=req.threads, cap_fraction=req.cap_fraction,
                      torch_factory=req.torch_factory, command=invocation(), note=req.note,
                      normalize=baseline_normalization(model, chosen))
    human = not req.quiet and not req.as_json  # --json: the report alone, on stdout
    with progress_bar(len(size_list) * len(chosen), "bench runs", "run", disable=not human) as bar:
        results, info = run_benchmark(cfg, log=lambda s: bar.write(s, file=sys.stderr) if human else None,
                                      progress=bar)
    files = save_report(results, info, cfg, out_dir, req.name)
    if human:
        click.echo("\n" + markdown_report(results, info, cfg), err=True)
        click.echo("wrote " + ", ".join(str(p) for p in files), err=True)
    if req.as_json:
        data = json.loads(files[1].read_text())
        data.update(files=[str(p) for p in files], ratios=ratios(results))
        click.echo(json.dumps(data, indent=2))
    if results and not any(r.status == "ok" for r in results):
        raise VolinferError(f"every run failed (see {files[0]})")


def main_with_defaults(defaults: dict[str, str], prog: str) -> None:
    """Run `volinfer bench` with ``defaults`` for every option the command line does not give (the benchmark
    scripts); the report records the full command, defaults included."""
    short = {"-s": "--sizes", "-o": "--output"}
    args = sys.argv[1:]
    given = {short.get(a.split("=")[0], a.split("=")[0]) for a in args if a.startswith("-")}
    for option, value in defaults.items():
        if option not in given:
            args += [option, value]
    sys.argv = [sys.argv[0], *args]
    bench.main(args=args, prog_name=prog)
