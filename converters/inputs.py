"""Model inputs: parsing ``--set NAME=VALUE``, freezing inputs to constants in a converted model, picking the image
input, and one-line errors that list the real input names."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import openvino as ov

from volinfer.errors import VolinferError


def parse_set(items: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """``["training=false", "rate=0.5", "shape=[1,2]"]`` → ``{"training": False, "rate": 0.5, ...}``. Values are
    JSON (``true``/``false`` in any case, numbers, lists); anything else is refused with one line."""
    out: dict[str, Any] = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name.strip() or not text.strip():
            raise VolinferError(f"--set expects NAME=VALUE (e.g. training=false); got {item!r}")
        t = text.strip()
        if t.lower() in ("true", "false"):
            value: Any = t.lower() == "true"
        else:
            try:
                value = json.loads(t)
            except json.JSONDecodeError:
                raise VolinferError(f"--set {name}: value {t!r} is not a number, true/false or a JSON list") from None
            if not isinstance(value, (int, float, list)):
                raise VolinferError(f"--set {name}: value {t!r} is not a number, true/false or a JSON list")
            if not _finite(value):  # json reads NaN/Infinity: a frozen NaN turns every output NaN
                raise VolinferError(f"--set {name}: value {t!r} is not finite (NaN and infinities are refused)")
        out[name.strip()] = value
    return out


def _finite(value: Any) -> bool:
    """Whether a parsed ``--set`` value (a number, bool or nested list) holds only finite numbers."""
    try:
        return bool(np.isfinite(np.asarray(value, dtype=np.float64)).all())
    except (TypeError, ValueError):  # ragged or non-numeric lists: shape checks say what is wrong later
        return True


def param_names(param: ov.Node) -> set[str]:
    """Every name an input answers to: friendly name, tensor names, and both with/without TensorFlow's ``:0``."""
    names = {param.get_friendly_name(), *param.output(0).get_names()}
    return names | {n.rsplit(":", 1)[0] for n in names if n.rsplit(":", 1)[-1].isdigit()}


def describe_params(model: ov.Model) -> str:
    return ", ".join(sorted(p.get_friendly_name() for p in model.get_parameters())) or "(none)"


def find_param(model: ov.Model, name: str) -> ov.Node | None:
    base = name.rsplit(":", 1)[0] if name.rsplit(":", 1)[-1].isdigit() else name
    for p in model.get_parameters():
        names = param_names(p)
        if name in names or base in names:
            return p
    return None


def constant_for(param: ov.Node, value: Any, name: str) -> ov.Node:
    """A Constant of the parameter's element type and (static) shape holding ``value``."""
    dtype = param.get_element_type().to_dtype()
    arr = np.asarray(value, dtype=dtype)
    ps = param.get_output_partial_shape(0)
    if ps.is_static:
        shape = [d.get_length() for d in ps]
        try:
            arr = np.broadcast_to(arr, shape).copy()
        except ValueError:
            raise VolinferError(f"--set {name}: value of shape {list(arr.shape)} does not fit the input's shape "
                                f"{shape}") from None
    return ov.op.Constant(np.ascontiguousarray(arr))


def freeze_inputs(model: ov.Model, fixed: dict[str, Any]) -> ov.Model:
    """Replace each named Parameter by a Constant holding its ``--set`` value; the model keeps the other inputs."""
    if not fixed:
        return model
    params = list(model.get_parameters())
    for name, value in fixed.items():
        p = find_param(model, name)
        if p is None:
            raise VolinferError(f"--set {name}: the model has no input named {name!r}; its inputs: "
                                f"{describe_params(model)}")
        const = constant_for(p, value, name)
        for target in list(p.output(0).get_target_inputs()):
            target.replace_source_output(const.output(0))
        params.remove(p)
    return ov.Model(model.outputs, params, model.get_friendly_name())


def pick_image_input(model: ov.Model, image: str | None) -> ov.Model:
    """Check that one input is left (the image), or that the named one exists; errors list the real names."""
    params = model.get_parameters()
    if image is not None and find_param(model, image) is None:
        raise VolinferError(f"--input {image}: the converted model has no input of that name; its inputs: "
                            f"{describe_params(model)}")
    if len(params) != 1:
        raise VolinferError(f"the model has {len(params)} inputs ({describe_params(model)}); volinfer runs one "
                            f"image input: name it with --input and freeze the others with --set NAME=VALUE")
    return model


def _port_named(model: ov.Model, name: str) -> ov.Output | None:
    """The output port carrying tensor ``name`` (``:0`` optional), or the first output of a node of that name."""
    base = name.rsplit(":", 1)[0] if name.rsplit(":", 1)[-1].isdigit() else name
    for op in model.get_ordered_ops():
        for out in op.outputs():
            names = out.get_names()
            if name in names or base in names or f"{base}:0" in names:
                return out
    return next((op.output(0) for op in model.get_ordered_ops() if op.get_friendly_name() == base), None)


def _reachable_parameters(model_outputs: list[ov.Output]) -> list[ov.Node]:
    """The Parameters the outputs still depend on, in the order they are found."""
    seen: set[int] = set()
    found: list[ov.Node] = []
    todo = [o.get_node() for o in model_outputs]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.get_type_name() == "Parameter":
            found.append(node)
        todo.extend(i.get_source_output().get_node() for i in node.inputs())
    return found


def cut_inputs(model: ov.Model, names: list[str]) -> ov.Model | None:
    """``model`` cut at the named tensors (any format with named tensors, once converted): each becomes a new
    Parameter of its type and shape, everything only upstream of it is dropped. None when a name matches no
    tensor."""
    for name in names:
        if find_param(model, name) is not None:
            continue
        port = _port_named(model, name)
        if port is None:
            return None
        param = ov.op.Parameter(port.get_element_type(), port.get_partial_shape())
        param.set_friendly_name(name)
        param.output(0).set_names({name, *port.get_names()})
        for target in list(port.get_target_inputs()):
            target.replace_source_output(param.output(0))
    results = list(model.get_results())
    params = _reachable_parameters([r.output(0) for r in results])
    order = {id(p): i for i, p in enumerate(model.get_parameters())}
    params.sort(key=lambda p: order.get(id(p), -1))
    return ov.Model(results, params, model.get_friendly_name())
