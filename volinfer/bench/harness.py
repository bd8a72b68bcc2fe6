"""Benchmark harness: every configuration in a fresh child process, peak RSS and CPU time as the OS counts them for
that finished process (``wait4``'s ``ru_maxrss``, ``ru_utime + ru_stime``), runs that would exceed a memory cap
skipped before they start (predicted from smaller sizes) or killed if they cross it anyway. Everything a run writes
goes under the configuration's work directory; the report (:mod:`volinfer.bench.report`) goes where the caller says."""

from __future__ import annotations

import compileall
import json
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from volinfer.portable import cpu_model
from volinfer import portable
from volinfer.bench.volumes import make_volume

METHOD_NAMES = {
    "naive": "naive OpenVINO (whole volume)",
    "naive-torch": "naive PyTorch (whole volume)",
    "crop": "volinfer crop",
    "gaussian": "volinfer gaussian",
    "mean": "volinfer mean",
    "auto": "volinfer default (auto engine, tile, precision; exact)",
    "monai": "MONAI sliding_window_inference",
    "nnunet": "nnU-Net v2 sliding window",
    "infer-only": "OpenVINO inference alone (same tiles, no I/O)",
}
VOLINFER_METHODS = ("crop", "gaussian", "mean")
#: What volinfer is compared with: naive inference and the peers. Only these are skipped where their peak,
#: extrapolated from the sizes measured before, would pass the cap: volinfer's own runs plan within their own memory
#: budget (and refuse beyond it), and a peak measured at 512³ says nothing of 2048³'s (proportional extrapolation from
#: one size skipped a 2048³ run of 0.6 GB as 31 GB).
PEERS = ("naive", "naive-torch", "monai", "nnunet")
TORCH_METHODS = ("naive-torch", "monai", "nnunet")


@dataclass
class Measurement:
    method: str
    size: tuple[int, int, int]
    status: str  # ok, skipped, killed, failed
    peak_rss_mb: float | None = None
    wall_s: float | None = None  # the method's own work, after imports (model load/compile, read, infer, write)
    cpu_s: float | None = None  # user + system CPU time of that same span, all threads
    infer_s: float | None = None
    tiles: int | None = None
    process_wall_s: float | None = None  # the whole child process, interpreter start and imports included
    process_cpu_s: float | None = None
    note: str = ""
    agreement: float | None = None  # fraction of voxels whose label equals the reference method's
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def voxels(self) -> int:
        return int(np.prod(self.size))

    @property
    def mvox_s(self) -> float | None:
        return self.voxels / self.wall_s / 1e6 if self.wall_s and self.method != "infer-only" else None


def total_ram_mb() -> float:
    return portable.total_mb() or float("nan")


def machine() -> dict[str, Any]:
    """CPU, cores, RAM and library versions (of the packages the workers import), for the report."""
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count(), "ram_mb": round(total_ram_mb()),
                            "python": platform.python_version(), "platform": platform.platform()}
    from importlib.metadata import PackageNotFoundError, version

    for mod in ("openvino", "numpy", "nibabel", "torch", "monai", "nnunetv2"):
        try:
            info[mod] = version(mod)
        except PackageNotFoundError:
            info[mod] = None
    return info


