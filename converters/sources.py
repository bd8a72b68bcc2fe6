"""Recognising what the user handed to ``volinfer convert`` and loading it with the right framework."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import openvino as ov

from volinfer.errors import VolinferError

EXTRAS = {"torch": "torch", "tensorflow": "tensorflow"}


def require(module: str, extra: str) -> Any:
    """Import an optional framework, or fail with one line naming what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise VolinferError(
            f"this model needs {module}, which is not installed: pip install 'volinfer[{extra}]' (or pip install {module})"
        ) from None


@dataclass
class Source:
    """A loaded model: ``to_openvino(shape)`` converts it; ``run(x)`` runs the *original* on a numpy input."""

    framework: str
    path: Path | None
    to_openvino: Callable[..., ov.Model]  # (input shape with -1 for dynamic dims, example shape) -> model
    run: Callable[[np.ndarray], list[np.ndarray]]
    layout: str | None = None  # layout the framework implies (TensorFlow: channels last)
    reference_note: str = ""
    extras: dict[str, Any] = field(default_factory=dict)


def kind_of(spec: str) -> str:
    """Classify a model argument: torch-factory, torchscript/pickle, torch-export, onnx, savedmodel, frozen-pb,
    keras, openvino."""
    p = Path(spec)
    if ":" in spec and not p.exists():
        return "torch-factory"
    if not p.exists():
        raise VolinferError(f"{spec}: no such file or directory")
    if p.is_dir():
        if (p / "saved_model.pb").exists() or (p / "saved_model.pbtxt").exists():
            return "savedmodel"
        raise VolinferError(f"{spec}: directory is not a TensorFlow SavedModel (no saved_model.pb inside)")
    suffix = p.suffix.lower()
    kinds = {".onnx": "onnx", ".pt2": "torch-export", ".pb": "frozen-pb", ".keras": "keras", ".h5": "keras",
             ".xml": "openvino", ".pt": "torch-file", ".pth": "torch-file", ".ts": "torch-file", ".jit": "torch-file"}
    if suffix not in kinds:
        raise VolinferError(
            f"{spec}: unknown model type {suffix or '(no suffix)'}; expected .onnx, .pt/.pth (TorchScript), .pt2 "
            f"(torch.export), file.py:factory, a SavedModel directory, .pb, .keras/.h5 or .xml")
    return kinds[suffix]


def _load_factory(spec: str) -> Callable[..., Any]:
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise VolinferError(f"{target}: no such file")
        mod_spec = importlib.util.spec_from_file_location(f"volinfer_user_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        sys.modules[mod_spec.name] = module  # type: ignore[union-attr]
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise VolinferError(f"cannot import {target!r}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise VolinferError(f"{target} has no factory named {name!r}")
    return fn


def _check_state_dict(module: Any, state: dict[str, Any], weights: Path) -> None:
    own = set(module.state_dict().keys())
    given = set(state.keys())
    if own != given:
        missing, unexpected = sorted(own - given), sorted(given - own)
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s) e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s) e.g. {', '.join(unexpected[:3])}")
        raise VolinferError(f"{weights}: state_dict does not match the model: {'; '.join(parts)}")
    for k, v in module.state_dict().items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise VolinferError(f"{weights}: {k} has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}")


def _torch_source(module: Any, framework: str, path: Path | None, torch: Any) -> Source:
    try:
        module.eval()
    except NotImplementedError:  # torch.export modules are already inference graphs and refuse eval()
        pass

    def to_ov(shape: list[int] | None, example_shape: list[int] | None = None) -> ov.Model:
        example = torch.zeros(example_shape or [1, 1, 64, 64, 64])
        inp = [ov.PartialShape(shape)] if shape is not None else None
        try:
            with torch.no_grad():
                if inp is None:
                    return ov.convert_model(module, example_input=example)
                return ov.convert_model(module, example_input=example, input=inp)
        except Exception as e:
            raise VolinferError(f"OpenVINO could not convert the {framework} model: {_last_line(e)}") from None

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x)))
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.detach().cpu().numpy() for o in outs]

    return Source(framework, path, to_ov, run, reference_note="PyTorch (eager)", extras={"module": module})


