"""Formats OpenVINO reads itself: ONNX, TensorFlow SavedModel / frozen graph, OpenVINO IR.

The parity reference runs the original file in its own framework: ONNX in onnxruntime, TensorFlow graphs in
TensorFlow (the same ``--input`` cut and ``--set`` feeds). When that framework is not installed the reference is
unavailable and parity is reported "not checked" — never computed with OpenVINO on both sides.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from volinfer.errors import VolinferError

from . import tf_graph
from .inputs import cut_inputs, describe_params, freeze_inputs
from .messages import framework_message
from .source import ReferenceUnavailable, Source, require

#: TensorFlow ops that touch files or run Python: refused in a frozen graph that TensorFlow would run for parity.
TF_SIDE_EFFECT_OPS = {"WriteFile", "ReadFile", "PyFunc", "PyFuncStateless", "EagerPyFunc", "MatchingFiles",
                      "Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints", "DeleteSessionTensor", "PrintV2"}


def _tf_graph_def(path: Path) -> Any:
    tf = require("tensorflow", "tensorflow")
    graph = tf.compat.v1.GraphDef()
    try:
        graph.ParseFromString(path.read_bytes())
    except Exception as e:
        raise VolinferError(f"{path}: not a TensorFlow GraphDef: {framework_message(e)}") from None
    return graph


def tf_graph_inputs(path: Path) -> list[str]:
    """Placeholder-like nodes of a frozen graph: the names ``--input`` / ``--set`` can use."""
    return tf_graph.placeholders(_tf_graph_def(path))


def _candidates(framework: str, path: Path) -> str:
    if framework == "tensorflow-frozen-pb" and importlib.util.find_spec("tensorflow"):
        return ", ".join(tf_graph_inputs(path)) or "(none)"
    try:
        return describe_params(ov.convert_model(str(path)))
    except Exception:
        return "(could not list them)"


def _convert(framework: str, path: Path, cut: list[str] | None) -> ov.Model:
    """Convert, cutting the graph at the ``cut`` inputs when given; a name OpenVINO does not know → one line
    listing the model's real input names."""
    try:
        if framework == "openvino":
            return ov.Core().read_model(str(path))
        return ov.convert_model(str(path), **({"input": cut} if cut else {}))
    except Exception as e:
        text = str(e)
        if cut and not any(":" in n for n in cut) and framework.startswith("tensorflow"):
            try:  # TF tensor names carry an output index
                return ov.convert_model(str(path), input=[f"{n}:0" for n in cut])
            except Exception:
                pass
        if cut and ("not found" in text or "isn't found" in text or "does not exist" in text
                    or "No node" in text or "Cannot find" in text):
            inside = _cut_after_conversion(framework, path, cut)  # OpenVINO cuts only at existing inputs
            if inside is not None:
                return inside
            raise VolinferError(f"{path}: no input or tensor named {', '.join(cut)}; the model's inputs: "
                                f"{_candidates(framework, path)}") from None
        if "Cannot recognize input model" in text:
            raise VolinferError(f"{path}: not a {framework.replace('-', ' ')} model OpenVINO can read (it "
                                f"recognises no model format in the file)") from None
        raise VolinferError(f"{path}: OpenVINO cannot convert it: {framework_message(e)}") from None


def _cut_after_conversion(framework: str, path: Path, cut: list[str]) -> ov.Model | None:
    """The whole model converted, then cut at the named internal tensors (:func:`converters.inputs.cut_inputs`);
    None when a name matches no tensor or the model does not convert."""
    try:
        model = ov.Core().read_model(str(path)) if framework == "openvino" else ov.convert_model(str(path))
    except Exception:  # noqa: BLE001 - the caller reports the name
        return None
    return cut_inputs(model, cut)


def _ir_cut(model: ov.Model, names: list[str], path: Path) -> ov.Model:
    """An IR cut at the named tensors (its inputs, or internal tensors); one line listing its inputs when a name
    matches nothing."""
    cut = cut_inputs(model, names)
    if cut is None:
        raise VolinferError(f"{path}: no input or tensor named {', '.join(names)}; the model's inputs: "
                            f"{describe_params(model)}")
    return cut


