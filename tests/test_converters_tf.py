"""TensorFlow sources (run only where TensorFlow is installed; CI does not install it)."""

import numpy as np
import openvino as ov
import pytest

tf = pytest.importorskip("tensorflow")

from converters import convert  # noqa: E402
from volinfer import ModelSettings, predict  # noqa: E402
from volinfer.tiling.geometry import padded_size  # noqa: E402


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
    got = predict(vol, str(tmp_path / "tf.xml"), kind="raw", overlap=2 * margin, precision="f32")
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


def _tf1_graph_with_iterator_and_training_flag(path):
    """A TF1-era frozen graph as published: the image input is a PlaceholderWithDefault fed by a tf.data iterator,
    and a `training` flag (PlaceholderWithDefault, default True) switches dropout on."""
    g = tf.Graph()
    with g.as_default():
        ds = tf.data.Dataset.from_tensors(np.zeros((1, 16, 16, 16, 1), np.float32)).repeat()
        it = tf.compat.v1.data.make_one_shot_iterator(ds)
        img = tf.compat.v1.placeholder_with_default(it.get_next(), [1, None, None, None, 1], name="img")
        training = tf.compat.v1.placeholder_with_default(True, [], name="training")
        rng = np.random.default_rng(0)
        w1 = tf.constant(rng.standard_normal((3, 3, 3, 1, 4)).astype(np.float32) * 0.5)
        w2 = tf.constant(rng.standard_normal((1, 1, 1, 4, 2)).astype(np.float32) * 0.5)
        h = tf.nn.relu(tf.nn.conv3d(img, w1, [1, 1, 1, 1, 1], "SAME"))
        h = tf.cond(training, lambda: tf.nn.dropout(h, rate=0.5), lambda: tf.identity(h))  # what layers.dropout did
        tf.identity(tf.nn.conv3d(h, w2, [1, 1, 1, 1, 1], "SAME"), name="logits")
    tf.io.write_graph(g.as_graph_def(), str(path.parent), path.name, as_text=False)
    return w1, w2


