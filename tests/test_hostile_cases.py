"""Cases a red-team pass found on this round's main, each a class the fix closes: NIfTI scaling lost on the way to
Zarr, a replacement value float32 cannot hold, a benchmark of a non-model reporting success, Ctrl-C while the
command line is still starting."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import openvino as ov
import pytest
from click.testing import CliRunner
from models import save_unet2

import volinfer
from volinfer.cli import main


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_to_zarr_keeps_intensity_scaling(tmp_path):
    data = np.arange(11 * 9 * 7, dtype=np.int16).reshape(11, 9, 7)
    img = nib.Nifti1Image(data, np.eye(4), dtype=np.int16)
    img.header.set_slope_inter(2.0, 10.0)
    nib.save(img, str(tmp_path / "s.nii"))
    assert _invoke("to-zarr", tmp_path / "s.nii", "-o", tmp_path / "s.zarr", "-q").exit_code == 0
    assert _invoke("to-nifti", tmp_path / "s.zarr", "-o", tmp_path / "b.nii", "-q").exit_code == 0
    want = data.astype(np.float64) * 2.0 + 10.0  # what the header says the voxels are
    np.testing.assert_array_equal(nib.load(str(tmp_path / "b.nii")).get_fdata(), want)


def test_nan_value_beyond_float32_is_refused(tmp_path):
    vol = np.zeros((12, 12, 12), np.float32)
    vol[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "n.nii"))
    xml = save_unet2(tmp_path / "m.xml")
    r = _invoke("run", tmp_path / "n.nii", "-m", xml, "-o", tmp_path / "o.nii", "--nan-value", "1e39")
    assert r.exit_code == 2 and "float32" in r.output and not (tmp_path / "o.nii").exists()


def test_bench_of_a_non_model_fails_in_one_line(tmp_path):
    (tmp_path / "mk.py").write_text("x = 1\n")
    r = _invoke("bench", "-s", "8", "-m", tmp_path / "mk.py", "-o", tmp_path / "out")
    assert r.exit_code == 2 and "unsupported model type" in r.output


def test_ctrl_c_while_starting_is_one_line_and_130(tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "volinfer", "info", str(tmp_path / "none.xml")],
                         stderr=subprocess.PIPE, stdout=subprocess.PIPE, cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a terminal
    time.sleep(0.1)  # still importing OpenVINO
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert p.returncode in (130, 2) and len(lines) == 1 and "Traceback" not in err.decode()


GOOD_CHECK = {"precision": "bf16", "faithful": True, "label_agreement": 0.9995, "prob_max_abs": 0.004}


@pytest.mark.parametrize("stored, why", [
    ({**GOOD_CHECK, "faithful": "false"}, "faithful must be true or false"),  # a string: truthy, ran bf16
    ({**GOOD_CHECK, "label_agreement": 0.5}, "faithful with labels 50.00% equal"),  # incoherent verdict
    ({**GOOD_CHECK, "prob_max_abs": "0.01"}, "prob_max_abs must be a number"),
    ({**GOOD_CHECK, "precision": "int4"}, "expected one of bf16, f16"),
    ("yes", "expected a map"),  # was an internal AttributeError
    ([1, 2], "expected a map"),
])
def test_stored_precision_check_is_schema_checked(tmp_path, stored, why):
    vol = np.random.default_rng(0).standard_normal((13, 11, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "s.nii"))
    xml = save_unet2(tmp_path / "m.xml", precision_check=json.dumps(stored))
    r = _invoke("run", tmp_path / "s.nii", "-m", xml, "-o", tmp_path / "o.nii", "--precision", "auto")
    assert r.exit_code == 2 and why in r.output and "precision_check" in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1 and not (tmp_path / "o.nii").exists()


@pytest.mark.parametrize("key, value", [("receptive_field_bounded", '"false"'), ("norm_stats", '"blend"'),
                                        ("outputs", "[1]")])
def test_stored_run_settings_in_extra_are_typed(tmp_path, key, value):
    nib.save(nib.Nifti1Image(np.zeros((9, 9, 9), np.float32), np.eye(4)), str(tmp_path / "s.nii"))
    r = _invoke("run", tmp_path / "s.nii", "-m", save_unet2(tmp_path / "m.xml", **{key: value}), "-o",
                tmp_path / "o.nii")
    assert r.exit_code == 2 and key in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_coherent_stored_precision_check_still_runs(tmp_path):
    vol = np.random.default_rng(0).standard_normal((13, 11, 9)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "s.nii"))
    xml = save_unet2(tmp_path / "m.xml", precision_check=json.dumps({**GOOD_CHECK, "faithful": False}))
    r = _invoke("run", tmp_path / "s.nii", "-m", xml, "-o", tmp_path / "o.nii", "-q")
    assert r.exit_code == 0 and (tmp_path / "o.nii").exists()


def _two_dirs(tmp_path, names=("s.nii", "s.nii")):
    for d, name in zip("ab", names):
        (tmp_path / d).mkdir()
        vol = np.random.default_rng(ord(d)).standard_normal((13, 11, 9)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / d / name))
    return save_unet2(tmp_path / "m.xml")


def test_batch_outputs_with_one_name_are_refused_before_any_work(tmp_path):
    xml = _two_dirs(tmp_path)
    r = _invoke("run", f"{tmp_path}/[ab]/s.nii", "-m", xml, "-o", tmp_path / "out", "--overwrite")
    assert r.exit_code == 2 and "must be unique" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before any work: not even the directory


def test_batch_resume_is_keyed_on_settings_model_and_output(tmp_path):
    xml = _two_dirs(tmp_path, ("s.nii", "t.nii"))
    glob, out = f"{tmp_path}/[ab]/*.nii", tmp_path / "out"
    assert _invoke("run", glob, "-m", xml, "-o", out, "--kind", "labels", "-q").exit_code == 0
    labels = nib.load(str(out / "s.nii")).get_fdata()
    r = _invoke("run", glob, "-m", xml, "-o", out, "--kind", "probabilities", "--resume")
    assert r.exit_code == 1 and "output.kind differ" in r.output and "settings, skipped" not in r.output  # was: exit 0, skipped
    np.testing.assert_array_equal(nib.load(str(out / "s.nii")).get_fdata(), labels)  # nothing replaced silently
    r = _invoke("run", glob, "-m", xml, "-o", out, "--kind", "labels", "--resume", "--threads", "1")
    assert r.exit_code == 0 and r.output.count("settings, skipped") == 2  # same output settings: skipped
    r = _invoke("run", glob, "-m", xml, "-o", out, "--kind", "probabilities", "--resume", "--overwrite", "-q")
    assert r.exit_code == 0
    want = volinfer.predict(str(tmp_path / "a" / "s.nii"), xml, kind="probabilities")
    np.testing.assert_allclose(nib.load(str(out / "s.nii")).get_fdata(), want, atol=1e-6)
    nib.save(nib.Nifti1Image(np.zeros((13, 11, 9, 2), np.float32), np.eye(4)), str(out / "t.nii"))  # replaced
    r = _invoke("run", glob, "-m", xml, "-o", out, "--kind", "probabilities", "--resume")
    assert r.exit_code == 1 and "replaced since" in r.output and r.output.count("settings, skipped") == 1


def test_demo_replaces_links_in_its_directory_never_writes_through_them(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    precious = {}
    for name in ("demo_volume.nii.gz", "demo_volume_truth.nii.gz", "demo_labels.nii.gz"):
        target = tmp_path / f"precious-{name}"
        target.write_bytes(b"user data " + name.encode())
        precious[target] = target.read_bytes()
        (out / name).symlink_to(target)
    r = _invoke("demo", "-o", out, "--size", "24", "-q")
    assert r.exit_code == 0, r.output
    for target, data in precious.items():
        assert target.read_bytes() == data  # was: the demo volume written through the link
    for name in ("demo_volume.nii.gz", "demo_volume_truth.nii.gz", "demo_labels.nii.gz"):
        assert not (out / name).is_symlink() and nib.load(str(out / name)).shape == (24, 24, 24)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_tile_larger_than_a_thin_slab_runs_as_one_tile(tmp_path):
    """--tile 64 on a 64x64x5 slab failed "margin 4 leaves no room in a tile of 6" (the tile clamped to the slab,
    the margins kept): one tile over an axis has no neighbour, so it needs no margin."""
    from conftest import whole_volume_reference

    from volinfer.tiling.geometry import plan_axis_blend, plan_axis_crop

    assert plan_axis_crop(5, 6, 2, 4).cores == ((0, 5),) and plan_axis_blend(5, 8, 4, 12).starts == (0,)
    vol = np.random.default_rng(2).standard_normal((64, 64, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "slab.nii"))
    xml = save_unet2(tmp_path / "m.xml", overlap=16)
    r = _invoke("run", tmp_path / "slab.nii", "-m", xml, "-o", tmp_path / "o.nii", "--tile", "64", "--kind", "raw",
                "--precision", "f32", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["exact"] is True
    ref = whole_volume_reference(ov.Core().read_model(str(xml)), vol[None], 4, 4)  # padded to the multiple only
    got = np.moveaxis(nib.load(str(tmp_path / "o.nii")).get_fdata(), -1, 0)
    assert np.abs(got - ref).max() < 1e-5


def test_multi_member_gzip_is_read_and_a_truncated_one_refused(tmp_path):
    """A valid .nii.gz of several gzip members (passes gzip -t, nibabel reads it) was refused as truncated: the
    trailer's size is the last member's only."""
    import gzip

    vol = np.random.default_rng(3).standard_normal((20, 18, 16)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    raw = (tmp_path / "v.nii").read_bytes()
    data = b"".join(gzip.compress(raw[a:b]) for a, b in ((0, 1000), (1000, 9000), (9000, len(raw))))
    (tmp_path / "v.nii.gz").write_bytes(data)
    xml = save_unet2(tmp_path / "m.xml")
    for name in ("v.nii", "v.nii.gz"):
        r = _invoke("run", tmp_path / name, "-m", xml, "-o", tmp_path / f"o-{name}", "--kind", "raw", "-q")
        assert r.exit_code == 0, r.output
    plain, multi = (nib.load(str(tmp_path / f"o-{n}")).get_fdata() for n in ("v.nii", "v.nii.gz"))
    np.testing.assert_array_equal(multi, plain)
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    r = _invoke("run", tmp_path / "t.nii.gz", "-m", xml, "-o", tmp_path / "t.nii")
    assert r.exit_code == 2 and "truncated" in r.output and not (tmp_path / "t.nii").exists()


@pytest.mark.parametrize("normalize", ["zscore", "percentile:1:99", "minmax"])
def test_float64_file_gives_what_the_same_values_as_float32_give(tmp_path, normalize):
    """float64 voxels were normalised in float64 and rounded once, float32 voxels in float32 (rounded twice): the
    same values gave raw outputs that differed in the last bits. Wide voxels that fit float32 now take its path."""
    vol = (np.random.default_rng(4).standard_normal((20, 18, 16)) * 100 + 300).astype(np.float32)
    for dtype in (np.float32, np.float64):
        nib.save(nib.Nifti1Image(vol.astype(dtype), np.eye(4)), str(tmp_path / f"{np.dtype(dtype).name}.nii"))
    xml = save_unet2(tmp_path / "m.xml")
    a, b = (volinfer.predict(str(tmp_path / f"{n}.nii"), xml, kind="raw", precision="f32", normalize=normalize)
            for n in ("float32", "float64"))
    np.testing.assert_array_equal(a, b)


def _run_limited(tmp_path, limit_mb, *args):
    """``volinfer run`` in a fresh process whose address space is capped at ``limit_mb`` (``ulimit -v``)."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, resource.RLIM_INFINITY))

    return subprocess.run([sys.executable, "-m", "volinfer", "run", *map(str, args)], capture_output=True,
                          text=True, preexec_fn=cap, timeout=300, cwd=tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc arenas, RLIMIT_AS")
def test_virtual_memory_limit_streams_and_refuses_in_one_line(tmp_path):
    """Under ulimit -v the layer-streaming engine failed with an internal error (RuntimeError: Resource temporarily
    unavailable): glibc gave each of its compile threads a malloc arena of 64 MB address space (peak virtual memory
    1506 MB against 728 MB for tiles, here). Capped arenas: ~600 MB; a limit too small for it is one line."""
    from models import stream_unet

    m = stream_unet()
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    ov.save_model(m, str(tmp_path / "s.xml"))
    vol = np.random.default_rng(0).standard_normal((32, 30, 28)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "v.nii"))
    r = _run_limited(tmp_path, 1000, "v.nii", "-m", "s.xml", "-o", "o.nii", "--engine", "stream", "-q")
    assert r.returncode == 0, r.stderr
    r = _run_limited(tmp_path, 400, "v.nii", "-m", "s.xml", "-o", "p.nii", "--engine", "stream", "-q")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "out of memory" in lines[0] and "ulimit -v" in lines[0], r.stderr
    assert not any(p.name.startswith((".p.nii", "p.nii")) for p in tmp_path.iterdir())