def _cut_tf_graph(path: Path, inputs: list[str], fixed: dict[str, Any], outputs: list[str] | None) -> ov.Model:
    """A frozen graph cut at ``inputs`` with ``fixed`` nodes made constants (:func:`converters.tf_graph.cut`),
    converted by OpenVINO; errors name the user's file, never the temporary one."""
    import tempfile

    try:
        sub = tf_graph.cut(_tf_graph_def(path), inputs, fixed, outputs)
    except VolinferError as e:
        raise VolinferError(f"{path}: {e}") from None
    with tempfile.TemporaryDirectory() as tmp:
        cut_path = Path(tmp) / "cut.pb"
        cut_path.write_bytes(sub.SerializeToString())
        try:
            return _convert("tensorflow-frozen-pb", cut_path, [tf_graph.node_name(n) for n in inputs] or None)
        except VolinferError as e:
            raise VolinferError(str(e).replace(str(cut_path), str(path))) from None


def cut_outputs(model: ov.Model, names: list[str], path: Path) -> ov.Model:
    """Keep only the graph up to the named nodes (TensorFlow node names survive conversion as friendly or tensor
    names), e.g. to drop a post-processing tail or pick an intermediate feature map."""
    found = []
    ops = model.get_ordered_ops()
    for name in names:
        base = name.split(":")[0]
        hit = next((op for op in ops if op.get_friendly_name() == base), None)
        if hit is None:
            hit = next((op for op in ops for o in op.outputs() if name in o.get_names() or base in o.get_names()),
                       None)
        if hit is None:
            raise VolinferError(f"{path}: no node named {name!r} to cut the graph at (cutting a TensorFlow graph at "
                                f"an internal node needs TensorFlow installed)")
        found.append(hit.output(int(name.split(":")[1]) if ":" in name else 0))
    return ov.Model(found, model.get_parameters(), model.get_friendly_name())


def frontend_source(framework: str, path: Path, inputs: list[str] | None, outputs: list[str] | None,
                    fixed: dict[str, Any], trust_pickle: bool, layout: str | None = None) -> Source:
    """A :class:`Source` for a format OpenVINO reads itself. ``inputs`` cut the graph (the first is the image),
    ``fixed`` names are cut there too so that they become inputs to freeze."""
    cut = [*inputs, *[k for k in fixed if k not in inputs]] if inputs else None
    state: dict[str, Any] = {}
    if framework == "tensorflow-frozen-pb" and importlib.util.find_spec("tensorflow") and not trust_pickle:
        bad = sorted({n.op for n in _tf_graph_def(path).node} & TF_SIDE_EFFECT_OPS)
        if bad:
            raise VolinferError(f"{path}: the graph holds ops that touch files or run Python ({', '.join(bad)}); "
                                f"running it for the parity check could act on this machine, so it is refused: "
                                f"pass --trust-pickle only if you trust whoever made the file")

    def to_ov(*_: object) -> ov.Model:
        if (outputs or cut) and framework == "tensorflow-frozen-pb" and importlib.util.find_spec("tensorflow"):
            model = _cut_tf_graph(path, list(inputs or []), fixed, outputs)
            src.pending_fixed = {}  # folded into the graph as constants
        else:
            model = _convert(framework, path, cut if framework != "openvino" else None)
            if framework == "openvino" and inputs:
                model = _ir_cut(model, inputs, path)
            model = cut_outputs(model, outputs, path) if outputs else model
        state["outputs"] = [sorted(o.get_names()) for o in model.outputs]
        return model

    runners = {"onnx": _onnx_runner, "tensorflow-savedmodel": _savedmodel_runner,
               "tensorflow-frozen-pb": _frozen_runner, "openvino": _ir_runner}
    run, note = runners[framework](path, inputs[0] if inputs else None, outputs, fixed, state)
    src = Source(framework, path, to_ov, run, layout=layout, reference_note=note, pending_fixed=dict(fixed))
    return src


def _onnx_runner(path: Path, image: str | None, outputs: list[str] | None, fixed: dict[str, Any],
                 state: dict[str, Any]) -> tuple[Any, str]:
    if not importlib.util.find_spec("onnxruntime"):
        def missing(x: np.ndarray) -> list[np.ndarray]:
            raise ReferenceUnavailable("onnxruntime is not installed (pip install onnxruntime)")
        return missing, "onnxruntime"
    types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(float16)": np.float16}

    def run(x: np.ndarray) -> list[np.ndarray]:
        import onnxruntime as ort

        if "ort" not in state:
            state["ort"] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        sess = state["ort"]
        ins = {i.name: i for i in sess.get_inputs()}
        name = image or next((n for n in ins if n not in fixed), None)
        if name not in ins:
            raise ReferenceUnavailable(f"onnxruntime cannot feed {name!r} (not a graph input: the graph was cut)")
        feed = {name: x.astype(types.get(ins[name].type, np.float32))}
        for k, v in fixed.items():
            if k in ins:
                shape = [d if isinstance(d, int) else 1 for d in ins[k].shape]
                feed[k] = np.broadcast_to(np.asarray(v, types.get(ins[k].type, np.float32)), shape).copy()
        try:
            return list(sess.run(outputs or None, feed))
        except Exception as e:
            raise ReferenceUnavailable(f"onnxruntime could not run it: {framework_message(e)}") from None

    return run, "onnxruntime"


