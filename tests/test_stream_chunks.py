"""The layer-streaming engine's plane buffers are sized for the chunks the run computes with, whatever they are.

A plan's buffers are sized by a bookkeeping pass at one chunking (planes per segment call, which follow the bytes of
a stored plane: bf16 planes are half an f32 plane). A run whose precision moved after planning (``--precision auto``
chose bf16, the input's range made the guard fall back to f32) used to compute at the new chunking in buffers sized
for the old one: "plane buffer too small". References: OpenVINO f32 on the whole padded volume, in the test.
"""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest

from models import stream_unet
from test_stream import _volume, whole_volume
from volinfer import predict
import volinfer.run.stream as stream
from volinfer.model.stream_graph import analyse
from volinfer.run.stream import StreamRun, chunking, plan_capacities


class _NoCompute:
    """An infer request that computes nothing: the ring's own checks (every write fits its slot, every window is
    held) run without OpenVINO."""

    def set_input_tensor(self, j, t):
        pass

    def set_output_tensor(self, j, t):
        pass

    def infer(self, share_outputs=False):
        pass


@pytest.mark.parametrize("seed", range(6))
def test_buffers_fit_any_chunking(seed):
    """Random planes per call for every segment (multiples of its window's alignment), random read and write steps:
    buffers sized by the dry run at that chunking hold every write and every window of a real run."""
    rng = np.random.default_rng(seed)
    nz = int(rng.integers(1, 40)) * 4
    graph = analyse(stream_unet(), [1, 1, 12, 8, nz], 4)
    graph.store_in("bf16")
    chunks = [int(rng.integers(1, 7)) * s.window.chunk_multiple() for s in graph.segments]
    step = int(rng.integers(1, 6)) * 4
    rows = [(a, min(a + step, nz)) for a in range(0, nz, step)]
    caps = plan_capacities(graph, step, rows, chunks)
    run = StreamRun(graph, lambda a, slot: None, step, chunks, caps, [_NoCompute() for _ in chunks])
    for a, b in rows:
        assert run.take(a, b - a).shape[0] == b - a
        run.done(b)


def test_buffers_of_another_chunking_are_refused():
    """Buffers sized for one chunking are not silently used with another."""
    graph = analyse(stream_unet(), [1, 1, 12, 8, 40], 4)
    chunks = chunking(graph, span=2)
    caps = plan_capacities(graph, 8, [(0, 40)], chunks)
    with pytest.raises(RuntimeError, match="not whole chunks"):
        StreamRun(graph, lambda a, slot: None, 8, [3 * t for t in chunks], caps, [_NoCompute() for _ in chunks])


@pytest.mark.parametrize("chunk_bytes", [9000, 20000, 45000])
def test_precision_fallback_after_planning_streams_exactly(tmp_path, monkeypatch, chunk_bytes):
    """The IR's stored check says bf16 is faithful for inputs within ±3; this volume reaches ±300, so the guard
    moves the planned bf16 stream to f32 (different chunks: planes twice the bytes). The run streams, in f32, equal
    to whole-volume inference (it used to fail "plane buffer too small: N planes needed, M held")."""
    monkeypatch.setattr(stream, "CHUNK_BYTES", chunk_bytes)  # chunks of a few planes, as wide volumes get
    m = stream_unet(seed=12)
    m.set_rt_info(json.dumps({"precision": "bf16", "label_agreement": 1.0, "prob_max_abs": 0.001, "faithful": True,
                              "input_abs_max": 3.0}), ["volinfer", "precision_check"])
    path = tmp_path / "checked.xml"
    ov.save_model(m, str(path))
    vol = _volume((29, 26, 47), seed=13) * 100
    out, rep = predict(vol, path, engine="stream", kind="raw", progress=False, report=True)
    assert rep.engine == "stream"
    ref = whole_volume(path, vol)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5, rtol=0)
