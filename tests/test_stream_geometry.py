"""Output geometry is checked once, where every engine builds its model: a model whose output is larger or smaller
than its input is refused by tiles, auto and the layer-streaming engine alike, in one line, before any output exists
(the stream used to crop a larger output silently, and crash on a smaller one)."""

from __future__ import annotations

import subprocess
import sys

import nibabel as nib
import numpy as np
import openvino as ov
import openvino.opset13 as ops
import pytest

from volinfer.model.stream_graph import NotStreamable, analyse


def _bigger() -> ov.Model:
    """A transposed convolution k3 s1 p0: two voxels more along every axis."""
    p = ops.parameter([1, 1, -1, -1, -1], np.float32)
    w = np.random.default_rng(0).standard_normal((1, 2, 3, 3, 3)).astype(np.float32)
    return ov.Model([ops.convolution_backprop_data(p, ops.constant(w), [1] * 3, None, [0] * 3, [0] * 3, [1] * 3)],
                    [p])


def _smaller() -> ov.Model:
    """A valid convolution k3 s2: about half the voxels along every axis."""
    p = ops.parameter([1, 1, -1, -1, -1], np.float32)
    w = np.random.default_rng(1).standard_normal((2, 1, 3, 3, 3)).astype(np.float32)
    m = ov.Model([ops.convolution(p, ops.constant(w), [2] * 3, [0] * 3, [0] * 3, [1] * 3)], [p])
    m.set_rt_info("2", ["volinfer", "size_multiple"])
    return m


@pytest.mark.parametrize("make", [_bigger, _smaller])
def test_every_engine_refuses_an_output_of_another_size(tmp_path, make):
    path = tmp_path / "m.xml"
    ov.save_model(make(), str(path))
    src = tmp_path / "in.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(2).standard_normal((20, 22, 18)).astype(np.float32), np.eye(4)),
             str(src))
    for engine in ("stream", "tiles", "auto"):
        dst = tmp_path / f"{engine}.nii.gz"
        r = subprocess.run([sys.executable, "-m", "volinfer", "run", str(src), "-m", str(path), "-o", str(dst),
                            "--engine", engine, "--kind", "raw", "-q"], capture_output=True, text=True)
        assert r.returncode == 2, (engine, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "does not keep its input's spatial size" in lines[0], (engine, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.nii.gz", "m.bin", "m.xml"]  # nothing left behind


@pytest.mark.parametrize("make", [_bigger, _smaller])
def test_stream_analysis_refuses_an_output_of_another_size(make):
    """The stream's own analysis says so too (a model whose output size changes only at the whole volume)."""
    with pytest.raises(NotStreamable, match="does not keep its input's spatial size"):
        analyse(make(), [1, 1, 16, 16, 16], 4)


def test_stream_refuses_a_fixed_input_shape_in_one_line(tmp_path):
    """A model with a static 16³ input streamed over a 20x18x15 volume: the stream would ignore the declared shape
    (or crash in shape inference: 'internal error'); it is refused like --tile, in one line, nothing written."""
    from models import tiny_unet

    ov.save_model(tiny_unet(static=16), str(tmp_path / "st.xml"))
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 15), np.float32), np.eye(4)), str(tmp_path / "v.nii"))
    err = tmp_path / "err.txt"
    with open(err, "w") as f:
        p = subprocess.run([sys.executable, "-m", "volinfer", "run", str(tmp_path / "v.nii"), "-m",
                            str(tmp_path / "st.xml"), "-o", str(tmp_path / "o.nii"), "--engine", "stream"],
                           stderr=f, stdout=subprocess.DEVNULL, timeout=300)
    lines = err.read_text().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "fixed input shape" in lines[0], lines
    assert not (tmp_path / "o.nii").exists()
