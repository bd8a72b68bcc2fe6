"""Every streamed test network, in f32 and in bf16, on odd shapes: one plane, z far smaller than the receptive field,
sizes that are not multiples of the strides, and chunks of a few planes per call.

Reference: OpenVINO f32 on the whole padded volume (the unmodified model, one call), computed in the test. f32
streams equal it to float32 rounding; bf16 streams (planes stored in bf16 between segments) stay within bf16's
rounding of it.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import openvino as ov
import pytest

import stream_models
from models import stream_unet
from test_stream import _volume, whole_volume
from volinfer import predict
import volinfer.run.stream as stream

HAS_MONAI = all(importlib.util.find_spec(m) for m in ("torch", "monai"))

#: name -> (factory, size multiple)
NETWORKS = {
    "stream_unet": (lambda: stream_unet(seed=1), 4),
    "transposed_k3s2": (lambda: stream_models.updown(), 2),
    "transposed_k4s2_asym": (lambda: stream_models.updown(k=4, pb=2, pe=0, op=0), 2),
    "monai_basic_unet_batchnorm": (lambda: stream_models.monai_basic_unet(norm="batch"), 16),
    "monai_basic_unet_trilinear": (lambda: stream_models.monai_basic_unet(norm="batch", upsample="nontrainable"), 16),
}

SHAPES = [(13, 11, 1), (9, 14, 6), (22, 17, 30)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each network saved as IR once per module (f16-compressed weights, as volinfer's IRs store them)."""
    paths = {}

    def get(name):
        if name not in paths:
            if name.startswith("monai") and not HAS_MONAI:
                pytest.skip("needs torch and monai")
            paths[name] = tmp_path_factory.mktemp("nets") / f"{name}.xml"
            ov.save_model(NETWORKS[name][0](), str(paths[name]))
        return paths[name]

    return get


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_network_streams_in_f32_and_bf16(saved, monkeypatch, name):
    """Each shape at each precision; the longest also with calls of a few planes (a wide volume's chunking)."""
    path, multiple = saved(name), NETWORKS[name][1]
    for i, shape in enumerate(SHAPES if multiple < 16 else SHAPES[::2]):  # the big-multiple nets: 1 and 30 planes
        vol = _volume(shape, seed=i + 3)
        ref = whole_volume(path, vol, multiple=multiple)
        scale = np.abs(ref).max()
        for precision in ("f32", "bf16"):
            monkeypatch.setattr(stream, "CHUNK_BYTES", 3000 if shape[2] > 20 and precision == "bf16" else 2 << 20)
            out, rep = predict(vol, path, engine="stream", precision=precision, kind="raw", progress=False,
                               report=True)
            out = np.moveaxis(out if out.ndim == 4 else out[..., None], -1, 0)
            assert rep.engine == "stream" and out.shape == ref.shape
            dev = np.abs(out - ref).max() / scale
            if precision == "f32":
                assert dev < 1e-5, (shape, dev)
            else:
                assert dev < 0.03, (shape, dev)
                if len(ref) > 1:
                    assert (out.argmax(0) == ref.argmax(0)).mean() > 0.99, shape
