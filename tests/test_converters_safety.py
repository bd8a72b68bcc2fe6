"""convert never runs code from a model file without --trust-pickle, and its errors are one line (issue 10)."""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from converters import convert, safe_load  # noqa: E402
from converters.messages import framework_message  # noqa: E402
from volinfer import VolinferError  # noqa: E402
from volinfer.cli import main  # noqa: E402


class _Payload:
    """Unpickling this creates ``marker``: proof that the file's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pt2(path, marker):
    """A genuine torch.export archive whose first weight entry is replaced by a pickle payload (and marked as
    pickled in the weights config, as torch.export.save does for tensors it pickles)."""
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    good = path.with_suffix(".good.pt2")
    torch.export.save(torch.export.export(net, (torch.zeros(1, 1, 8, 8, 8),)), str(good))
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("model_weights_config.json"):
                cfg = json.loads(data)
                for v in cfg["config"].values():
                    v["use_pickle"] = v["use_pickle"] or v["path_name"] == "weight_0"
                data = json.dumps(cfg).encode()
            elif info.filename.endswith("weights/weight_0"):
                data = pickle.dumps(_Payload(marker), protocol=2)
            zout.writestr(info, data)
    good.unlink()
    return path


def test_pt2_pickle_payload_runs_in_torch_but_is_refused(tmp_path):
    evil = _evil_pt2(tmp_path / "evil.pt2", tmp_path / "MARKER")
    # the archive is a real attack: torch's own loader runs the payload
    code = f"import torch\ntry:\n    torch.export.load({str(evil)!r})\nexcept Exception:\n    pass\n"
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert (tmp_path / "MARKER").exists()
    (tmp_path / "MARKER").unlink()
    r = CliRunner().invoke(main, ["convert", str(evil), "-o", str(tmp_path / "o.xml")])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "pickle" in r.output and "--trust-pickle" in r.output and "weight_0" in r.output
    assert not (tmp_path / "MARKER").exists() and not (tmp_path / "o.xml").exists()


def test_pt2_runtime_guard_refuses_what_the_scan_misses(tmp_path, monkeypatch):
    """Second line of defence: with the static scan blinded, torch's loader still gets no code execution."""
    evil = _evil_pt2(tmp_path / "evil.pt2", tmp_path / "MARKER")
    monkeypatch.setattr(safe_load, "scan_zip", lambda *a, **k: [])
    with pytest.raises(VolinferError, match="--trust-pickle"):
        convert(str(evil), tmp_path / "o.xml")
    assert not (tmp_path / "MARKER").exists()


def test_pickle_scanner_sees_imports_in_every_protocol():
    for proto in range(0, 6):
        found = safe_load.pickle_imports(pickle.dumps(_Payload("/x"), protocol=proto))
        assert any(g.endswith(".open") for g in found), (proto, found)
    sd = pickle.dumps({"a": [1, 2.0, "s"]}, protocol=4)
    assert safe_load.pickle_imports(sd) == []


def test_torchscript_archive_with_python_global_is_refused(tmp_path):
    net = torch.nn.Conv3d(1, 2, 3, padding=1).eval()
    ts = tmp_path / "m.pt"
    torch.jit.trace(net, torch.zeros(1, 1, 8, 8, 8)).save(str(ts))
    # a clean TorchScript archive passes the scan (its pickles only name TorchScript types and tensors)
    assert safe_load.scan_zip(ts, safe_load.torch_allowed_globals(), safe_load._TORCHSCRIPT_GLOBALS) == []
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(ts) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, pickle.dumps(_Payload("/x"), protocol=2) if info.filename.endswith(
                "constants.pkl") else data)
    with pytest.raises(VolinferError, match=r"TorchScript archive holds a pickle that imports .*open"):
        convert(str(bad), tmp_path / "o.xml")


def test_weights_are_weights_only_and_pickled_modules_need_trust(tmp_path):
    (tmp_path / "nets.py").write_text("import torch\ndef net():\n    return torch.nn.Conv3d(1, 2, 3, padding=1)\n")
    w = tmp_path / "w.pth"
    torch.save({"weight": torch.zeros(2, 1, 3, 3, 3), "bias": _Payload(tmp_path / "MARKER")}, w)
    with pytest.raises(VolinferError, match=r"weights file holds Python objects beyond tensors .*weights-only"):
        convert(f"{tmp_path / 'nets.py'}:net", tmp_path / "o.xml", weights=str(w), trust_pickle=True)
    assert not (tmp_path / "MARKER").exists()
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(VolinferError, match="object arrays"):
        safe_load.load_numpy(tmp_path / "obj.npy")


