"""The built-in demo: a tiny hand-weighted 3D "blob segmenter" shipped as IR, and a synthetic volume it segments.

The model is a two-level U-Net-shaped graph with fixed weights (no training): local mean (3³ conv) plus a coarse
context path (average-pool 2, 3³ mean, nearest upsample), concatenated and mapped by a 1×1×1 conv to background/blob
logits. Rebuild the shipped IR with ``python -m volinfer.demo --rebuild``.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import openvino as ov
import openvino.opset13 as ops

from volinfer.io.writer import save_image
from volinfer.model.settings import ModelSettings
from volinfer.api import predict

DEMO_MODEL = "demo_blobs.xml"
THRESHOLD = 0.45  # normalised intensity between background (0) and blobs (0.9)


def _mean_conv(x: ov.Node, channels: int) -> ov.Node:
    w = np.zeros((channels, channels, 3, 3, 3), np.float32)
    for c in range(channels):
        w[c, c] = 1.0 / 27.0
    return ops.convolution(x, ops.constant(w), [1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1])


def build_demo_model() -> ov.Model:
    """The demo graph with its run settings in rt_info (tile 64, size multiple 2, scale normalisation)."""
    image = ops.parameter([1, 1, -1, -1, -1], np.float32, name="image")
    local = _mean_conv(image, 1)
    coarse = ops.avg_pool(image, [2, 2, 2], [0, 0, 0], [0, 0, 0], [2, 2, 2], exclude_pad=True)
    coarse = _mean_conv(coarse, 1)
    up = ops.interpolate(coarse, ops.constant(np.array([2.0, 2.0, 2.0], np.float32)), "nearest", "scales",
                         axes=ops.constant(np.array([2, 3, 4], np.int64)),
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    feats = ops.concat([local, up], 1)
    gain = 8.0
    w = np.array([[-0.5, -0.5], [0.5, 0.5]], np.float32).reshape(2, 2, 1, 1, 1) * gain
    logits = ops.convolution(feats, ops.constant(w), [1, 1, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1])
    logits = ops.add(logits, ops.constant(np.array([THRESHOLD, -THRESHOLD], np.float32).reshape(1, 2, 1, 1, 1) * gain))
    logits.output(0).get_tensor().set_names({"logits"})
    model = ov.Model([logits], [image], "volinfer_demo_blobs")
    ov.layout_helpers.set_layout(model.input(0), ov.Layout("NCDHW"))
    ModelSettings(
        layout="NCDHW", in_channels=1, channel_names=["intensity"], tile=[64, 64, 64], size_multiple=2,
        overlap=8, stitch="crop", receptive_field=[3, 3, 3],
        normalization={"kind": "scale", "scale": 0.01, "shift": -1.0},
        activation="softmax", labels=["background", "blob"], spacing=[1.0, 1.0, 1.0],
        source_framework="openvino-opset", source_file="volinfer/demo.py",
    ).to_model(model)
    return model


def demo_model_path() -> Path:
    """Path of the shipped demo IR."""
    return Path(str(resources.files("volinfer") / "data" / DEMO_MODEL))


def make_demo_volume(shape: tuple[int, int, int] = (160, 144, 112), blobs: int = 24, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """An int16 volume of noisy background (~100) with bright spheres (~190), and the spheres' true mask."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(100.0, 25.0, size=shape).astype(np.float32)
    truth = np.zeros(shape, dtype=np.uint8)
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    for _ in range(blobs):
        r = min(rng.uniform(5, 12), min(shape) / 2)  # small demo volumes get smaller blobs
        c = [rng.uniform(r, n - r) for n in shape]
        inside = sum((g - ci) ** 2 for g, ci in zip(grid, c)) <= r * r
        truth[inside] = 1
    vol[truth == 1] += 90.0
    return np.clip(vol, 0, 32767).astype(np.int16), truth


def write_demo_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> tuple[Path, Path]:
    """Write the demo volume and its ground truth as NIfTI (1 mm, RAS) beside each other, each through the checks
    every output passes (a link there is replaced, never written through: :func:`volinfer.io.writer.save_image`)."""
    vol, truth = make_demo_volume(shape, seed=seed)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    truth_path = path.with_name(path.name.replace(".nii", "_truth.nii"))
    save_image(nib.Nifti1Image(vol, affine), path)
    save_image(nib.Nifti1Image(truth, affine), truth_path)
    return path, truth_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rebuild", action="store_true", help="write the shipped IR into volinfer/data/")
    args = ap.parse_args()
    if args.rebuild:
        out = Path(__file__).parent / "data" / DEMO_MODEL
        out.parent.mkdir(exist_ok=True)
        ov.save_model(build_demo_model(), str(out), compress_to_fp16=False)
        print(out)


if __name__ == "__main__":
    main()


def run_demo(out_dir: Path, shape: tuple[int, int, int], *, device: str = "CPU", precision: str = "auto",
             threads: int | None = None, progress: bool = False) -> Any:
    """Write the demo volume and its ground truth into ``out_dir``, segment it with the shipped model, and return
    the run report with the Dice score against the ground truth (``report.extra["dice"]``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vol_path, truth_path = write_demo_volume(out_dir / "demo_volume.nii.gz", shape)
    seg_path = out_dir / "demo_labels.nii.gz"
    report = predict(vol_path, demo_model_path(), seg_path, overwrite=True, progress=progress, device=device,
                     precision=precision, threads=threads)
    seg = np.asarray(nib.load(str(seg_path)).dataobj)
    truth = np.asarray(nib.load(str(truth_path)).dataobj)
    dice = 2.0 * float((seg & truth).sum()) / max(1.0, float(seg.sum() + truth.sum()))
    report.extra["dice"] = f"{dice:.3f} against the generated ground truth ({truth_path.name})"
    report.extra["input"] = str(vol_path)
    return report