def _savedmodel_runner(path: Path, image: str | None, outputs: list[str] | None, fixed: dict[str, Any],
                       state: dict[str, Any]) -> tuple[Any, str]:
    if not importlib.util.find_spec("tensorflow"):
        def missing(x: np.ndarray) -> list[np.ndarray]:
            raise ReferenceUnavailable("TensorFlow is not installed")
        return missing, "TensorFlow"

    def run(x: np.ndarray) -> list[np.ndarray]:
        import tensorflow as tf

        fn = state.setdefault("tf", tf.saved_model.load(str(path))).signatures["serving_default"]
        specs = fn.structured_input_signature[1]
        name = (image.split(":")[0] if image else None) or next((n for n in specs if n not in fixed), None)
        if name not in specs:
            raise ReferenceUnavailable(f"the serving signature has no input {name!r} (inputs: {', '.join(specs)})")
        feed = {name: tf.constant(x)}
        feed.update({k: tf.constant(v, dtype=specs[k].dtype) for k, v in fixed.items() if k in specs})
        return [np.asarray(v) for v in fn(**feed).values()]

    return run, "TensorFlow"


def _frozen_runner(path: Path, image: str | None, outputs: list[str] | None, fixed: dict[str, Any],
                   state: dict[str, Any]) -> tuple[Any, str]:
    """A TF1 frozen graph in a TF1 session: the image fed at ``--input`` (overriding a PlaceholderWithDefault and
    whatever iterator feeds it), ``--set`` values fed at their nodes, outputs fetched by the converted model's
    output names."""
    if not importlib.util.find_spec("tensorflow"):
        def missing(x: np.ndarray) -> list[np.ndarray]:
            raise ReferenceUnavailable("TensorFlow is not installed")
        return missing, "TensorFlow"

    def tensor(name: str) -> str:
        return name if ":" in name and name.rsplit(":", 1)[1].isdigit() else f"{name}:0"

    def run(x: np.ndarray) -> list[np.ndarray]:
        import tensorflow as tf

        if "session" not in state:
            g = tf.Graph()
            with g.as_default():
                tf.compat.v1.import_graph_def(_tf_graph_def(path), name="")
            state["session"] = tf.compat.v1.Session(graph=g)
        sess = state["session"]
        names = image or next((n for n in tf_graph_inputs(path) if n not in fixed), None)
        if names is None:
            raise ReferenceUnavailable("the graph has no placeholder to feed the image at; name it with --input")
        fetch = [tensor(o) for o in outputs] if outputs else [_tf_output_name(n, sess.graph)
                                                              for n in state.get("outputs", [])]
        feed = {tensor(names): x, **{tensor(k): v for k, v in fixed.items()}}
        try:
            return list(sess.run(fetch, feed_dict=feed))
        except Exception as e:
            raise ReferenceUnavailable(f"TensorFlow could not run the graph: {framework_message(e)}") from None

    return run, "TensorFlow"


def _tf_output_name(names: list[str], graph: Any) -> str:
    """The TensorFlow tensor behind an OpenVINO output (its tensor names keep the TF node name)."""
    for n in names:
        t = n if ":" in n else f"{n}:0"
        try:
            graph.get_tensor_by_name(t)
            return t
        except (KeyError, ValueError):
            continue
    raise ReferenceUnavailable(f"cannot find the TensorFlow tensor for output {names}")


def _ir_runner(path: Path, image: str | None, outputs: list[str] | None, fixed: dict[str, Any],
               state: dict[str, Any]) -> tuple[Any, str]:
    """An IR source is its own reference: the original file in OpenVINO at f32 (this checks what re-describing
    changed: weight compression, reshaping, freezing)."""
    def run(x: np.ndarray) -> list[np.ndarray]:
        m = freeze_inputs(ov.Core().read_model(str(path)), fixed)
        m = _ir_cut(m, [image], path) if image else m  # the same cut as the conversion
        m.reshape({0: list(x.shape)})
        cm = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        res = cm(x)
        return [np.asarray(res[o]) for o in cm.outputs]

    return run, "OpenVINO (the source IR, f32)"
