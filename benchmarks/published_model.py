"""A real published 3D model, end to end: deepbet's brain-extraction network, converted and run by volinfer, compared
with the model's own whole-volume inference in PyTorch.

    pip install deepbet==1.0.2        # weights ship inside the wheel (data/models/model.pt): nothing downloads at run time
    python benchmarks/published_model.py                      # MNI152 T1 from volinfer's data, default configurations
    python benchmarks/published_model.py --volume t1.nii.gz --configs default,tile96 --work-dir /tmp/deepbet
    python benchmarks/published_model.py --resolution 0.5 --configs budget1g   # the whole head at 0.5 mm, 1 GB budget

The model: deepbet 1.0.2 (Fisch et al., Computers in Biology and Medicine 2024; MIT licence), a TorchScript LinkNet3d
(stride 32, InstanceNorm3d throughout, ends in Softmax over 2 channels: background, brain). deepbet's documented
pipeline (deepbet/bet.py, BrainExtraction.run_model) is kept as published: a small bounding-box network on a 128³
nearest-neighbour resampling of the whole volume, then the brain's box (+10% margin) resampled to 256³ ('nearest-exact'),
clipped to the whole volume's 0.5/99.5% quantiles, z-scored and mapped to mean 0.449 / std 0.226. The main network
runs on that 256³ volume. This script lets deepbet's own code do that preprocessing (the main network is replaced, only
while preprocessing, by a stub that records what deepbet would feed it) and writes it as a float32 NIfTI, so volinfer
runs with `--normalize none`. (volinfer's `--normalize percentile:0.5:99.5` clips and z-scores, but computes quantiles
on the volume it is given and has no final affine step, so it cannot express deepbet's normalisation exactly.)

Measured, each in its own fresh process under `/usr/bin/time -v` (so its peak RSS is its own, not this script's):
- the reference: the TorchScript model in PyTorch on the whole 256³ input (256 is a multiple of 32: no padding),
  labels = argmax over the 2 channels (deepbet thresholds channel 1 at 0.5: the same thing for a 2-class softmax);
- `volinfer convert model.pt -o deepbet.xml` (once);
- `volinfer run` with default settings and with forced tiles, each compared with the reference: Dice of the brain
  label, the share of equal voxels, and volinfer's own `exact` verdict and reasons from `--json`.

Writes benchmarks/results/published_model.{json,md} (published_model_0.5mm.* with --resolution 0.5; or --results-dir). Not a test: it needs the deepbet wheel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VOLUME = Path("/work/shared/data/mni152_t1_1mm.nii.gz")  # MNI152 T1 1 mm (see its NOTICE.md)

# IRs: name -> extra `volinfer convert` arguments. "published": the model as published, converted with defaults.
# "whole": what a user who read the first conversion's notes can do: store one 256³ tile (the size deepbet runs at).
IRS: dict[str, list[str]] = {
    "published": [],
    "whole": ["--tile", "256"],
}
# runs: name -> (IR, extra `volinfer run` arguments)
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "default": ("published", []),
    "tile96": ("published", ["--tile", "96"]),
    "tile96-tilestats": ("published", ["--tile", "96", "--norm-stats", "tile"]),
    "tile128": ("published", ["--tile", "128"]),
    "tile96-gaussian": ("published", ["--tile", "96", "--stitch", "gaussian"]),
    "tile256": ("published", ["--tile", "256"]),
    "whole-default": ("whole", []),
    # the same network where one tile over the volume does not fit the budget (use with --resolution 0.5)
    "budget1g": ("published", ["--max-memory", "1G"]),
}
DEFAULT_CONFIGS = ",".join(CONFIGS)


# ---------------------------------------------------------------------------------------------------------------------
# deepbet: the published model and its own preprocessing


def deepbet_model_path() -> Path:
    """The TorchScript weights shipped in the deepbet wheel; a one-line exit when deepbet is not installed."""
    try:
        from deepbet.utils import DATA_PATH  # type: ignore[import-not-found]
    except ImportError as e:
        sys.exit(f"deepbet is not installed ({e}); install it with `pip install deepbet==1.0.2` (weights ship in the wheel)")
    path = Path(DATA_PATH) / "models" / "model.pt"
    if not path.is_file():
        sys.exit(f"deepbet is installed but its weights are missing: {path}")
    return path


def deepbet_input(volume: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The exact tensor deepbet 1.0.2 feeds its main network for ``volume`` (256³ float32), an approximate affine for
    it, and how it was made. deepbet's own run_model does the work; its main model is replaced by a recording stub."""
    import nibabel as nib
    import torch
    from deepbet import BrainExtraction  # type: ignore[import-not-found]

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))
            self.seen: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen = x.detach().clone()
            return torch.zeros((1, 2, *x.shape[2:]), dtype=x.dtype)

    bet = BrainExtraction(no_gpu=True)
    bet.model = Recorder()
    img = nib.load(str(volume))
    canon = nib.as_closest_canonical(img)
    x = canon.get_fdata(dtype=np.float32)
    x = x[..., 0] if x.ndim == 4 else x
    bet.run_model(x.copy())
    seen = bet.model.seen
    assert seen is not None and tuple(seen.shape) == (1, 1, 256, 256, 256), "deepbet's pipeline changed"
    box = [(s.start, s.stop) for s in bet.bbox]
    scale = np.array([(b - a) / 256.0 for a, b in box])
    to_src = np.eye(4)  # voxel i of the 256³ volume comes from source voxel floor((i + 0.5) * scale) + start
    to_src[:3, :3] = np.diag(scale)
    to_src[:3, 3] = [a + 0.5 * s - 0.5 for (a, _), s in zip(box, scale)]
    info = {"source_shape": list(x.shape), "bbox": box, "resampled_to": [256, 256, 256],
            "input_mean": float(seen.mean()), "input_std": float(seen.std())}
    return seen[0, 0].numpy().astype(np.float32), canon.affine @ to_src, info


