"""The benchmark's report: ratios computed from one run's measurements, a Markdown table that states the conditions
(precision, tile, overlap, CPU, library versions, command), the JSON behind it and a peak-RSS plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from volinfer.bench.harness import METHOD_NAMES, PEERS, VOLINFER_METHODS, BenchConfig, Measurement

PEER_SHORT = {"naive": "naive OV", "naive-torch": "naive PyTorch", "monai": "MONAI", "nnunet": "nnU-Net"}


def _size(size: tuple[int, ...]) -> str:
    return f"{size[0]}³" if len(set(size)) == 1 else "×".join(map(str, size))


def _ok(results: list[Measurement], size: tuple[int, ...], method: str) -> Measurement | None:
    return next((r for r in results if r.size == size and r.method == method and r.status == "ok"), None)


def ratios(results: list[Measurement]) -> list[dict[str, Any]]:
    """For every successful volinfer run: peak RSS, wall and CPU time against each peer measured at the same size in
    the same benchmark run, and end-to-end against OpenVINO inference alone (same compiled tile model):
    ``throughput_vs_infer_only`` = (tiles / wall) ÷ (tiles / s of inference alone), ``cpu_vs_infer_only`` = CPU
    time ÷ (tiles × CPU per tile of inference alone). CPU that reading, stitching or writing takes from inference on
    a machine with few cores lowers the first and raises the second."""
    rows = []
    for m in results:
        if m.method not in (*VOLINFER_METHODS, "auto") or m.status != "ok":
            continue
        row: dict[str, Any] = {"size": list(m.size), "method": m.method}
        for peer in PEERS:
            p = _ok(results, m.size, peer)
            if p is None:
                continue
            row[f"rss_{peer}_over_this"] = round(p.peak_rss_mb / m.peak_rss_mb, 2)  # type: ignore[operator]
            row[f"wall_this_over_{peer}"] = round(m.wall_s / p.wall_s, 3)  # type: ignore[operator]
            row[f"cpu_this_over_{peer}"] = round(m.cpu_s / p.cpu_s, 3)  # type: ignore[operator]
        floor = _ok(results, m.size, "infer-only")
        if floor is not None and m.tiles and floor.tiles and m.method != "auto":  # auto may not run those tiles
            rate = floor.tiles / floor.raw["infer_s"]
            row["throughput_vs_infer_only"] = round((m.tiles / m.wall_s) / rate, 3)  # type: ignore[operator]
            cpu_per_tile = floor.raw.get("infer_cpu_s", 0.0) / floor.tiles
            if cpu_per_tile:
                row["cpu_vs_infer_only"] = round(m.cpu_s / (m.tiles * cpu_per_tile), 3)  # type: ignore[operator]
        rows.append(row)
    return rows


def _normalization(cfg: BenchConfig) -> str:
    """How the input was normalised, the same for every method."""
    if cfg.normalize == "zscore":
        return ("Input z-scored with the whole volume's mean and std by every method (volinfer: stored in the IR, "
                "statistics from its streamed pre-pass; naive OpenVINO and PyTorch: in place on their float32 array; "
                "MONAI: NormalizeIntensity; nnU-Net: its ZScoreNormalization).")
    return "Input fed raw (the model stores no normalisation), by every method."


def conditions(cfg: BenchConfig, info: dict[str, Any]) -> str:
    """One paragraph stating what was measured, where and how."""
    libs = ", ".join(f"{k} {info[k]}" for k in ("openvino", "torch", "monai", "nnunetv2") if info.get(k))
    threads = f"{cfg.threads} threads" if cfg.threads else "all cores"
    return (f"Model `{Path(cfg.model).name}`; OpenVINO precision **{cfg.precision}** on {cfg.device} ({threads}), "
            f"PyTorch peers in f32; tile {cfg.tile}³, overlap {cfg.overlap} (volinfer; MONAI and nnU-Net get the same "
            f"tile and overlap with Gaussian blending). {_normalization(cfg)} CPU: {info['cpu']}, "
            f"{info['cores']} cores, {info['ram_mb'] / 1024:.1f} GiB RAM; {libs}. Peak RSS: the OS's figure for each "
            f"finished process; wall and CPU (user + system, all threads): the method's own work after imports (model "
            f"loading/compilation, reading, normalisation, inference, argmax to uint8, writing); for inference alone, "
            f"its loop over that many random tiles (after one warm-up tile), which sets the floor volinfer's "
            f"end-to-end throughput is compared with.")


def markdown_table(results: list[Measurement]) -> str:
    """Method × size: peak RSS, wall, CPU, throughput, label agreement with naive OpenVINO (or crop)."""
    lines = ["| volume | method | peak RSS (MB) | wall (s) | CPU (s) | Mvox/s | same labels as |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for m in sorted(results, key=lambda r: (r.voxels, list(METHOD_NAMES).index(r.method))):
        if m.status != "ok":
            lines.append(f"| {_size(m.size)} | {METHOD_NAMES[m.method]} | — | — | — | — | {m.status}: {m.note} |")
            continue
        ref = "naive" if _ok(results, m.size, "naive") else "crop"
        agree = f"{100 * m.agreement:.2f}% of {ref}" if m.agreement is not None else "—"
        mvox = f"{m.mvox_s:.2f}" if m.mvox_s else f"({m.tiles} tile{'s' if m.tiles != 1 else ''})"
        lines.append(f"| {_size(m.size)} | {METHOD_NAMES[m.method]} | {m.peak_rss_mb:.0f} | {m.wall_s:.2f} | "
                     f"{m.cpu_s:.2f} | {mvox} | {agree} |")
    return "\n".join(lines)


def ratio_table(rows: list[dict[str, Any]]) -> str:
    """The ratios of :func:`ratios` as Markdown (only the peers that were measured)."""
    peers = [p for p in PEERS if any(f"rss_{p}_over_this" in r for r in rows)]
    tiled = [p for p in peers if p in ("monai", "nnunet")]
    head = ["volume", "volinfer"] + [f"peak: {PEER_SHORT[p]} ÷ this" for p in peers] \
        + [f"wall: this ÷ {PEER_SHORT[p]}" for p in peers] + [f"CPU: this ÷ {PEER_SHORT[p]}" for p in tiled] \
        + ["throughput ÷ inference alone", "CPU ÷ inference alone"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]

    def cell(r: dict[str, Any], key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "—"

    for r in rows:
        cells = [_size(tuple(r["size"])), r["method"]]
        cells += [cell(r, f"rss_{p}_over_this", ".1f") + "×" for p in peers]
        cells += [cell(r, f"wall_this_over_{p}", ".2f") + "×" for p in peers]
        cells += [cell(r, f"cpu_this_over_{p}", ".2f") + "×" for p in tiled]
        cells += [cell(r, "throughput_vs_infer_only", ".0%"), cell(r, "cpu_vs_infer_only", ".2f") + "×"]
        lines.append("| " + " | ".join(c.replace("—×", "—") for c in cells) + " |")
    return "\n".join(lines)


def markdown_report(results: list[Measurement], info: dict[str, Any], cfg: BenchConfig) -> str:
    parts = [conditions(cfg, info), "", markdown_table(results)]
    rows = ratios(results)
    if rows:
        parts += ["", "Ratios, all from the runs above:", "", ratio_table(rows)]
    if cfg.command:
        parts += ["", f"Command: `{cfg.command}`"]
    if cfg.note:
        parts += ["", f"Note: {cfg.note}"]
    return "\n".join(parts) + "\n"


def save_rows(out: Path, rows: list[str], raw: Any) -> None:
    """A benchmark script's markdown table (``out``) and its raw measurements (``out`` with .json), then the table
    printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(rows) + "\n")
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2, default=str))
    print("\n".join(rows))


def save_report(results: list[Measurement], info: dict[str, Any], cfg: BenchConfig, out_dir: Path,
                name: str = "results") -> list[Path]:
    """Write ``NAME.md``, ``NAME.json`` and (with matplotlib) ``NAME_peak_rss.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md.write_text(markdown_report(results, info, cfg))
    js.write_text(json.dumps({
        "machine": info,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "results": [dict(asdict(m), voxels=m.voxels, mvox_s=m.mvox_s) for m in results],
        "ratios": ratios(results),
    }, indent=2, default=str))
    png = plot(results, info, out_dir / f"{name}_peak_rss.png")
    return [md, js] + ([png] if png else [])


def plot(results: list[Measurement], info: dict[str, Any], path: Path) -> Path | None:
    """Peak RSS against volume size, one line per method (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in METHOD_NAMES:
        pts = sorted((m.voxels, m.peak_rss_mb) for m in results if m.method == method and m.status == "ok")
        if pts and method != "infer-only":
            ax.plot(*zip(*pts), marker="o", label=METHOD_NAMES[method])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("volume size (voxels)")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title(f"Peak memory vs volume size ({info.get('cores')} cores, {info.get('ram_mb', 0) / 1024:.0f} GiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
