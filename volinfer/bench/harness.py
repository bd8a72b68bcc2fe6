"""Benchmark harness: every configuration in a fresh child process, peak RSS as the OS counts it for that finished
process (``wait4``'s ``ru_maxrss``), runs that would exceed a memory cap skipped before they start (predicted from
smaller sizes) or killed if they cross it anyway."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

METHOD_NAMES = {
    "naive": "naive OpenVINO (whole volume)",
    "crop": "volinfer crop",
    "gaussian": "volinfer gaussian",
    "mean": "volinfer mean",
    "monai": "MONAI sliding window (PyTorch)",
}


@dataclass
class Measurement:
    method: str
    size: tuple[int, int, int]
    status: str  # ok, skipped, killed, failed
    peak_rss_mb: float | None = None
    wall_s: float | None = None
    infer_s: float | None = None
    note: str = ""
    agreement: float | None = None  # fraction of voxels whose label equals the reference method's
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size))

    @property
    def mvox_s(self) -> float | None:
        return self.voxels / self.wall_s / 1e6 if self.wall_s else None


def total_ram_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict[str, Any]:
    """CPU, cores, RAM and library versions, for the JSON report."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "ram_mb": round(total_ram_mb()),
                            "python": platform.python_version(), "platform": platform.platform()}
    for mod in ("openvino", "numpy", "nibabel", "torch", "monai"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = None
    return info


class Spawner:
    """Starts workers from a tiny separate process (see :mod:`volinfer.bench.spawner`) so that each worker's peak
    RSS is its own and not inherited from this (possibly large) process."""

    def __init__(self) -> None:
        script = Path(__file__).with_name("spawner.py")
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)

    def run(self, args: Sequence[str], cap_mb: float, timeout_s: float | None = None) -> tuple[int, float, bool]:
        """Run ``python -m volinfer.bench.worker ARGS``; return (exit code, peak RSS MB, killed for memory/time)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        argv = [sys.executable, "-m", "volinfer.bench.worker", *args]
        self.proc.stdin.write(json.dumps({"argv": argv, "cap_mb": cap_mb, "timeout_s": timeout_s}) + "\n")
        res = json.loads(self.proc.stdout.readline())
        if res["rc"] != 0 and not res["killed"]:
            sys.stderr.write(f"  child failed: {res['stderr_tail'] or res['rc']}\n")
        return res["rc"], res["peak_mb"], res["killed"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait()

    def __enter__(self) -> "Spawner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def predict_rss(points: list[tuple[int, float]], voxels: int) -> float | None:
    """Linear extrapolation of peak RSS in voxels from earlier sizes of the same method."""
    if not points:
        return None
    if len(points) == 1:
        v, r = points[0]
        return r * voxels / v  # proportional: pessimistic for flat methods, right for naive ones
    (v1, r1), (v2, r2) = points[-2], points[-1]
    slope = (r2 - r1) / (v2 - v1) if v2 != v1 else 0.0
    return r2 + slope * (voxels - v2)


def label_agreement(a: Path, b: Path, slab: int = 16) -> float:
    """Fraction of equal voxels between two label volumes, compared slab by slab."""
    import nibabel as nib

    ia, ib = nib.load(str(a)), nib.load(str(b))
    if ia.shape != ib.shape:
        return float("nan")
    same, total = 0, 0
    for z0 in range(0, ia.shape[2], slab):
        za = np.asarray(ia.dataobj[..., z0 : z0 + slab])
        zb = np.asarray(ib.dataobj[..., z0 : z0 + slab])
        same += int((za == zb).sum())
        total += za.size
    return same / total


@dataclass
class BenchConfig:
    sizes: list[tuple[int, int, int]]
    methods: list[str]
    model: Path
    work_dir: Path
    tile: int = 128
    overlap: float = 0.25
    precision: str = "f32"
    cap_fraction: float = 0.85
    torch_factory: str = "volinfer.bench.reference_unet:build_unet"
    keep_outputs: bool = False


def run_benchmark(cfg: BenchConfig, log=print) -> tuple[list[Measurement], dict[str, Any]]:
    """Measure every method at every size (smallest first). Returns the measurements and the machine description."""
    from .volumes import make_volume

    cap = total_ram_mb() * cfg.cap_fraction
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    results: list[Measurement] = []
    spawner = Spawner()
    history: dict[str, list[tuple[int, float]]] = {m: [] for m in cfg.methods}
    for size in sorted(cfg.sizes, key=lambda s: int(np.prod(s))):
        name = "x".join(map(str, size))
        vol = make_volume(cfg.work_dir / f"volume_{name}.nii", size)
        outputs: dict[str, Path] = {}
        for method in cfg.methods:
            m = Measurement(method, size, "ok")
            need = predict_rss(history[method], m.voxels)
            if need is not None and need > cap:
                m.status, m.note = "skipped", f"would need ~{need / 1024:.1f} GB (cap {cap / 1024:.1f} GB)"
                log(f"{name:>14} {method:<9} skipped: {m.note}")
                results.append(m)
                continue
            out = cfg.work_dir / f"labels_{method}_{name}.nii"
            res = Path(tempfile.mkstemp(suffix=".json", dir=cfg.work_dir)[1])
            args = [method, "--volume", str(vol), "--model", str(cfg.model), "--out", str(out), "--result", str(res),
                    "--tile", str(cfg.tile), "--overlap", str(cfg.overlap),
                    "--precision", cfg.precision, "--torch-factory", cfg.torch_factory]
            rc, peak, killed = spawner.run(args, cap)
            m.peak_rss_mb = round(peak, 1)
            if killed:
                m.status, m.note = "killed", f"crossed the {cap / 1024:.1f} GB cap; needs more than that"
            elif rc != 0:
                m.status, m.note = "failed", f"exit code {rc}"
            else:
                m.raw = json.loads(res.read_text())
                m.wall_s, m.infer_s = round(m.raw["wall_s"], 2), round(m.raw["infer_s"], 2)
                history[method].append((m.voxels, peak))
                outputs[method] = out
            res.unlink(missing_ok=True)
            log(f"{name:>14} {method:<9} {m.status:<7} peak {peak:8.0f} MB  wall {m.wall_s or float('nan'):7.1f} s")
            results.append(m)
        ref = outputs.get("naive") or outputs.get("crop")
        for m in results:
            if m.size == size and m.method in outputs and ref is not None and outputs[m.method] != ref:
                m.agreement = label_agreement(ref, outputs[m.method])
        if not cfg.keep_outputs:
            for p in outputs.values():
                p.unlink(missing_ok=True)
    spawner.close()
    return results, machine()


def markdown_table(results: list[Measurement]) -> str:
    """Method × size: peak RSS, reduction vs naive, wall time, throughput, label agreement with the reference
    (naive whole-volume inference, or crop stitching where naive could not run)."""
    naive = {m.size: m.peak_rss_mb for m in results if m.method == "naive" and m.status == "ok"}
    lines = ["| volume | method | peak RSS (MB) | vs naive | wall (s) | Mvox/s | same labels as |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for m in sorted(results, key=lambda r: (r.voxels, list(METHOD_NAMES).index(r.method))):
        size = "×".join(map(str, m.size)) if len(set(m.size)) > 1 else f"{m.size[0]}³"
        if m.status != "ok":
            lines.append(f"| {size} | {METHOD_NAMES[m.method]} | — | — | — | — | {m.status}: {m.note} |")
            continue
        red = f"{naive[m.size] / m.peak_rss_mb:.1f}×" if m.size in naive and m.method != "naive" else "—"
        ref = "naive" if m.size in naive else "crop"
        agree = f"{100 * m.agreement:.2f}% of {ref}" if m.agreement is not None else "—"
        lines.append(f"| {size} | {METHOD_NAMES[m.method]} | {m.peak_rss_mb:.0f} | {red} | {m.wall_s:.1f} | "
                     f"{m.mvox_s:.2f} | {agree} |")
    return "\n".join(lines)


def load_results(path: Path) -> tuple[list[Measurement], dict[str, Any]]:
    """Measurements and machine description back from a ``results.json``."""
    data = json.loads(Path(path).read_text())
    keep = {f for f in Measurement.__dataclass_fields__}
    results = [Measurement(**{k: (tuple(v) if k == "size" else v) for k, v in r.items() if k in keep})
               for r in data["results"]]
    return results, data["machine"]


def save_report(results: list[Measurement], info: dict[str, Any], cfg: BenchConfig, out_dir: Path) -> list[Path]:
    """Write ``results.md``, ``results.json`` and (with matplotlib) ``peak_rss.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    md = out_dir / "results.md"
    md.write_text(table + "\n")
    js = out_dir / "results.json"
    js.write_text(json.dumps({
        "machine": info,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "results": [dict(asdict(m), voxels=m.voxels, mvox_s=m.mvox_s) for m in results],
    }, indent=2, default=str))
    written = [md, js]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method in METHOD_NAMES:
        pts = sorted((m.voxels, m.peak_rss_mb) for m in results if m.method == method and m.status == "ok")
        if pts:
            ax.plot(*zip(*pts), marker="o", label=METHOD_NAMES[method])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("volume size (voxels)")
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title(f"Peak memory vs volume size ({info.get('cores')} cores, {info.get('ram_mb', 0) / 1024:.0f} GiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = out_dir / "peak_rss.png"
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return written + [png]
