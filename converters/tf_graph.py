"""Cutting a TF1 frozen graph at its image tensor, with TensorFlow's GraphDef protos (no session, nothing runs).

Published TF1 graphs feed their image through a ``tf.data`` iterator: ``img`` is a ``PlaceholderWithDefault`` whose
default is ``IteratorGetNext:0``, the iterator comes from ``IteratorFromStringHandle`` and a string ``Placeholder``,
and a ``training`` flag (``PlaceholderWithDefault``, default true) switches dropout through ``Switch``/``Merge``.
OpenVINO's converter only chooses among a graph's existing inputs, so the iterator's outputs stay inputs. Here:

- each ``--input`` node becomes a ``Placeholder`` of its own dtype and shape: everything upstream is dropped;
- each ``--set`` node becomes a ``Const`` holding its value: control flow on it is constant, and OpenVINO's
  frontend folds constant ``Switch``/``Merge`` so the dead branch (dropout) disappears;
- the graph keeps only what the outputs need; by default the outputs are the tensors computable from the cut
  inputs and constants alone that nothing else computable consumes (a loss that reads the iterator's labels is not
  computable from the image, so the prediction it reads becomes the output).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from volinfer.errors import VolinferError


def node_name(tensor: str) -> str:
    """``img:0`` / ``^img`` / ``img`` → ``img``."""
    return tensor.lstrip("^").rsplit(":", 1)[0] if tensor.rsplit(":", 1)[-1].isdigit() else tensor.lstrip("^")


def placeholders(graph: Any) -> list[str]:
    """Placeholder-like nodes: the names ``--input`` / ``--set`` usually take."""
    return [n.name for n in graph.node if n.op in ("Placeholder", "PlaceholderWithDefault")]


def _missing(name: str, graph: Any, what: str) -> VolinferError:
    return VolinferError(f"{what} {name}: the graph has no node of that name; its placeholders: "
                         f"{', '.join(placeholders(graph)) or '(none)'}")


def _as_placeholder(node: Any, graph: Any) -> None:
    """Turn ``node`` into a Placeholder of its output's dtype and shape (a PlaceholderWithDefault keeps both)."""
    import tensorflow as tf

    if node.op == "Placeholder":
        return
    if node.op == "PlaceholderWithDefault":
        dtype, shape = node.attr["dtype"].type, node.attr["shape"].shape
    else:  # an internal tensor: ask TensorFlow what it holds
        g = tf.Graph()
        with g.as_default():
            tf.compat.v1.import_graph_def(graph, name="")
        t = g.get_tensor_by_name(f"{node.name}:0")
        dtype, shape = t.dtype.as_datatype_enum, t.shape.as_proto()
    new = tf.compat.v1.NodeDef(name=node.name, op="Placeholder")
    new.attr["dtype"].type = dtype
    new.attr["shape"].shape.CopyFrom(shape)
    node.CopyFrom(new)


def _as_constant(node: Any, value: Any) -> None:
    """Turn ``node`` (a placeholder) into a Const holding ``value`` in the node's dtype and shape."""
    import tensorflow as tf

    if "dtype" not in node.attr:
        raise VolinferError(f"--set {node.name}: a {node.op} node, not an input that can be given a value")
    dtype = tf.dtypes.as_dtype(node.attr["dtype"].type)
    shape = [d.size for d in node.attr["shape"].shape.dim] if "shape" in node.attr else None
    arr = np.asarray(value, dtype=dtype.as_numpy_dtype)
    if shape is not None and all(d >= 0 for d in shape):
        try:
            arr = np.broadcast_to(arr, shape).copy()
        except ValueError:
            raise VolinferError(f"--set {node.name}: value of shape {list(arr.shape)} does not fit the input's "
                                f"shape {shape}") from None
    new = tf.compat.v1.NodeDef(name=node.name, op="Const")
    new.attr["dtype"].type = dtype.as_datatype_enum
    new.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(arr, dtype=dtype))
    node.CopyFrom(new)


def _consumers(graph: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(node_name(i), []).append(n.name)
    return out


def _computable(graph: Any, sources: set[str]) -> dict[str, bool]:
    """For every node: whether it can be computed from the ``sources`` and constants alone (iteratively: graphs are
    deep). A node without inputs is computable only when it is a Const or one of the sources."""
    nodes = {n.name: n for n in graph.node}
    state: dict[str, bool] = {}
    for root in nodes:
        stack = [root]
        while stack:
            top = stack[-1]
            if top in state:
                stack.pop()
                continue
            node = nodes.get(top)
            if node is None or top in sources or not node.input:
                state[top] = top in sources or (node is not None and node.op == "Const")
                stack.pop()
                continue
            todo = [node_name(i) for i in node.input if node_name(i) not in state]
            if todo:
                stack.extend(todo)
                continue
            state[top] = all(state[node_name(i)] for i in node.input)
            stack.pop()
    return state


def computable_sinks(graph: Any, image: str, inputs: list[str]) -> list[str]:
    """Nodes computable from the cut ``inputs`` and constants alone, fed by ``image``, that no other such node
    consumes: the graph's outputs once it is cut at ``image``."""
    ok = _computable(graph, {node_name(n) for n in inputs})
    consumers = _consumers(graph)
    fed, todo = set(), [image]
    while todo:
        name = todo.pop()
        if name not in fed and ok.get(name):
            fed.add(name)
            todo.extend(consumers.get(name, []))
    return sorted(n for n in fed if n != image and not any(c in fed for c in consumers.get(n, [])))


def upstream(graph: Any, targets: list[str]) -> Any:
    """The GraphDef of ``targets`` and everything they read (data and control inputs), in the original order, with
    the graph's function library and versions."""
    import tensorflow as tf

    nodes = {n.name: n for n in graph.node}
    keep, todo = set(), list(targets)
    while todo:
        name = todo.pop()
        if name not in keep and name in nodes:
            keep.add(name)
            todo.extend(node_name(i) for i in nodes[name].input)
    out = tf.compat.v1.GraphDef()
    out.node.extend(n for n in graph.node if n.name in keep)
    out.library.CopyFrom(graph.library)
    out.versions.CopyFrom(graph.versions)
    return out


def cut(graph: Any, inputs: list[str], fixed: dict[str, Any], outputs: list[str] | None) -> Any:
    """``graph`` cut at ``inputs`` (Placeholders), with ``fixed`` nodes made constants, trimmed to ``outputs``
    (default: :func:`computable_sinks` of the first input). Errors name the real placeholders."""
    nodes = {n.name: n for n in graph.node}
    for name in inputs:
        if node_name(name) not in nodes:
            raise _missing(name, graph, "--input")
    for name in fixed:
        if node_name(name) not in nodes:
            raise _missing(name, graph, "--set")
    for name in outputs or []:
        if node_name(name) not in nodes:
            raise VolinferError(f"--output-node {name}: the graph has no node of that name")
    for name in inputs:
        _as_placeholder(nodes[node_name(name)], graph)
    for name, value in fixed.items():
        _as_constant(nodes[node_name(name)], value)
    if outputs:
        targets = [node_name(o) for o in outputs]
    elif inputs:
        targets = computable_sinks(graph, node_name(inputs[0]), inputs)
        if not targets:
            raise VolinferError(f"--input {inputs[0]}: nothing in the graph is computable from it alone; name the "
                                f"output with --output-node")
    else:
        targets = [n.name for n in graph.node if not _consumers(graph).get(n.name)]
    return upstream(graph, targets)