def test_openvinos_own_allocation_failure_is_out_of_memory():
    """Under ulimit -v on a loaded machine OpenVINO's allocator failed before any thread did: "RuntimeError: can't
    alloc" was an internal error (exit 1) where the test above wants the one-line out-of-memory refusal."""
    from volinfer.portable import exhausted_memory

    assert exhausted_memory(RuntimeError("Exception from src/plugins/intel_cpu/src/memory.cpp:12:\ncan't alloc"))
    assert exhausted_memory(RuntimeError("Exception from src/inference/src/dev/plugin.cpp:54:\nResource temporarily "
                                         "unavailable"))
    assert exhausted_memory(RuntimeError("Exception from src/plugins/intel_cpu/src/memory.cpp:1:\nFailed to allocate "
                                         "2408448 bytes of memory"))
    assert exhausted_memory(ImportError("unicodedata.cpython-311-x86_64-linux-gnu.so: failed to map segment from "
                                        "shared object"))  # a module imported late, under ulimit -v
    assert not exhausted_memory(RuntimeError("Exception from src/core/src/node.cpp:1: shape mismatch"))
    # OpenVINO's other "can't allocate" messages are no memory errors (a red-team helper's strings from its libraries)
    assert not exhausted_memory(RuntimeError("Exception from snippets: Can't allocate registers for a snippet: not "
                                             "enough registers"))
    assert not exhausted_memory(RuntimeError("[GPU] Can't allocate output for dynamic layout without upper bound"))