class Spawner:
    """Starts workers from a tiny separate process (see :mod:`volinfer.bench.spawner`) so that each worker's peak
    RSS is its own and not inherited from this (possibly large) process. Workers run with ``cwd`` as their working
    directory and find this copy of volinfer through ``PYTHONPATH``."""

    def __init__(self, cwd: Path | None = None) -> None:
        script = Path(__file__).with_name("spawner.py")
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, cwd=cwd, env=env)

    def run_full(self, args: Sequence[str], cap_mb: float, timeout_s: float | None = None) -> dict[str, Any]:
        """Run ``python -m volinfer.bench.worker ARGS``; return the spawner's answer: rc, peak_mb, cpu_s, wall_s,
        killed (for memory or time), stderr_tail."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        argv = [sys.executable, "-m", "volinfer.bench.worker", *args]
        self.proc.stdin.write(json.dumps({"argv": argv, "cap_mb": cap_mb, "timeout_s": timeout_s}) + "\n")
        return json.loads(self.proc.stdout.readline())

    def run(self, args: Sequence[str], cap_mb: float, timeout_s: float | None = None) -> tuple[int, float, bool]:
        """As :meth:`run_full`; return (exit code, peak RSS MB, killed for memory/time)."""
        ans = self.run_full(args, cap_mb, timeout_s)
        if ans["rc"] != 0 and not ans["killed"]:
            sys.stderr.write(f"  child failed: {ans['stderr_tail'] or ans['rc']}\n")
        return ans["rc"], ans["peak_mb"], ans["killed"]

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
    overlap: str = "0.25"
    precision: str = "f32"
    device: str = "CPU"
    threads: int | None = None
    cap_fraction: float = 0.85
    torch_factory: str = "volinfer.bench.reference_unet:build_unet"
    infer_only_max_tiles: int = 48
    keep_outputs: bool = False
    command: str = ""
    note: str = ""  # conditions worth stating with the results (e.g. a shared machine)
    normalize: str = "none"  # the baselines' normalisation, matching the model's stored one: zscore or none


def _worker_args(cfg: BenchConfig, method: str, vol: Path | None, out: Path, res: Path, tiles: int) -> list[str]:
    args = [method, "--model", str(cfg.model.resolve()), "--out", str(out), "--result", str(res),
            "--tile", str(cfg.tile), "--overlap", str(cfg.overlap), "--precision", cfg.precision,
            "--device", cfg.device, "--torch-factory", cfg.torch_factory, "--tiles", str(tiles),
            "--normalize", cfg.normalize]
    if vol is not None:
        args += ["--volume", str(vol)]
    if cfg.threads:
        args += ["--threads", str(cfg.threads)]
    return args


def _measure(spawner: Spawner, cfg: BenchConfig, m: Measurement, vol: Path, out: Path, cap: float,
             tiles: int = 0) -> None:
    """Run one configuration and fill ``m`` from the OS's figures and the worker's own report."""
    res = Path(tempfile.mkstemp(suffix=".json", dir=cfg.work_dir)[1])
    try:
        ans = spawner.run_full(_worker_args(cfg, m.method, None if m.method == "infer-only" else vol, out, res, tiles),
                          cap)
        m.peak_rss_mb = round(ans["peak_mb"], 1)
        m.process_wall_s, m.process_cpu_s = round(ans["wall_s"], 2), round(ans["cpu_s"], 2)
        if ans["killed"]:
            m.status, m.note = "killed", f"crossed the {cap / 1024:.1f} GB cap; needs more than that"
        elif ans["rc"] != 0:
            m.status, m.note = "failed", f"exit code {ans['rc']}: {ans['stderr_tail']}"
        else:
            m.raw = json.loads(res.read_text())
            m.wall_s, m.cpu_s = round(m.raw["wall_s"], 3), round(m.raw["cpu_s"], 3)
            if m.method == "infer-only":  # the loop alone, without compiling: the floor the others are judged by
                m.wall_s, m.cpu_s = round(m.raw["infer_s"], 3), round(m.raw["infer_cpu_s"], 3)
            m.infer_s, m.tiles = round(m.raw["infer_s"], 3), m.raw.get("tiles")
    finally:
        res.unlink(missing_ok=True)


def _order(methods: Sequence[str]) -> list[str]:
    """Measure inference alone after volinfer's runs (it reuses their tile count)."""
    return [m for m in methods if m != "infer-only"] + [m for m in methods if m == "infer-only"]


def byte_compile() -> None:
    """Byte-compile volinfer's modules first, as installing a package does: a run from a source tree otherwise
    compiles its ~90 modules in every child process where bytecode is not written (PYTHONDONTWRITEBYTECODE, a
    read-only tree: 0.2-0.3 s of each whole-process wall), while the peers' installed packages start compiled."""
    compileall.compile_dir(str(Path(__file__).resolve().parents[1]), quiet=2)


def run_benchmark(cfg: BenchConfig, log: Callable[[str], None] = print,
                  progress: Any = None) -> tuple[list[Measurement], dict[str, Any]]:
    """Measure every method at every size (smallest first). ``progress``: an object with ``update()`` (tqdm),
    advanced once per run. Returns the measurements and the machine description."""
    cap = total_ram_mb() * cfg.cap_fraction
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    byte_compile()
    results: list[Measurement] = []
    history: dict[str, list[tuple[int, float]]] = {m: [] for m in cfg.methods}
    with Spawner(cwd=cfg.work_dir) as spawner:
        for size in sorted(cfg.sizes, key=lambda s: int(np.prod(s))):
            name = "x".join(map(str, size))
            vol = make_volume(cfg.work_dir / f"volume_{name}.nii", size).resolve()
            outputs: dict[str, Path] = {}
            for method in _order(cfg.methods):
                m = Measurement(method, size, "ok")
                need = predict_rss(history[method], m.voxels) if method in PEERS else None
                out = (cfg.work_dir / f"labels_{method}_{name}.nii").resolve()
                if need is not None and need > cap:
                    m.status, m.note = "skipped", f"would need ~{need / 1024:.1f} GB (cap {cap / 1024:.1f} GB)"
                else:
                    tiles = max([r.tiles or 0 for r in results if r.size == size and r.method in VOLINFER_METHODS]
                                or [16])
                    _measure(spawner, cfg, m, vol, out, cap, min(tiles, cfg.infer_only_max_tiles))
                if m.status == "ok":
                    history[method].append((m.voxels, m.peak_rss_mb or 0.0))
                    if method != "infer-only":
                        outputs[method] = out
                log(f"{name:>12} {method:<11} {m.status:<7} peak {m.peak_rss_mb or float('nan'):7.0f} MB  "
                    f"wall {m.wall_s or float('nan'):7.2f} s  cpu {m.cpu_s or float('nan'):7.2f} s {m.note}")
                results.append(m)
                if progress is not None:
                    progress.update()
            _agreements(results, size, outputs)
            if not cfg.keep_outputs:
                for p in outputs.values():
                    p.unlink(missing_ok=True)
    return results, machine()


def _agreements(results: list[Measurement], size: tuple[int, int, int], outputs: dict[str, Path]) -> None:
    """Label agreement of every run at ``size`` with naive OpenVINO (or crop where naive could not run)."""
    ref = outputs.get("naive") or outputs.get("crop")
    for m in results:
        if m.size == size and m.method in outputs and ref is not None and outputs[m.method] != ref:
            m.agreement = label_agreement(ref, outputs[m.method])
