"""Recognising what the user handed to ``volinfer convert`` and loading it with the right framework.

Every file that could carry code goes through :mod:`converters.safe_load` first. Each loader returns a
:class:`Source`: ``to_openvino`` converts it, ``run`` runs the *original* in its own framework (PyTorch, onnxruntime,
TensorFlow) for the parity check, with the same ``--set`` values fed to it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import openvino as ov

from volinfer.errors import VolinferError

from . import safe_load
from .frontends import frontend_source
from .messages import framework_errors, framework_message
from .source import ReferenceUnavailable, Source, require

__all__ = ["EXTRAS", "ReferenceUnavailable", "Source", "kind_of", "load", "load_factory", "require"]

EXTRAS = {"torch": "torch", "tensorflow": "tensorflow"}


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


def load_factory(spec: str) -> Callable[..., Any]:
    """Import the user's factory. Importing ``file.py`` runs it: the user named that code on the command line."""
    target, _, name = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.exists():
            raise VolinferError(f"{target}: no such file")
        mod_spec = importlib.util.spec_from_file_location(f"volinfer_user_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        sys.modules[mod_spec.name] = module  # type: ignore[union-attr]
        try:
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as e:
            sys.modules.pop(mod_spec.name, None)  # type: ignore[union-attr]
            line = getattr(e, "lineno", None) or _user_line(e, path)
            raise VolinferError(f"{target}: importing it failed{f' (line {line})' if line else ''}: "
                                f"{type(e).__name__}: {framework_message(e)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise VolinferError(f"cannot import {target!r}: {type(e).__name__}: {framework_message(e)}") from None
    fn = getattr(module, name, None)
    if fn is None or not callable(fn):
        raise VolinferError(f"{target} has no factory named {name!r}")
    return fn


def _user_line(e: BaseException, path: Path) -> int | None:
    tb, line = e.__traceback__, None
    while tb is not None:
        if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def load_weights_into(module: Any, weights: Path) -> None:
    """Load a state_dict with torch's own ``load_state_dict(strict=True)`` semantics (e.g. BatchNorm state_dicts
    saved before ``num_batches_tracked`` existed are accepted, as torch accepts them); torch's error in one line."""
    state = safe_load.load_state_dict(weights)
    for key in ("state_dict", "model_state_dict", "model"):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise VolinferError(f"{weights}: holds a {type(state).__name__}, not a state_dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise VolinferError(f"{weights}: state_dict does not match the model (torch load_state_dict, strict): "
                            f"{_summarise_state_dict_error(str(e))}") from None


def _summarise_state_dict_error(text: str) -> str:
    """torch's multi-line ``Error(s) in loading state_dict`` as one line: each problem with its first keys."""
    parts = []
    for raw in text.splitlines()[1:] or text.splitlines():
        ln = raw.strip()
        if not ln:
            continue
        head, _, keys = ln.partition(": ")
        names = [k.strip().strip('"') for k in keys.rstrip(".").split(",")] if keys and "key" in head else []
        if names:
            more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
            word = head.split()[0].lower()  # "Missing" / "Unexpected"
            parts.append(f"{word} {len(names)} key(s): {', '.join(names[:3])}{more}")
        else:
            parts.append(ln.rstrip("."))
    return "; ".join(parts[:4])[:400]


def _forward_params(module: Any) -> list[str] | None:
    try:
        return [p for p in inspect.signature(module.forward).parameters if p != "self"]
    except (TypeError, ValueError, AttributeError):
        return None


def _bind_inputs(module: Any, torch: Any, image: str | None, fixed: dict[str, Any]) -> Any:
    """A module whose only input is the image: ``--input`` names the forward argument it goes to, ``--set`` values
    are passed as the other arguments (the same for conversion and for the PyTorch reference)."""
    if not image and not fixed:
        return module
    names = _forward_params(module)
    if names is not None:
        for n in [image, *fixed] if image else list(fixed):
            if n not in names:
                raise VolinferError(f"the model has no input named {n!r}; its inputs: {', '.join(names)}")
    values = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in fixed.items()}

    class Bound(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module

        def forward(self, x: Any) -> Any:
            return self.inner(**{image: x}, **values) if image else self.inner(x, **values)

    return Bound()


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
            raise VolinferError(f"OpenVINO could not convert the {framework} model: {framework_message(e)}") from None

    def run(x: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            out = module(torch.from_numpy(np.ascontiguousarray(x)))
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [o.detach().cpu().numpy() for o in outs]

    return Source(framework, path, to_ov, run, reference_note="PyTorch (eager)", extras={"module": module})


def _load_torch_factory(spec: str, weights: str | None, random_weights: bool,
                        factory_kwargs: dict[str, Any] | None, torch: Any) -> Any:
    factory = load_factory(spec)
    if not weights and not random_weights:
        raise VolinferError(f"{spec}: a factory builds an untrained network; pass --weights state_dict.pth (or "
                            f"--random-weights to convert it with the weights the factory makes)")
    try:
        module = factory(**(factory_kwargs or {}))
    except Exception as e:
        raise VolinferError(f"calling {spec}() failed: {type(e).__name__}: {framework_message(e)}") from None
    if not isinstance(module, torch.nn.Module):
        raise VolinferError(f"{spec}() returned a {type(module).__name__}, not a torch.nn.Module")
    if weights:
        load_weights_into(module, Path(weights))
    return module


def _load_torch_file(path: Path, trust_pickle: bool, torch: Any) -> tuple[Any, str]:
    """TorchScript when the file is one (its pickles scanned first); a pickled module only with --trust-pickle."""
    import zipfile

    is_script = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            is_script = any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in z.namelist())
    if is_script:
        if not trust_pickle:
            hits = safe_load.scan_zip(path, safe_load.torch_allowed_globals(), safe_load._TORCHSCRIPT_GLOBALS)
            if hits:
                safe_load.refuse(path, "the TorchScript archive", hits)
        with framework_errors(f"{path}: cannot load as TorchScript"):
            return torch.jit.load(str(path), map_location="cpu"), "torchscript"
    if not trust_pickle:
        raise VolinferError(
            f"{path}: not TorchScript; it looks like a pickled module or a state_dict. Unpickling runs code from "
            f"the file, so it is refused: save TorchScript/torch.export instead, use file.py:factory --weights, "
            f"or {safe_load.TRUST_HINT}")
    with framework_errors(f"{path}: cannot unpickle it"):
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    if not isinstance(obj, torch.nn.Module):
        raise VolinferError(f"{path}: holds a {type(obj).__name__}, not a module; use file.py:factory --weights")
    return obj, "pytorch-pickle"


def _load_torch_export(path: Path, trust_pickle: bool, torch: Any) -> Any:
    """A ``.pt2`` archive: every pickle in it (weights, constants, sample inputs, nested ``torch.save`` files) is
    scanned, and torch's loader runs with unpickling restricted to tensors, unless --trust-pickle."""
    if trust_pickle:
        with framework_errors(f"{path}: cannot load as a torch.export program"):
            return torch.export.load(str(path))
    hits = safe_load.scan_zip(path, safe_load.torch_allowed_globals())
    if hits:
        safe_load.refuse(path, "the torch.export archive", hits)
    try:
        with safe_load.torch_unpickling_restricted():
            return torch.export.load(str(path))
    except Exception as e:
        import pickle

        msg = framework_message(e)
        if isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e) or "Unsupported global" in str(e):
            raise VolinferError(f"{path}: the torch.export archive holds pickled Python objects ({msg[:120]}); "
                                f"unpickling runs code, so it is refused: {safe_load.TRUST_HINT}") from None
        raise VolinferError(f"{path}: cannot load as a torch.export program: {msg}") from None


def _load_torch(kind: str, spec: str, *, weights: str | None, random_weights: bool, trust_pickle: bool,
                factory_kwargs: dict[str, Any] | None, image: str | None, fixed: dict[str, Any]) -> Source:
    torch = require("torch", "torch")
    if weights and kind != "torch-factory":
        raise VolinferError("--weights is for file.py:factory / package.module:factory models only")
    if kind == "torch-factory":
        module = _load_torch_factory(spec, weights, random_weights, factory_kwargs, torch)
        return _torch_source(_bind_inputs(module, torch, image, fixed), "pytorch", Path(spec.rpartition(":")[0]),
                             torch)
    path = Path(spec)
    if kind == "torch-file":
        module, framework = _load_torch_file(path, trust_pickle, torch)
        return _torch_source(_bind_inputs(module, torch, image, fixed), framework, path, torch)
    program = _load_torch_export(path, trust_pickle, torch)
    src = _torch_source(_bind_inputs(program.module(), torch, image, fixed), "torch.export", path, torch)

    def to_ov(*_: object) -> ov.Model:  # exported programs carry their own shapes
        with framework_errors(f"OpenVINO could not convert the torch.export program {path}"):
            return ov.convert_model(program)

    src.to_openvino = to_ov
    src.pending_fixed = dict(fixed)
    return src


def load(spec: str, *, weights: str | None = None, trust_pickle: bool = False, random_weights: bool = False,
         factory_kwargs: dict[str, Any] | None = None, inputs: list[str] | None = None,
         outputs: list[str] | None = None, fixed: dict[str, Any] | None = None) -> Source:
    """Load the model named by ``spec`` (see :func:`kind_of`) into a :class:`Source`. ``inputs[0]`` names the
    image input (the rest, TensorFlow only, are further cut points); ``fixed`` holds ``--set`` values."""
    kind = kind_of(spec)
    fixed = dict(fixed or {})
    if random_weights and weights:
        raise VolinferError("--random-weights contradicts --weights: pass one (the IR would hold the trained weights)")
    if random_weights and kind != "torch-factory":
        raise VolinferError("--random-weights is for file.py:factory / package.module:factory models only (this "
                            "model file carries its own weights)")
    if kind.startswith("torch"):
        if inputs and len(inputs) > 1:
            raise VolinferError("a PyTorch model takes one --input (the forward argument the image goes to)")
        return _load_torch(kind, spec, weights=weights, random_weights=random_weights, trust_pickle=trust_pickle,
                           factory_kwargs=factory_kwargs, image=inputs[0] if inputs else None, fixed=fixed)
    if weights:
        raise VolinferError("--weights is for file.py:factory / package.module:factory models only")
    path = Path(spec)
    if kind == "keras":
        return _keras_source(path, trust_pickle, inputs, fixed)
    framework = {"onnx": "onnx", "savedmodel": "tensorflow-savedmodel", "frozen-pb": "tensorflow-frozen-pb",
                 "openvino": "openvino"}[kind]
    return frontend_source(framework, path, inputs, outputs, fixed, trust_pickle,
                           layout="NDHWC" if framework.startswith("tensorflow") else None)


def _keras_source(path: Path, trust_pickle: bool, inputs: list[str] | None, fixed: dict[str, Any]) -> Source:
    """Keras ``.keras`` / ``.h5``: Lambda layers hold Python bytecode and are refused unless --trust-pickle
    (found in the stored config before Keras deserialises anything; Keras' own ``safe_mode`` behind that)."""
    lambdas = safe_load.keras_lambda_layers(path)
    if lambdas and not trust_pickle:
        raise VolinferError(f"{path}: Keras Lambda layer {lambdas[0]!r} holds Python code; loading it runs that "
                            f"code, so it is refused: {safe_load.TRUST_HINT}")
    tf = require("tensorflow", "tensorflow")
    with framework_errors(f"{path}: Keras cannot load it"):
        keras_model = tf.keras.models.load_model(str(path), compile=False, safe_mode=not trust_pickle)
    names = [t.name.split(":")[0] for t in keras_model.inputs]
    for n in ([inputs[0]] if inputs else []) + list(fixed):
        if n not in names:
            raise VolinferError(f"{path}: the model has no input named {n!r}; its inputs: {', '.join(names)}")
    image = inputs[0] if inputs else next((n for n in names if n not in fixed), names[0])

    def feed(x: np.ndarray) -> Any:
        if len(names) == 1:
            return x
        return {n: (x if n == image else np.asarray(fixed[n])) for n in names}

    def to_ov(*_: object) -> ov.Model:
        with framework_errors(f"OpenVINO could not convert the Keras model {path}"):
            return ov.convert_model(keras_model)

    def run(x: np.ndarray) -> list[np.ndarray]:
        out = keras_model(feed(x), training=False)
        outs = out if isinstance(out, (list, tuple)) else list(out.values()) if isinstance(out, dict) else [out]
        return [np.asarray(o) for o in outs]

    return Source("keras", path, to_ov, run, layout="NDHWC", reference_note="TensorFlow/Keras",
                  pending_fixed=dict(fixed) if len(names) > 1 else {})