def test_batch_into_its_own_input_directory_is_refused_before_any_work(tmp_path):
    xml = _two_dirs(tmp_path, ("s.nii", "t.nii"))
    (tmp_path / "link").symlink_to(tmp_path / "a")
    for out in (tmp_path / "a", tmp_path / "b" / ".." / "a", tmp_path / "link"):
        r = _invoke("run", f"{tmp_path}/[ab]/*.nii", "-m", xml, "-o", out, "--overwrite")
        assert r.exit_code == 2 and "holds the input" in r.output and len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["s.nii"]


def test_a_hostile_batch_record_is_never_trusted_or_followed(tmp_path):
    xml = _two_dirs(tmp_path, ("s.nii", "t.nii"))
    out = tmp_path / "out"
    out.mkdir()
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (out / ".volinfer-batch.json").symlink_to(secret)
    assert _invoke("run", f"{tmp_path}/[ab]/*.nii", "-m", xml, "-o", out, "-q").exit_code == 0
    assert secret.read_text() == "{}" and not (out / ".volinfer-batch.json").is_symlink()  # replaced, not followed
    (out / ".volinfer-batch.json").write_text("[garbage")
    r = _invoke("run", f"{tmp_path}/[ab]/*.nii", "-m", xml, "-o", out, "--resume")
    assert r.exit_code == 1 and "settings, skipped" not in r.output  # unreadable record: nothing skipped


def test_batch_into_a_nifti_file_name_is_refused_not_made_a_directory(tmp_path):
    xml = _two_dirs(tmp_path, ("s.nii", "t.nii"))
    r = _invoke("run", tmp_path / "a", "-m", xml, "-o", tmp_path / "seg.nii.gz")
    assert r.exit_code == 2 and "directory" in r.output and not (tmp_path / "seg.nii.gz").exists()
