"""``volinfer bench``: the memory/time table, JSON and plot."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from ..cliutil import friendly_errors
from ..errors import VolinferError


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """``128,256`` → cubes; ``197x233x189`` → that shape."""
    sizes = []
    for item in text.split(","):
        try:
            dims = [int(v) for v in item.lower().split("x")]
        except ValueError:
            raise VolinferError(f"--sizes expects 128,256 or 197x233x189; got {item!r}") from None
        if len(dims) not in (1, 3) or min(dims) < 1:
            raise VolinferError(f"--sizes expects 128,256 or 197x233x189; got {item!r}")
        sizes.append(tuple(dims * 3 if len(dims) == 1 else dims))
    return sizes  # type: ignore[return-value]


def reference_model(work_dir: Path, tile: int) -> Path:
    """The reference U-Net as IR (converted once from PyTorch and reused)."""
    path = work_dir / f"reference_unet_{tile}.xml"
    if path.exists():
        return path
    if importlib.util.find_spec("torch") is None:
        raise VolinferError("the reference U-Net is built with PyTorch: pip install 'volinfer[torch]', or pass --model")
    from converters import convert

    work_dir.mkdir(parents=True, exist_ok=True)
    convert("volinfer.bench.reference_unet:build_unet", path, tile=tile, activation="softmax",
            labels=["background", "foreground"], measure_rf=False, overwrite=True)
    return path


@click.command()
@click.option("--sizes", default="128,256,384,512", show_default=True, help="Cube sizes (or XxYxZ), comma-separated.")
@click.option("--model", "model_path", type=click.Path(exists=True, path_type=Path),
              help="Model to measure (default: the reference MONAI-style U-Net, built with PyTorch).")
@click.option("--methods", default="naive,crop,gaussian", show_default=True,
              help="Any of naive, crop, gaussian, mean, monai.")
@click.option("--vs", "versus", type=click.Choice(["monai"]), help="Add MONAI's sliding_window_inference.")
@click.option("--tile", default=128, show_default=True)
@click.option("--overlap", default=0.25, show_default=True, help="Overlap fraction (or voxels) for tiled methods.")
@click.option("--precision", type=click.Choice(["f32", "bf16", "f16"]), default="f32", show_default=True)
@click.option("--cap", "cap_fraction", default=0.85, show_default=True,
              help="Skip or stop runs that need more than this fraction of RAM.")
@click.option("--work-dir", default="benchmarks/work", show_default=True, type=click.Path(path_type=Path),
              help="Generated volumes, model and outputs (volumes are reused between runs).")
@click.option("--out-dir", default="benchmarks/results", show_default=True, type=click.Path(path_type=Path),
              help="Where results.md, results.json and peak_rss.png go.")
@friendly_errors
def bench(sizes: str, model_path: Path | None, methods: str, versus: str | None, tile: int, overlap: float,
          precision: str, cap_fraction: float, work_dir: Path, out_dir: Path) -> None:
    """Measure peak RAM and time of each method at each volume size, each run in a fresh process."""
    from .harness import METHOD_NAMES, BenchConfig, markdown_table, run_benchmark, save_report

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if versus:
        chosen.append(versus)
    unknown = [m for m in chosen if m not in METHOD_NAMES]
    if unknown:
        raise VolinferError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    if "monai" in chosen and importlib.util.find_spec("monai") is None:
        raise VolinferError("--vs monai needs MONAI and PyTorch: pip install monai 'volinfer[torch]'")
    model = model_path or reference_model(work_dir, tile)
    cfg = BenchConfig(sizes=parse_sizes(sizes), methods=chosen, model=model, work_dir=work_dir, tile=tile,
                      overlap=overlap, precision=precision, cap_fraction=cap_fraction)
    results, info = run_benchmark(cfg, log=lambda s: click.echo(s, err=True))
    files = save_report(results, info, cfg, out_dir)
    click.echo(markdown_table(results))
    click.echo(f"\n{info['cpu']}, {info['cores']} cores, {info['ram_mb'] / 1024:.1f} GiB; OpenVINO {info['openvino']}")
    click.echo("wrote " + ", ".join(str(p) for p in files))