def fine_input(volume: Path, resolution: float) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The whole head resampled to ``resolution`` mm (trilinear) and normalised as deepbet normalises (clip to the
    0.5/99.5% quantiles, z-score, map to mean 0.449 / std 0.226): a volume where one tile over the padded volume
    no longer fits a small budget. No bounding box: the network sees the whole field of view."""
    import nibabel as nib
    from scipy import ndimage

    canon = nib.as_closest_canonical(nib.load(str(volume)))
    x = canon.get_fdata(dtype=np.float32)
    x = np.nan_to_num(x[..., 0] if x.ndim == 4 else x)
    zooms = np.array(canon.header.get_zooms()[:3], dtype=float)
    factor = zooms / resolution
    x = ndimage.zoom(x, factor, order=1).astype(np.float32)
    low, high = np.quantile(x, [0.005, 0.995])
    x = np.clip((x - low) / max(high - low, 1e-12), 0.0, 1.0)
    x = (0.226 * (x - x.mean()) / x.std() + 0.449).astype(np.float32)
    affine = canon.affine @ np.diag([*(1.0 / factor), 1.0])
    info = {"source_shape": list(canon.shape[:3]), "bbox": "none (whole field of view)",
            "resampled_to": list(x.shape), "resolution_mm": resolution,
            "input_mean": float(x.mean()), "input_std": float(x.std())}
    return x, affine, info


# ---------------------------------------------------------------------------------------------------------------------
# the reference: the model's own whole-volume inference (run in a fresh child)


def reference_child(model: Path, inp: Path, out: Path) -> None:
    """PyTorch on the whole volume: writes argmax labels (uint8 NIfTI) and prints the output's checks as JSON."""
    import nibabel as nib
    import torch

    img = nib.load(str(inp))
    x = np.asarray(img.dataobj, dtype=np.float32)
    m = 32
    padded = [-(-n // m) * m for n in x.shape]
    xp = np.zeros(padded, dtype=np.float32)
    xp[tuple(slice(0, n) for n in x.shape)] = x
    net = torch.jit.load(str(model), map_location="cpu").eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        y = net(torch.from_numpy(xp)[None, None])[0]
    infer_s = time.perf_counter() - t0
    y = y[(slice(None), *(slice(0, n) for n in x.shape))]
    labels = y.argmax(0).numpy().astype(np.uint8)
    nib.save(nib.Nifti1Image(labels, img.affine), str(out))
    sums = y.sum(0)
    print(json.dumps({"infer_s": infer_s, "padded": padded, "channel_sum_min": float(sums.min()),
                      "channel_sum_max": float(sums.max()), "brain_voxels": int(labels.sum()),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


# ---------------------------------------------------------------------------------------------------------------------
# measuring children


def timed(argv: list[str], work: Path, name: str, timeout_s: float) -> dict[str, Any]:
    """Run ``argv`` under /usr/bin/time -v (its own peak RSS, not inherited from this process); stdout, rc, peak MB,
    wall seconds."""
    tfile = work / f"time_{name}.txt"
    t0 = time.perf_counter()
    try:
        p = subprocess.run(["/usr/bin/time", "-v", "-o", str(tfile), *argv], capture_output=True, text=True,
                           timeout=timeout_s, env=os.environ.copy())
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = 124, (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    wall = time.perf_counter() - t0
    text = tfile.read_text() if tfile.exists() else ""
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    el = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    return {"rc": rc, "stdout": out, "stderr_tail": "\n".join(err.strip().splitlines()[-5:]),
            "peak_rss_mb": int(peak.group(1)) / 1024.0 if peak else None,
            "wall_s": _clock(el.group(1)) if el else wall}


def _clock(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def _json_tail(text: str) -> Any:
    """The JSON object volinfer printed (the last top-level one in stdout)."""
    start = text.find("{")
    return json.loads(text[start:]) if start >= 0 else None


def label_scores(labels_path: Path, reference: np.ndarray) -> dict[str, float]:
    """Dice of the brain label and the share of voxels whose label equals the reference's."""
    import nibabel as nib

    y = np.asarray(nib.load(str(labels_path)).dataobj)
    y = y[..., 0] if y.ndim == 4 else y
    a, b = y > 0, reference > 0
    inter = np.logical_and(a, b).sum()
    return {"dice": float(2 * inter / max(1, a.sum() + b.sum())), "equal": float((y == reference).mean()),
            "brain_voxels": int(a.sum())}


# ---------------------------------------------------------------------------------------------------------------------
# the benchmark


def py() -> list[str]:
    return [sys.executable]


def convert(model: Path, name: str, work: Path, timeout_s: float) -> dict[str, Any]:
    """`volinfer convert` on the model exactly as published (TorchScript .pt), with the IR's extra arguments."""
    xml = work / f"deepbet_{name}.xml"
    argv = [*py(), "-m", "volinfer", "convert", str(model), "-o", str(xml), "--json", "--overwrite", *IRS[name]]
    res = timed(argv, work, f"convert_{name}", timeout_s)
    res.update({"name": name, "args": IRS[name], "xml": str(xml), "command": argv[2:]})
    if res["rc"] != 0:
        res["error"] = res.pop("stderr_tail")
        print(f"      volinfer convert failed (rc {res['rc']}): {res['error']}", flush=True)
        return res
    res["result"] = _json_tail(res.pop("stdout"))
    return res


def run_config(name: str, inp: Path, xml: str, work: Path, reference: np.ndarray, timeout_s: float
               ) -> dict[str, Any]:
    """One `volinfer run` in a fresh child; its report, the measured peak/time, and agreement with the reference."""
    ir, extra = CONFIGS[name]
    out = work / f"labels_{name}.nii"
    argv = [*py(), "-m", "volinfer", "run", str(inp), "-m", xml, "-o", str(out), "--json", "--overwrite", *extra]
    res = timed(argv, work, name, timeout_s)
    row: dict[str, Any] = {"name": name, "ir": ir, "args": extra, "command": argv[2:], "rc": res["rc"],
                           "peak_rss_mb": res["peak_rss_mb"], "wall_s": res["wall_s"]}
    if res["rc"] != 0:
        row["error"] = res["stderr_tail"]
        return row
    rep = _json_tail(res["stdout"]) or {}
    row["report"] = rep
    row.update({k: rep.get(k) for k in ("exact", "not_exact", "input_passes", "tile", "tiles", "stitch")})
    row["reported_peak_rss_mb"], row["reported_wall_s"] = rep.get("peak_rss_mb"), rep.get("wall_s")
    row.update(label_scores(out, reference))
    return row


def _cmd(argv: list[str], subs: dict[str, str]) -> str:
    text = " ".join(shlex.quote(a) for a in argv)
    for k, v in subs.items():
        text = text.replace(k, v)
    return text


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, (list, tuple)):
        return f"{v[0]}³" if len(v) == 3 and len(set(v)) == 1 else "×".join(str(t) for t in v)
    return format(v, spec)


def markdown(res: dict[str, Any]) -> str:
    """The results table and the commands that reproduce it."""
    ref = res["reference"]
    shape = res["preprocess"]["resampled_to"]
    lines = [
        f"# A published model, end to end: deepbet {res['deepbet_version']} on {res['volume_name']}",
        "",
        f"Model: deepbet's LinkNet3d (TorchScript, {res['model_params'] / 1e6:.1f} M parameters, stride 32, 34 "
        f"InstanceNorm3d, ends in Softmax); input: deepbet's own preprocessing of `{res['volume_name']}` (head box "
        f"{res['preprocess']['bbox']} resampled to {_fmt(shape)}, normalised). Reference: PyTorch "
        f"{ref['info'].get('torch')} on the whole {_fmt(shape)} volume. Each row is a fresh process; peak RSS and wall time from `/usr/bin/time -v`. "
        f"volinfer at {res.get('volinfer_commit')}. Machine: {res['machine']}, shared with other jobs while measured: times are indicative. \"exact\" is "
        "volinfer's own verdict (`--json`); Dice is of the brain label against the reference.",
        "",
        "| IR | run | tile | tiles | stitch | input passes | exact (volinfer says) | Dice vs PyTorch | "
        "equal voxels | peak RSS (MB) | wall (s) |",
        "|---|---|---|---:|---|---:|---|---:|---:|---:|---:|",
        f"| — | PyTorch, whole volume (reference) | {_fmt(shape)} | 1 | — | — | — | 1 | 100% | {ref['peak_rss_mb']:.0f} | "
        f"{ref['wall_s']:.1f} |",
    ]
    for r in res["runs"]:
        label = "`run " + (" ".join(r["args"]) or "(defaults)") + "`"
        if r["rc"] != 0:
            lines.append(f"| {r['ir']} | {label} | — | — | — | — | failed: {r.get('error', '')[:120]} | — | — | "
                         f"{_fmt(r['peak_rss_mb'], '.0f')} | {_fmt(r['wall_s'], '.1f')} |")
            continue
        lines.append(f"| {r['ir']} | {label} | {_fmt(r.get('tile'))} | {_fmt(r.get('tiles'))} | "
                     f"{_fmt(r.get('stitch'))} | {_fmt(r.get('input_passes'))} | {_fmt(r.get('exact'))} | "
                     f"{r['dice']:.4f} | {100 * r['equal']:.3f}% | {_fmt(r['peak_rss_mb'], '.0f')} | "
                     f"{_fmt(r['wall_s'], '.1f')} |")
    if res.get("note"):
        lines += ["", f"Note: {res['note']}."]
    lines += ["", "volinfer's reasons when it says a run is not exact:", ""]
    for r in res["runs"]:
        if r.get("not_exact"):
            lines.append(f"- {r['ir']} `{' '.join(r['args']) or '(defaults)'}`: " + "; ".join(r["not_exact"]))
    for c in res["converts"]:
        lines += ["", f"IR `{c['name']}`: `volinfer convert {' '.join(c['args']) or '(defaults)'}` "
                      f"({c['wall_s']:.0f} s, {_fmt(c['peak_rss_mb'], '.0f')} MB)"]
        if c["rc"] != 0:
            lines.append(f"failed: {c.get('error')}")
            continue
        par, st = c["result"].get("parity", {}), c["result"]["settings"]
        lines.append(f"parity {_fmt(par.get('max_abs'), '.4f')} max-abs against {par.get('reference')} on a random "
                     f"{_fmt(par.get('shape'))} input; stored: " + ", ".join(
                         f"{k}={json.dumps(v)}" for k, v in st.items() if k in (
                             "tile", "size_multiple", "stitch", "receptive_field", "receptive_field_bounded",
                             "instance_norm", "activation", "normalization")) + ". Notes:")
        lines += [f"- {n}" for n in c["result"].get("notes", [])]
    lines += ["", "Reproduce:", "", "```", *res["commands"], "```", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volume", type=Path, default=None, help="T1 MRI NIfTI (default: the MNI152 T1 1 mm template)")
    ap.add_argument("--work-dir", type=Path, default=None, help="where the IR, input and outputs go (default: a temp dir)")
    ap.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"comma-separated subset of {', '.join(CONFIGS)}")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per child process, seconds")
    ap.add_argument("--resolution", type=float, default=None,
                    help="mm: feed the whole head resampled to this spacing instead of deepbet's 256³ box "
                         "(e.g. 0.5, where one tile over the volume does not fit a 1 GB budget)")
    ap.add_argument("--render", action="store_true", help="only rewrite the .md from the results .json")
    ap.add_argument("--reference-child", nargs=3, metavar=("MODEL", "INPUT", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.reference_child:
        reference_child(*(Path(p) for p in a.reference_child))
        return
    stem = "published_model" + (f"_{a.resolution:g}mm" if a.resolution else "")
    if a.render:
        res = json.loads((a.results_dir / f"{stem}.json").read_text())
        (a.results_dir / f"{stem}.md").write_text(markdown(res))
        print(markdown(res))
        return
    volume = a.volume or DEFAULT_VOLUME
    if not volume.is_file():
        sys.exit(f"no volume at {volume}: give a T1 MRI NIfTI with --volume")
    names = [n for n in a.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="volinfer-published-"))
    work.mkdir(parents=True, exist_ok=True)
    res = benchmark(volume, work, names, a.timeout, a.resolution)
    a.results_dir.mkdir(parents=True, exist_ok=True)
    (a.results_dir / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (a.results_dir / f"{stem}.md").write_text(markdown(res))
    print(markdown(res))


def benchmark(volume: Path, work: Path, names: list[str], timeout_s: float, resolution: float | None = None
              ) -> dict[str, Any]:
    """Convert, preprocess, reference, then every configuration; everything the report needs."""
    import importlib.metadata as md

    import nibabel as nib
    import torch

    model = deepbet_model_path()
    irs = list(dict.fromkeys(CONFIGS[n][0] for n in names))
    converts = {}
    for ir in irs:
        print(f"[1/4] volinfer convert {model} {' '.join(IRS[ir])}", flush=True)
        converts[ir] = convert(model, ir, work, timeout_s)
        if converts[ir]["rc"] == 0:
            print(f"      {converts[ir]['wall_s']:.1f} s; notes: {converts[ir]['result'].get('notes')}", flush=True)
    print(f"[2/4] deepbet's preprocessing of {volume}", flush=True)
    x, affine, prep = deepbet_input(volume) if resolution is None else fine_input(volume, resolution)
    inp = work / "deepbet_input.nii"
    nib.save(nib.Nifti1Image(x, affine), str(inp))
    params = sum(p.numel() for p in torch.jit.load(str(model), map_location="cpu").parameters())
    print("[3/4] reference: PyTorch on the whole volume", flush=True)
    ref_out = work / "labels_reference.nii"
    ref_argv = [*py(), str(Path(__file__).resolve()), "--reference-child", str(model), str(inp), str(ref_out)]
    ref = timed(ref_argv, work, "reference", timeout_s)
    if ref["rc"] != 0:
        sys.exit(f"reference run failed: {ref['stderr_tail']}")
    ref["info"] = _json_tail(ref.pop("stdout"))
    reference = np.asarray(nib.load(str(ref_out)).dataobj)
    print(f"      {ref['peak_rss_mb']:.0f} MB, {ref['wall_s']:.1f} s, {ref['info']}", flush=True)
    runs = []
    for i, name in enumerate(names):
        ir, extra = CONFIGS[name]
        print(f"[4/4] ({i + 1}/{len(names)}) IR {ir}: volinfer run {' '.join(extra) or '(defaults)'}", flush=True)
        if converts[ir]["rc"] != 0:
            runs.append({"name": name, "ir": ir, "args": extra, "command": [], "rc": -1, "peak_rss_mb": None,
                         "wall_s": None, "error": f"IR {ir} was not converted"})
            continue
        row = run_config(name, inp, converts[ir]["xml"], work, reference, timeout_s)
        runs.append(row)
        print("      " + json.dumps({k: row.get(k) for k in ("rc", "tile", "tiles", "stitch", "exact", "not_exact",
                                                            "dice", "equal", "peak_rss_mb", "wall_s", "error")}),
              flush=True)
    subs = {str(work): "$WORK", str(model): "$DEEPBET_PT"}
    commands = ["pip install deepbet==1.0.2   # weights inside the wheel", "WORK=$(mktemp -d)",
                "python benchmarks/published_model.py --volume " + shlex.quote(str(volume)) + " --work-dir $WORK"
                + (f" --resolution {resolution}" if resolution else "") + f" --configs {','.join(names)}"
                "   # everything below",
                "# by hand: DEEPBET_PT=$(python -c \"import deepbet.utils as u; print(u.DATA_PATH + '/models/model.pt')\")",
                "# $WORK/deepbet_input.nii is deepbet's own preprocessing, written by the script",
                *[_cmd(c["command"], subs) for c in converts.values()],
                *[_cmd(r["command"], subs) for r in runs if r["command"]]]
    return {"volume": str(volume), "volume_name": volume.name, "work_dir": str(work), "model": str(model),
            "deepbet_version": md.version("deepbet"), "model_params": params, "preprocess": prep,
            "converts": list(converts.values()), "reference": ref, "runs": runs, "commands": commands,
            "machine": _machine(), "volinfer_commit": _commit(), "versions": {m: _version(m) for m in ("torch", "openvino", "nibabel", "numpy")}}


def _commit() -> str | None:
    """The volinfer checkout's commit, for the record."""
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(mod: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(mod)
    except md.PackageNotFoundError:
        return None


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), OpenVINO {_version('openvino')}, PyTorch {_version('torch')}"


if __name__ == "__main__":
    main()