def test_factory_needs_weights_or_random_weights(tmp_path):
    (tmp_path / "nets.py").write_text("import torch\ndef net():\n    return torch.nn.Conv3d(1, 2, 3, padding=1)\n")
    r = CliRunner().invoke(main, ["convert", f"{tmp_path / 'nets.py'}:net", "-o", str(tmp_path / "o.xml")])
    assert r.exit_code == 2 and "--random-weights" in r.output and r.output.count("\n") == 1, r.output
    res = convert(f"{tmp_path / 'nets.py'}:net", tmp_path / "o.xml", random_weights=True, tile=16,
                  measure_rf=False)
    assert res.parity.passed and any("--random-weights" in n for n in res.notes)


@pytest.mark.parametrize("body, what", [
    ("import not_a_module_xyz\n", "ModuleNotFoundError"),
    ("def net(:\n", "SyntaxError"),
    ("raise RuntimeError('needs a GPU')\n", "needs a GPU"),
])
def test_factory_import_failure_is_one_line(tmp_path, body, what):
    (tmp_path / "nets.py").write_text(body)
    r = CliRunner().invoke(main, ["convert", f"{tmp_path / 'nets.py'}:net", "-o", str(tmp_path / "o.xml"),
                                  "--random-weights"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and what in r.output and "importing it failed" in \
        r.output, r.output


@pytest.mark.parametrize("tile", ["0", "-4", "32,0,32", "32,32", "abc"])
def test_bad_tile_is_one_line_at_parse_time(tmp_path, tile):
    # the model does not exist: the tile is refused before anything is loaded
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "o.xml"),
                                  "--tile", tile])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "--tile" in r.output, r.output


def test_openvino_errors_keep_the_meaningful_line(tmp_path):
    import openvino as ov

    bad = tmp_path / "bad.xml"
    bad.write_text("<net>")
    try:
        ov.Core().read_model(str(bad))
    except Exception as e:
        msg = framework_message(e)
    assert "Exception from src" not in msg and "Unable to read the model" in msg
    r = CliRunner().invoke(main, ["convert", str(bad), "-o", str(tmp_path / "o.xml")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "Unable to read the model" in r.output, r.output


def test_keras_lambda_layer_is_one_line(tmp_path):
    tf = pytest.importorskip("tensorflow")
    inp = tf.keras.Input((None, None, None, 1))
    out = tf.keras.layers.Lambda(lambda t: t * 2.0, name="times_two")(inp)
    model = tf.keras.Model(inp, tf.keras.layers.Conv3D(2, 1)(out))
    model.save(str(tmp_path / "m.keras"))
    r = CliRunner().invoke(main, ["convert", str(tmp_path / "m.keras"), "-o", str(tmp_path / "o.xml")])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert "Lambda layer 'times_two' holds Python code" in r.output and "--trust-pickle" in r.output


def test_help_says_what_trust_pickle_allows():
    r = CliRunner().invoke(main, ["convert", "--help"])
    text = " ".join(r.output.split())
    assert "--trust-pickle" in text and "Lambda" in text and ".pt2" in text and "run any code" in text


def test_security_md_exists():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "SECURITY.md")).read()
    assert "--trust-pickle" in text and "ONNX" in text and "## Files and outputs" in text


def test_converting_sends_no_telemetry():
    """OpenVINO's converter reports usage over the network unless told not to (offline, its sender can hold the
    process at exit): importing the converters turns it off for the process, and OpenVINO's own set-up, as
    convert_model makes it, keeps it off. In a fresh process without CI in its environment (the converter's own
    opt-out, which the test must not lean on)."""
    pytest.importorskip("openvino_telemetry")
    code = ("import converters, openvino_telemetry as tm\n"
            "from openvino.tools.ovc.telemetry_utils import init_ovc_telemetry\n"
            "print(tm.Telemetry().consent, init_ovc_telemetry().consent)")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False"]