def test_tf1_frozen_graph_with_placeholder_with_default_and_training_flag(tmp_path):
    from click.testing import CliRunner

    from volinfer import VolinferError
    from volinfer.cli import main

    pb = tmp_path / "tf1.pb"
    _tf1_graph_with_iterator_and_training_flag(pb)
    # a wrong input name: one line listing the real ones
    r = CliRunner().invoke(main, ["convert", str(pb), "-o", str(tmp_path / "x.xml"), "--input", "image:0",
                                  "--output-node", "logits", "--tile", "16"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "img" in r.output and "training" in r.output, \
        r.output
    # dropout left on (training defaults to true) cannot match TensorFlow's inference output
    with pytest.raises(VolinferError):
        convert(str(pb), tmp_path / "on.xml", tile=16, inputs=["img"], outputs=["logits"], fp16=False,
                measure_rf=False, fixed={"training": True})
    r = convert(str(pb), tmp_path / "tf1.xml", tile=16, inputs=["img"], outputs=["logits"],
                fixed={"training": False}, fp16=False, measure_rf=False)
    assert r.parity.checked and r.parity.passed and r.parity.reference == "TensorFlow" and r.parity.max_rel < 1e-4
    m = ov.Core().read_model(str(tmp_path / "tf1.xml"))
    assert len(m.inputs) == 1 and ModelSettings.from_model(m).extra["frozen_inputs"] == {"training": False}
    # independently: TF1 session with training=False equals the IR on an odd shape
    vol = np.random.default_rng(3).standard_normal((1, 12, 20, 14, 1)).astype(np.float32)
    g = tf.Graph()
    with g.as_default():
        gd = tf.compat.v1.GraphDef()
        gd.ParseFromString(pb.read_bytes())
        tf.compat.v1.import_graph_def(gd, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            want = sess.run("logits:0", {"img:0": vol, "training:0": False})
    got = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(vol)[0]
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def _tf1_unet_behind_a_string_handle_iterator(path):
    """A TF1 U-Net as published: ``img`` is a PlaceholderWithDefault fed by ``IteratorGetNext:0`` of an iterator
    made ``from_string_handle`` (a string Placeholder), ``training`` (PlaceholderWithDefault, default True) gates
    dropout through Switch/Merge (TF1 control flow), Conv3D/ReLU/MaxPool3D/Conv3DBackpropInputV2/ConcatV2, sigmoid
    output ``prob``, and a loss reading the iterator's labels."""
    tf.compat.v1.disable_control_flow_v2()  # Switch/Merge, as TF1 wrote them
    rng = np.random.default_rng(0)

    def w(*shape):
        return tf.constant((rng.standard_normal(shape) * (2.0 / np.prod(shape[:-1])) ** 0.5).astype(np.float32))

    g = tf.Graph()
    with g.as_default():
        handle = tf.compat.v1.placeholder(tf.string, [], name="Placeholder")
        it = tf.compat.v1.data.Iterator.from_string_handle(
            handle, (tf.float32, tf.float32, tf.int32),
            (tf.TensorShape([None, None, None, None, 1]), tf.TensorShape([None, None, None, None, 1]),
             tf.TensorShape([None])))
        x_it, y_it, _ = it.get_next()
        img = tf.compat.v1.placeholder_with_default(x_it, [None, None, None, None, 1], name="img")
        training = tf.compat.v1.placeholder_with_default(True, [], name="training")
        c1 = tf.nn.relu(tf.nn.conv3d(img, w(3, 3, 3, 1, 4), [1] * 5, "SAME") + 0.1)
        p1 = tf.nn.max_pool3d(c1, [1, 2, 2, 2, 1], [1, 2, 2, 2, 1], "SAME")
        c2 = tf.nn.relu(tf.nn.conv3d(p1, w(3, 3, 3, 4, 8), [1] * 5, "SAME"))
        c2 = tf.cond(training, lambda: tf.nn.dropout(c2, rate=0.5), lambda: c2)
        n = tf.shape(c1)
        up = tf.nn.conv3d_transpose(c2, w(2, 2, 2, 4, 8), tf.stack([n[0], n[1], n[2], n[3], 4]), [1, 2, 2, 2, 1],
                                    "SAME")
        c3 = tf.nn.relu(tf.nn.conv3d(tf.concat([up, c1], axis=-1), w(3, 3, 3, 8, 4), [1] * 5, "SAME"))
        prob = tf.sigmoid(tf.nn.conv3d(c3, w(1, 1, 1, 4, 1), [1] * 5, "SAME"), name="prob")
        tf.reduce_mean(tf.square(prob - y_it), name="loss")
    tf.compat.v1.enable_control_flow_v2()
    tf.io.write_graph(g.as_graph_def(), str(path.parent), path.name, as_text=False)
    return g.as_graph_def()


def test_tf1_graph_cut_at_its_image_input_with_the_training_flag_folded(tmp_path):
    from click.testing import CliRunner

    from volinfer.cli import main

    pb = tmp_path / "graph.pb"
    gd = _tf1_unet_behind_a_string_handle_iterator(pb)
    assert {"Switch", "Merge", "IteratorGetNext", "IteratorFromStringHandleV2"} <= {n.op for n in gd.node}
    xml = tmp_path / "m.xml"
    r = CliRunner().invoke(main, ["convert", str(pb), "--input", "img", "--set", "training=false", "-o", str(xml),
                                  "--tile", "16", "--no-speed-profile", "-q"])
    assert r.exit_code == 0, r.output
    m = ov.Core().read_model(str(xml))
    assert [sorted(p.output(0).get_names()) for p in m.get_parameters()] == [["img:0"]]
    ops = {op.get_type_name() for op in m.get_ops()}
    assert "RandomUniform" not in ops and "If" not in ops  # the dropout branch is gone, not just switched off
    # `--input img:0` names the same tensor; a wrong name: one line listing the graph's placeholders
    r = CliRunner().invoke(main, ["convert", str(pb), "--input", "img:0", "--set", "training=false", "-o",
                                  str(tmp_path / "m0.xml"), "--tile", "16", "--no-check", "--no-receptive-field",
                                  "--no-speed-profile", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["convert", str(pb), "--input", "image", "--set", "training=false", "-o",
                                  str(tmp_path / "x.xml")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "img, training" in r.output, r.output
    r = CliRunner().invoke(main, ["convert", str(pb), "--input", "img", "--set", "trianing=false", "-o",
                                  str(tmp_path / "x.xml")])
    assert r.exit_code == 2 and "trianing" in r.output and "training" in r.output, r.output
    # with default settings, against TensorFlow's own whole-volume output with training=False (odd shape)
    vol = np.random.default_rng(3).standard_normal((37, 30, 26)).astype(np.float32)
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.import_graph_def(gd, name="")
        with tf.compat.v1.Session(graph=g) as sess:
            want = sess.run("prob:0", {"img:0": vol[None, ..., None], "training:0": False})[0, ..., 0]
    got, rep = predict(vol, str(xml), kind="probabilities", report=True)
    got = np.asarray(got).squeeze()
    assert got.shape == want.shape
    a, b = got > 0.5, want > 0.5
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.99
    s = ModelSettings.from_model(m)
    assert s.size_multiple == 2  # its stride-2 pooling: tiles start at even voxels
    # the graph takes any size (SAME pooling, a transposed convolution to the skip's shape): one tile at the
    # volume's own odd size, nothing padded, is TensorFlow's own inference everywhere
    assert rep.tiles == 1 and rep.exact is True and "its own size 37x30x26" in rep.exact_meaning, rep.exact_meaning
    assert np.abs(got - want).max() < 0.02  # FP16 weights and bf16 where verified faithful
    # crop tiles (even offsets, margins = the receptive field) pad the volume to the size multiple: the one-tile
    # result beyond the padded plane's reach, and said not exact (the model computes otherwise on its own size)
    r = max(s.receptive_field)
    inner = tuple(slice(0, n - r - 1 if n % 2 else n) for n in vol.shape)
    tiled, rep = predict(vol, str(xml), kind="probabilities", tile=16, overlap=2 * r, report=True)
    assert rep.tiles > 1 and rep.exact is False
    assert any("padded to 38x30x26" in why and "--tile" in why for why in rep.not_exact), rep.not_exact
    np.testing.assert_allclose(np.asarray(tiled).squeeze()[inner], got[inner], atol=2e-3)
