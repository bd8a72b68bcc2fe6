"""One benchmark configuration, run in its own fresh process (the parent reads this process's peak RSS and CPU time
from the OS).

    python -m volinfer.bench.worker METHOD --volume v.nii --model m.xml --out labels.nii --result r.json [...]

Methods (every baseline written as a competent user would write it: one copy of the data, labels as uint8):
  naive             OpenVINO, the model compiled at the whole (padded) volume shape, one inference, output read in
                    place, argmax per slab straight into uint8
  naive-torch       the source PyTorch network on the whole (padded) volume under torch.no_grad, same argmax
  crop / gaussian / mean
  auto              volinfer with no options: tile planned for an exact run, --precision auto
                    volinfer's streaming engine
  monai             MONAI's documented ``sliding_window_inference`` (same tile, overlap, gaussian blending)
  nnunet            nnU-Net v2's own sliding-window predictor (``nnUNetPredictor.predict_sliding_window_return_logits``)
                    on the same PyTorch network, same tile and step, gaussian, no mirroring
  infer-only        the same compiled tile model as volinfer's, alone: an AsyncInferQueue loop on random tiles (no
                    reading, stitching or writing) — the floor that volinfer's end-to-end throughput is judged against
  alloc             allocate and touch --mb megabytes, then spin --burn seconds (calibrates the harness)

Every baseline normalises its input as the model's stored normalisation says (``--normalize zscore``: mean and std
of the whole volume, the way each tool's users write it: naive OpenVINO and PyTorch in place on their float32 array,
MONAI with ``NormalizeIntensity``, nnU-Net with its ``ZScoreNormalization``); volinfer's methods apply the stored one.

Every method times its own work (after imports: model loading/compilation, reading, normalisation, inference, argmax,
writing) and reports the CPU time (user + system, all threads) of that same span.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from volinfer.options import parse_overlap
from volinfer.model.settings import ModelSettings
from converters.sources import load_factory
from volinfer.model.tile_model import read_model
from volinfer import predict
from volinfer.portable import lean_allocator
from volinfer.model.tile_model import CompileOptions, TileModel


def _save_labels(labels: np.ndarray, reference: str, out: str) -> None:
    """Write uint8 labels with the input's affine (a fresh uint8 header: no conversion copy on save)."""
    import nibabel as nib

    img = nib.Nifti1Image(labels, nib.load(reference).affine)
    img.set_data_dtype(np.uint8)
    if os.path.lexists(out):
        os.unlink(out)  # a link there is replaced, never written through
    nib.save(img, out)


def argmax_uint8(scores: Any, shape: tuple[int, int, int], slab: int = 8) -> np.ndarray:
    """Argmax over the channel axis of (C, X', Y', Z') scores (numpy or torch), cropped to ``shape``, computed a few
    x-planes at a time straight into uint8 — never a whole-volume int64 index array."""
    labels = np.empty(shape, np.uint8)
    for x0 in range(0, shape[0], slab):
        x1 = min(shape[0], x0 + slab)
        part = scores[:, x0:x1, : shape[1], : shape[2]].argmax(0)
        labels[x0:x1] = part.numpy() if hasattr(part, "numpy") else part
    return labels