def load(spec: str, *, weights: str | None = None, trust_pickle: bool = False,
         factory_kwargs: dict[str, Any] | None = None, inputs: list[str] | None = None,
         outputs: list[str] | None = None) -> Source:
    """Load the model named by ``spec`` (see :func:`kind_of`) into a :class:`Source`."""
    kind = kind_of(spec)
    path = None if kind == "torch-factory" else Path(spec)
    if kind == "torch-factory":
        torch = require("torch", "torch")
        factory = _load_factory(spec)
        try:
            module = factory(**(factory_kwargs or {}))
        except TypeError as e:
            raise VolinferError(f"calling {spec}() failed: {e}") from None
        if weights:
            wpath = Path(weights)
            if not wpath.exists():
                raise VolinferError(f"{weights}: no such weights file")
            try:
                state = torch.load(str(wpath), map_location="cpu", weights_only=True)
            except Exception as e:
                raise VolinferError(f"{weights}: cannot load as a state_dict with weights_only=True ({e})"[:400]) from None
            if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
                state = state["state_dict"]
            _check_state_dict(module, state, wpath)
            module.load_state_dict(state)
        return _torch_source(module, "pytorch", Path(spec.rpartition(":")[0]), torch)
    if kind == "torch-file":
        torch = require("torch", "torch")
        try:
            module = torch.jit.load(str(path), map_location="cpu")
            return _torch_source(module, "torchscript", path, torch)
        except RuntimeError:
            pass
        if not trust_pickle:
            raise VolinferError(
                f"{spec}: not TorchScript; it looks like a pickled module or a state_dict. Unpickling runs code from "
                f"the file, so it is refused: save TorchScript/torch.export instead, use file.py:factory --weights, "
                f"or pass --trust-pickle if you trust the file")
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
        if not isinstance(obj, torch.nn.Module):
            raise VolinferError(f"{spec}: holds a {type(obj).__name__}, not a module; use file.py:factory --weights")
        return _torch_source(obj, "pytorch-pickle", path, torch)
    if kind == "torch-export":
        torch = require("torch", "torch")
        try:
            program = torch.export.load(str(path))
        except Exception as e:
            raise VolinferError(f"{spec}: cannot load as torch.export program ({e})"[:400]) from None
        src = _torch_source(program.module(), "torch.export", path, torch)
        src.to_openvino = lambda *_: ov.convert_model(program)  # exported programs carry their own shapes
        return src
    if kind == "onnx":
        return _frontend_source("onnx", path, inputs, outputs)  # type: ignore[arg-type]
    if kind in ("savedmodel", "frozen-pb"):
        return _frontend_source("tensorflow-" + kind, path, inputs, outputs, layout="NDHWC")  # type: ignore[arg-type]
    if kind == "keras":
        tf = require("tensorflow", "tensorflow")
        keras_model = tf.keras.models.load_model(str(path))
        src = Source("keras", path, lambda *_: ov.convert_model(keras_model),
                     lambda x: [np.asarray(keras_model(x, training=False))], layout="NDHWC",
                     reference_note="TensorFlow/Keras")
        return src
    return _frontend_source("openvino", path, None, None)  # type: ignore[arg-type]


def _convert_tf_subgraph(path: Path, inputs: list[str] | None, outputs: list[str]) -> ov.Model:
    """Cut a frozen GraphDef at named output nodes with TensorFlow's own graph tools, then convert the cut graph
    (OpenVINO's converter only selects among a graph's existing outputs)."""
    import tempfile

    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(path.read_bytes())
    names = {n.name for n in graph.node}
    missing = [o for o in outputs if o.split(":")[0] not in names]
    if missing:
        raise VolinferError(f"{path}: no node named {missing[0]!r} to cut the graph at")
    sub = tf.compat.v1.graph_util.extract_sub_graph(graph, [o.split(":")[0] for o in outputs])
    with tempfile.TemporaryDirectory() as tmp:
        cut = Path(tmp) / "cut.pb"
        cut.write_bytes(sub.SerializeToString())
        try:
            return ov.convert_model(str(cut), **({"input": inputs} if inputs else {}))
        except Exception as e:
            if inputs and "not found among model inputs" in str(e):
                return ov.convert_model(str(cut), input=[n if ":" in n else f"{n}:0" for n in inputs])
            raise VolinferError(f"{path}: OpenVINO cannot convert the cut graph: {_last_line(e)}") from None


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


def _last_line(e: BaseException) -> str:
    """The most specific line of a (often multi-paragraph) framework error."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(("Please", "You can"))]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _frontend_source(framework: str, path: Path, inputs: list[str] | None, outputs: list[str] | None,
                     layout: str | None = None) -> Source:
    """Formats OpenVINO reads itself (ONNX, TensorFlow graphs, IR). The reference runs the original file through
    onnxruntime / TensorFlow when installed, else through OpenVINO's own frontend at full precision (which still
    checks what conversion changed: weight compression, reshaping, graph cutting)."""
    def convert(inp: list[str] | None) -> ov.Model:
        try:
            if framework == "openvino":
                return ov.Core().read_model(str(path))
            return ov.convert_model(str(path), **({"input": inp} if inp else {}))
        except Exception as e:
            if inp and "not found among model inputs" in str(e) and not any(":" in n for n in inp):
                return convert([f"{n}:0" for n in inp])  # TF tensor names carry an output index
            raise VolinferError(f"{path}: OpenVINO cannot convert it: {_last_line(e)}") from None

    def to_ov(*_: object) -> ov.Model:
        if outputs and framework == "tensorflow-frozen-pb" and importlib.util.find_spec("tensorflow"):
            return _convert_tf_subgraph(path, inputs, outputs)
        model = convert(inputs)
        return cut_outputs(model, outputs, path) if outputs else model
    ref_model: dict[str, Any] = {}

    def run(x: np.ndarray) -> list[np.ndarray]:
        if framework == "tensorflow-savedmodel" and importlib.util.find_spec("tensorflow"):
            import tensorflow as tf

            fn = ref_model.setdefault("tf", tf.saved_model.load(str(path))).signatures["serving_default"]
            name = list(fn.structured_input_signature[1].keys())[0]
            return [np.asarray(v) for v in fn(**{name: tf.constant(x)}).values()]
        if framework == "onnx" and importlib.util.find_spec("onnxruntime"):
            import onnxruntime as ort

            sess = ref_model.setdefault("ort", ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
            return list(sess.run(None, {sess.get_inputs()[0].name: x}))
        m = ref_model.setdefault("ov", to_ov())
        m2 = m.clone()
        m2.reshape({0: list(x.shape)})
        cm = ov.Core().compile_model(m2, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        res = cm(x)
        return [np.asarray(res[o]) for o in cm.outputs]

    if framework == "onnx" and importlib.util.find_spec("onnxruntime"):
        note = "onnxruntime"
    elif framework == "tensorflow-savedmodel" and importlib.util.find_spec("tensorflow"):
        note = "TensorFlow"
    else:
        note = "OpenVINO frontend on the original file, f32"
    return Source(framework, path, to_ov, run, layout=layout, reference_note=note)
