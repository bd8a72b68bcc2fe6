"""TensorFlow sources (run only where TensorFlow is installed; CI does not install it)."""

import numpy as np
import openvino as ov
import pytest

tf = pytest.importorskip("tensorflow")

from converters import convert  # noqa: E402
from volinfer import ModelSettings, predict  # noqa: E402
from volinfer.geometry import padded_size  # noqa: E402


def _keras_net():
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((None, None, None, 1))
    x = tf.keras.layers.Conv3D(4, 3, padding="same", activation="relu")(inp)
    skip = x
    x = tf.keras.layers.AveragePooling3D(2)(x)
    x = tf.keras.layers.Conv3D(4, 3, padding="same", activation="relu")(x)
    x = tf.keras.layers.UpSampling3D(2)(x)
    x = tf.keras.layers.Concatenate()([x, skip])
    return tf.keras.Model(inp, tf.keras.layers.Conv3D(2, 1)(x))


def test_channels_last_savedmodel_converts_and_tiles_exactly(tmp_path):
    net = _keras_net()
    net.export(str(tmp_path / "saved"))
    r = convert(str(tmp_path / "saved"), tmp_path / "tf.xml", tile=32, fp16=False)
    assert r.parity.passed and r.parity.reference == "TensorFlow"
    s = ModelSettings.from_model(ov.Core().read_model(str(tmp_path / "tf.xml")))
    assert s.layout == "NDHWC" and s.size_multiple == 2 and s.source_framework == "tensorflow-savedmodel"
    vol = np.random.default_rng(1).standard_normal((45, 38, 29)).astype(np.float32)
    margin = max(s.receptive_field) + 2
    got = predict(vol, str(tmp_path / "tf.xml"), kind="raw", overlap=2 * margin)
    padded = [padded_size(n, 32, 2) for n in vol.shape]
    full = np.pad(vol, [(0, p - n) for p, n in zip(padded, vol.shape)])[None, ..., None]
    want = net(full).numpy()[0, :45, :38, :29]
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_frozen_graph_cut_at_named_nodes_and_keras_file(tmp_path):
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    net = _keras_net()
    fn = tf.function(lambda x: net(x)).get_concrete_function(
        tf.TensorSpec([1, None, None, None, 1], tf.float32, name="img"))
    graph = convert_variables_to_constants_v2(fn).graph.as_graph_def()
    tf.io.write_graph(graph, str(tmp_path), "frozen.pb", as_text=False)
    relu = next(n.name for n in graph.node if n.op == "Relu")  # the first conv's activation: 4 channels
    r = convert(str(tmp_path / "frozen.pb"), tmp_path / "cut.xml", tile=16, inputs=["img"], outputs=[relu])
    assert r.parity.passed
    cut = ov.Core().read_model(str(tmp_path / "cut.xml"))
    assert cut.output(0).get_partial_shape()[4].get_length() == 4
    net.save(str(tmp_path / "m.keras"))
    r = convert(str(tmp_path / "m.keras"), tmp_path / "k.xml", tile=16)
    assert r.parity.passed and r.parity.reference == "TensorFlow/Keras"
