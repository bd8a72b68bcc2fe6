"""One benchmark configuration, run in its own fresh process (the parent reads this process's peak RSS from the OS).

    python -m volinfer.bench.worker METHOD --volume v.nii --model m.xml --out labels.nii --result r.json [...]

Methods:
  naive             whole volume in RAM, model compiled at the whole (padded) shape, one inference
  crop / gaussian   volinfer's streaming engine
  monai             MONAI sliding_window_inference with the source PyTorch model (same tile, overlap, gaussian)
  alloc             allocate and touch --mb megabytes (calibrates the harness's peak-RSS measurement)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _save_labels(labels: np.ndarray, reference: Path, out: Path) -> None:
    import nibabel as nib

    ref = nib.load(str(reference))
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), ref.affine, ref.header), str(out))


def run_naive(a: argparse.Namespace) -> dict:
    import nibabel as nib
    import openvino as ov

    from volinfer.geometry import padded_size

    from volinfer.settings import ModelSettings

    t0 = time.perf_counter()
    vol = np.asarray(nib.load(a.volume).dataobj, dtype=np.float32)
    shape = vol.shape
    model = ov.Core().read_model(a.model)
    multiple = ModelSettings.from_model(model).size_multiple or 1
    # the same padded extent the tiled engine uses, so that crop stitching can be compared voxel for voxel
    padded = [padded_size(n, a.tile, multiple) for n in shape]
    x = np.zeros((1, 1, *padded), np.float32)
    x[0, 0, : shape[0], : shape[1], : shape[2]] = vol
    del vol
    model.reshape({0: x.shape})
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": a.precision})
    t1 = time.perf_counter()
    out = compiled(x)[0]
    infer = time.perf_counter() - t1
    labels = out[0].argmax(0)[: shape[0], : shape[1], : shape[2]]
    _save_labels(labels, Path(a.volume), Path(a.out))
    return {"wall_s": time.perf_counter() - t0, "infer_s": infer}


def run_volinfer(a: argparse.Namespace) -> dict:
    from volinfer import predict

    rep = predict(a.volume, a.model, a.out, tile=a.tile, stitch=a.method, overlap=a.overlap, precision=a.precision,
                  overwrite=True, progress=False)
    return {"wall_s": rep.wall_s, "infer_s": rep.infer_busy_s, "tiles": rep.tiles,
            "peak_rss_self_mb": rep.peak_rss_mb}


def run_monai(a: argparse.Namespace) -> dict:
    import nibabel as nib
    import torch
    from monai.inferers import sliding_window_inference

    from converters.sources import _load_factory

    t0 = time.perf_counter()
    net = _load_factory(a.torch_factory)().eval()
    vol = torch.from_numpy(np.asarray(nib.load(a.volume).dataobj, dtype=np.float32))[None, None]
    t1 = time.perf_counter()
    with torch.no_grad():
        out = sliding_window_inference(vol, (a.tile,) * 3, 1, net, overlap=a.overlap, mode="gaussian")
    infer = time.perf_counter() - t1
    labels = out[0].argmax(0).numpy()
    del out
    _save_labels(labels, Path(a.volume), Path(a.out))
    return {"wall_s": time.perf_counter() - t0, "infer_s": infer}


def run_alloc(a: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    block = np.ones(int(a.mb * 2**20), dtype=np.uint8)  # ones: every page touched
    return {"wall_s": time.perf_counter() - t0, "infer_s": 0.0, "checksum": int(block[:: 4096].sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=["naive", "crop", "gaussian", "mean", "monai", "alloc"])
    ap.add_argument("--volume")
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--result", required=True)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--precision", default="f32")
    ap.add_argument("--torch-factory", default="volinfer.bench.reference_unet:build_unet")
    ap.add_argument("--mb", type=float, default=0)
    a = ap.parse_args()
    fn = {"naive": run_naive, "crop": run_volinfer, "gaussian": run_volinfer, "mean": run_volinfer,
          "monai": run_monai, "alloc": run_alloc}[a.method]
    Path(a.result).write_text(json.dumps(fn(a)))


if __name__ == "__main__":
    main()