def _padded_input(a: argparse.Namespace, multiple: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The volume as float32 (1, 1, X', Y', Z'), padded with zeros on the high side to the next multiple of the
    model's size multiple (the least the network accepts, and the extent volinfer's engine pads to); one allocation
    of the padded size."""
    import nibabel as nib

    img = nib.load(a.volume)
    shape = tuple(int(n) for n in img.shape[:3])
    padded = [-(-n // multiple) * multiple for n in shape]
    x = np.zeros((1, 1, *padded), np.float32)
    x[0, 0, : shape[0], : shape[1], : shape[2]] = np.asanyarray(img.dataobj)
    return x, shape  # type: ignore[return-value]


def zscore_inplace(v: np.ndarray) -> None:
    """Z-score ``v`` (float32, any strides) in place with its own mean and (population) std, the sums accumulated in
    float64 one x-plane at a time (no whole-volume temporary); a constant volume is only centred."""
    s1, s2 = 0.0, 0.0
    for plane in v:
        p = plane.astype(np.float64).ravel()
        s1 += float(p.sum())
        s2 += float(p @ p)
    mean = s1 / v.size
    std = max(s2 / v.size - mean * mean, 0.0) ** 0.5 or 1.0
    v -= np.float32(mean)
    v /= np.float32(std)


def _ov_config(a: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": a.precision}
    if a.threads:
        cfg["INFERENCE_NUM_THREADS"] = a.threads
    return cfg


def run_naive(a: argparse.Namespace) -> dict:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(a.model)
    x, shape = _padded_input(a, ModelSettings.from_model(model).size_multiple or 1)
    if a.normalize == "zscore":  # the volume, not the zero padding the network needs around it
        zscore_inplace(x[0, 0, : shape[0], : shape[1], : shape[2]])
    model.reshape({0: x.shape})
    request = core.compile_model(model, a.device, _ov_config(a)).create_infer_request()
    t1 = time.perf_counter()
    request.infer({0: x}, share_inputs=True, share_outputs=True)
    infer = time.perf_counter() - t1
    scores = request.get_output_tensor(0).data[0]  # a view of the request's output, no copy
    _save_labels(argmax_uint8(scores, shape), a.volume, a.out)
    return {"infer_s": infer}


def _torch_net(a: argparse.Namespace) -> Any:
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    return load_factory(a.torch_factory)().eval()


def run_naive_torch(a: argparse.Namespace) -> dict:
    import torch

    multiple = a.multiple or ModelSettings.from_model(read_model(a.model)).size_multiple or 1
    net = _torch_net(a)
    x, shape = _padded_input(a, multiple)
    if a.normalize == "zscore":
        zscore_inplace(x[0, 0, : shape[0], : shape[1], : shape[2]])
    t1 = time.perf_counter()
    with torch.no_grad():
        scores = net(torch.from_numpy(x))[0]
    infer = time.perf_counter() - t1
    _save_labels(argmax_uint8(scores, shape), a.volume, a.out)
    return {"infer_s": infer}


def _volume(a: argparse.Namespace) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(a.volume).dataobj, dtype=np.float32)


def overlap_fraction(overlap: str, tile: int) -> float:
    """The overlap as a fraction of the tile, for the peers that take a fraction (MONAI, nnU-Net)."""

    v = (parse_overlap(overlap) or [0.25])[0]
    return v if v < 1 else v / tile


def run_monai(a: argparse.Namespace) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    net = _torch_net(a)
    vol = torch.from_numpy(_volume(a))
    if a.normalize == "zscore":  # MONAI's own transform on the whole volume, as a MONAI pipeline does
        from monai.transforms import NormalizeIntensity

        vol = NormalizeIntensity()(vol)
    t1 = time.perf_counter()
    with torch.no_grad():
        out = sliding_window_inference(vol[None, None], (a.tile,) * 3, 1, net,
                                       overlap=overlap_fraction(a.overlap, a.tile), mode="gaussian")
    infer = time.perf_counter() - t1
    _save_labels(argmax_uint8(out[0], tuple(vol.shape)), a.volume, a.out)
    return {"infer_s": infer}


def nnunet_predictor(net: Any, tile: int, overlap: float, channels: int) -> Any:
    """nnU-Net v2's predictor around a plain network: CPU, gaussian, no mirroring, step = 1 - overlap. Only the
    attributes its sliding-window routine reads are set (no plans or dataset.json: the network is not an nnU-Net
    training output)."""
    from types import SimpleNamespace

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(tile_step_size=1.0 - overlap, use_gaussian=True, use_mirroring=False,
                        perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    p.network = net
    p.configuration_manager = SimpleNamespace(patch_size=[tile] * 3)
    p.label_manager = SimpleNamespace(num_segmentation_heads=channels)
    p.allowed_mirroring_axes = None
    return p


def run_nnunet(a: argparse.Namespace) -> dict:
    import torch

    net = _torch_net(a)
    predictor = nnunet_predictor(net, a.tile, overlap_fraction(a.overlap, a.tile), a.channels)
    vol = _volume(a)
    if a.normalize == "zscore":  # nnU-Net's own scheme, per image (no mask: the volume has no empty background)
        from nnunetv2.preprocessing.normalization.default_normalization_schemes import ZScoreNormalization

        vol = ZScoreNormalization(use_mask_for_norm=False, intensityproperties={}).run(vol)
    vol = torch.from_numpy(vol)
    t1 = time.perf_counter()
    logits = predictor.predict_sliding_window_return_logits(vol[None])
    infer = time.perf_counter() - t1
    _save_labels(argmax_uint8(logits, tuple(vol.shape)), a.volume, a.out)
    return {"infer_s": infer}


def run_volinfer(a: argparse.Namespace) -> dict:
    lean_allocator()  # as `volinfer run` sets its own process (volinfer.cliutil.friendly_errors)
    if a.method == "auto":  # what `volinfer run` does with no options: planned tile, auto precision, crop, exact
        rep = predict(a.volume, a.model, a.out, device=a.device, threads=a.threads, overwrite=True, progress=False)
    else:
        rep = predict(a.volume, a.model, a.out, tile=a.tile, stitch=a.method, overlap=a.overlap,
                      precision=a.precision, device=a.device, threads=a.threads, overwrite=True, progress=False)
    return {"infer_s": rep.infer_busy_s, "tiles": rep.tiles, "engine_wall_s": rep.wall_s,
            "tile": list(rep.tile), "precision": rep.precision, "exact": rep.exact}


def run_infer_only(a: argparse.Namespace) -> dict:
    """``--tiles`` random tiles through the compiled tile model, ``--requests`` in flight, nothing else."""
    import openvino as ov

    tm = TileModel(a.model, tile=a.tile, options=CompileOptions(device=a.device, precision=a.precision,
                                                               threads=a.threads))
    rng = np.random.default_rng(0)
    tiles = [rng.standard_normal(tm.input_shape(), dtype=np.float32) for _ in range(a.requests)]
    queue = ov.AsyncInferQueue(tm.compiled, a.requests)
    queue.start_async({0: tiles[0]})  # the first inference pays one-off set-up; volinfer's runs pay it too, once
    queue.wait_all()
    t1, c1 = time.perf_counter(), time.process_time()
    for i in range(a.tiles):
        queue.start_async({0: tiles[i % len(tiles)]})
    queue.wait_all()
    return {"infer_s": time.perf_counter() - t1, "infer_cpu_s": time.process_time() - c1, "tiles": a.tiles}


def run_alloc(a: argparse.Namespace) -> dict:
    block = np.ones(int(a.mb * 2**20), dtype=np.uint8)  # ones: every page touched
    t0 = time.process_time()
    while time.process_time() - t0 < a.burn:
        pass
    return {"infer_s": 0.0, "checksum": int(block[::4096].sum())}


METHODS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "naive": run_naive, "naive-torch": run_naive_torch, "crop": run_volinfer, "gaussian": run_volinfer,
    "mean": run_volinfer, "auto": run_volinfer, "monai": run_monai, "nnunet": run_nnunet, "infer-only": run_infer_only, "alloc": run_alloc,
}


# imported before the clock starts: every method is timed from its own work, not from its libraries' import time
PRELOAD = {
    "naive": ["openvino", "nibabel", "volinfer.model.settings", "volinfer.tiling.geometry"],
    "naive-torch": ["torch", "nibabel", "converters.sources", "volinfer.model.tile_model", "volinfer.tiling.geometry"],
    "crop": ["volinfer", "openvino"], "gaussian": ["volinfer", "openvino"], "mean": ["volinfer", "openvino"],
    "auto": ["volinfer", "openvino"],
    "monai": ["torch", "nibabel", "monai.inferers", "monai.transforms", "converters.sources", "volinfer.run.setup"],
    "nnunet": ["torch", "nibabel", "nnunetv2.inference.predict_from_raw_data",
               "nnunetv2.preprocessing.normalization.default_normalization_schemes", "converters.sources",
               "volinfer.run.setup"],
    "infer-only": ["openvino", "volinfer.model.tile_model"], "alloc": [],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", choices=list(METHODS))
    ap.add_argument("--volume")
    ap.add_argument("--model")
    ap.add_argument("--out")
    ap.add_argument("--result", required=True)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--overlap", default="0.25", help="fraction of the tile or voxels, as for `volinfer run`")
    ap.add_argument("--precision", default="f32")
    ap.add_argument("--device", default="CPU")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--normalize", choices=["none", "zscore"], default="none",
                    help="baselines: the model's stored normalisation (zscore: the whole volume's mean and std); "
                         "volinfer's methods apply the stored one themselves")
    ap.add_argument("--multiple", type=int, help="naive-torch: the model's size multiple (default: read from --model)")
    ap.add_argument("--channels", type=int, default=2, help="nnunet: output channels of the network")
    ap.add_argument("--tiles", type=int, default=16, help="infer-only: how many tiles")
    ap.add_argument("--requests", type=int, default=2, help="infer-only: requests in flight (volinfer's default)")
    ap.add_argument("--torch-factory", default="volinfer.bench.reference_unet:build_unet")
    ap.add_argument("--mb", type=float, default=0)
    ap.add_argument("--burn", type=float, default=0, help="alloc: seconds of CPU to spend")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    for module in PRELOAD[a.method]:
        importlib.import_module(module)
    t0, c0 = time.perf_counter(), time.process_time()
    res = METHODS[a.method](a)
    res.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
    Path(a.result).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
