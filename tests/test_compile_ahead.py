"""A plain stream's segments compile beside the pre-pass (volinfer.run.segment_compile.CompileAhead): the stream
takes them when its plan is the one they were compiled for, compiles its own when the precision guard planned
again, and raises what compiling raised."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import openvino as ov
import pytest
from models import save_unet2, stream_unet
from test_precision_guard import CHECK
from test_stream import _volume, whole_volume

from volinfer import predict
from volinfer.model import precision
from volinfer.model.stream_graph import NotStreamable
from volinfer.run import segment_compile, stream
from volinfer.run.segment_compile import CompileAhead


def _spy(monkeypatch) -> dict[str, list]:
    """Records what CompileAhead.take handed over, what stop() was called on, and the stream's own compiles."""
    seen: dict[str, list] = {"taken": [], "stopped": [], "own": []}
    take, stop, own = CompileAhead.take, CompileAhead.stop, stream.segment_requests

    def spy_take(self, *a):
        got = take(self, *a)
        seen["taken"].append(got is not None)
        return got

    monkeypatch.setattr(CompileAhead, "take", spy_take)
    monkeypatch.setattr(CompileAhead, "stop", lambda self: seen["stopped"].append(True) or stop(self))
    monkeypatch.setattr(stream, "segment_requests", lambda *a, **kw: seen["own"].append(True) or own(*a, **kw))
    return seen


def test_the_stream_runs_the_segments_compiled_beside_the_pre_pass(tmp_path, monkeypatch):
    """An odd volume streamed in f32: the stream compiled nothing itself, and its output is whole-volume inference."""
    path = tmp_path / "u.xml"
    ov.save_model(stream_unet(seed=3), str(path))
    seen = _spy(monkeypatch)
    vol = _volume((29, 23, 37), seed=4)
    out, rep = predict(vol, path, engine="stream", precision="f32", kind="raw", progress=False, report=True)
    assert rep.engine == "stream"
    assert seen == {"taken": [True], "stopped": [], "own": []}
    ref = whole_volume(path, vol)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


@pytest.mark.skipif(precision.native_reduced(ov.Core(), "CPU") is None,
                    reason="this CPU runs no reduced precision natively")
def test_a_guard_moving_to_f32_plans_again_and_compiles_its_own(tmp_path, monkeypatch):
    """The model's stored bf16 verdict does not cover this input's range: the run plans again in f32, stops the
    segments compiling for the first plan, compiles its own in f32, and its output is f32 whole-volume inference."""
    native = precision.native_reduced(ov.Core(), "CPU")
    xml = save_unet2(tmp_path / "m.xml", precision_check=json.dumps({**CHECK, "precision": native}))
    seen = _spy(monkeypatch)
    vol = (_volume((21, 18, 15), seed=2) * 1000).astype(np.float32)
    out, rep = predict(vol, xml, engine="stream", kind="raw", progress=False, report=True)
    assert rep.engine == "stream" and rep.precision == "f32", rep.notes
    assert seen == {"taken": [], "stopped": [True], "own": [True]}  # (the new plan compiles nothing ahead)
    ref = whole_volume(xml, vol)
    np.testing.assert_allclose(np.moveaxis(out, -1, 0), ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_take_hands_over_only_what_it_compiled_and_raises_what_compiling_raised(monkeypatch):
    def failing(model, graph):
        def compile_segment(seg, t):
            if seg == "b":
                raise NotStreamable("segment b computes [1], expected [2]")
            return SimpleNamespace(create_infer_request=lambda: ("request", seg, t))
        return compile_segment

    monkeypatch.setattr(segment_compile, "segment_compiler", failing)
    model, graph = SimpleNamespace(precision="f32"), SimpleNamespace(segments=["a", "c"])
    other_graph = SimpleNamespace(segments=["a", "c"])
    for asked in ((SimpleNamespace(precision="bf16"), graph, [1, 2]), (model, other_graph, [1, 2]),
                  (model, graph, [2, 2])):
        ahead = CompileAhead(model, graph, [1, 2])
        assert ahead.take(*asked) is None  # another precision, graph or chunks: not what runs...
        assert ahead.stopped and ahead.take(model, graph, [1, 2]) is None  # ...so it compiles nothing more
    ahead = CompileAhead(model, graph, [1, 2])
    assert ahead.take(model, graph, [1, 2]) == [("request", "a", 1), ("request", "c", 2)]
    bad = SimpleNamespace(segments=["a", "b", "c"])
    with pytest.raises(NotStreamable, match="segment b"):
        CompileAhead(model, bad, [1, 1, 1]).take(model, bad, [1, 1, 1])
    stopped = CompileAhead(model, graph, [1, 2])
    stopped.stop()
    assert stopped.take(model, graph, [1, 2]) is None


def test_a_run_refused_during_the_pre_pass_exits_cleanly(tmp_path):
    """A NaN volume is refused by the pre-pass while the stream's segments are still compiling: the run waits for
    the segment being compiled and exits 2 with its one line (a process exiting while OpenVINO compiled in another
    thread aborted: SIGABRT, exit 134, "terminate called without an active exception"); so does a script that
    catches the error from the Python API and ends normally."""
    import subprocess
    import sys

    import nibabel as nib

    path = tmp_path / "u.xml"
    ov.save_model(stream_unet(seed=1), str(path))
    vol = _volume((40, 36, 44), seed=6)
    vol[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "nan.nii"))
    cli = [sys.executable, "-m", "volinfer", "run", str(tmp_path / "nan.nii"), "-m", str(path), "-o",
           str(tmp_path / "o.nii"), "--engine", "stream"]
    script = ("import sys, volinfer\ntry:\n"
              "    volinfer.predict(sys.argv[1], sys.argv[2], engine='stream', progress=False)\n"
              "except volinfer.VolinferError as e:\n    print('caught', e)\n")
    api = [sys.executable, "-c", script, str(tmp_path / "nan.nii"), str(path)]
    for args, rc in ((cli, 2), (api, 0)):
        p = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert p.returncode == rc and "terminate" not in p.stderr, (p.returncode, p.stderr)
        assert "NaN" in p.stdout + p.stderr
    assert not (tmp_path / "o.nii").exists()
