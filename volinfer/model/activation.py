"""What a model's output already is: raw logits, or probabilities from a final Softmax / Sigmoid / LogSoftmax.

Many published networks end in an activation. Applying another one (softmax of probabilities, sigmoid of a sigmoid)
silently changes labels and writes wrong probabilities, so the graph is read before an activation is chosen.
"""

from __future__ import annotations

import openvino as ov

#: Ops that only move, cast or reshape values: an activation before them still decides what the output is.
_TRANSPARENT = {"Convert", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Result", "Slice",
                "StridedSlice", "Interpolate", "Pad"}
_ACTIVATIONS = {"Softmax": "softmax", "Sigmoid": "sigmoid", "LogSoftmax": "logsoftmax", "HSigmoid": "sigmoid"}

#: What each detected final activation means for the stored ``outputs`` setting.
OUTPUT_KIND = {"softmax": "probabilities", "sigmoid": "probabilities", "logsoftmax": "log-probabilities"}


def graph_activation(model: ov.Model, output_index: int = 0, channel_axis: int | None = None) -> str | None:
    """The activation the graph applies last on output ``output_index``: ``"softmax"``, ``"sigmoid"``,
    ``"logsoftmax"``, or None when the output is not an activation's (logits, regression).

    A Softmax/LogSoftmax counts only over the channel axis when ``channel_axis`` (of the 5-D output) is given;
    a softmax over a spatial axis is not a class activation."""
    node = model.output(output_index).get_node()
    moved = False  # a Transpose/Reshape after the activation: its axis no longer says which axis is the channel's
    for _ in range(64):  # a chain of transparent ops is short; the bound only guards against odd graphs
        kind = node.get_type_name()
        if kind in _ACTIVATIONS:
            if kind in ("Softmax", "LogSoftmax") and channel_axis is not None and not moved:
                axis = int(node.get_attributes().get("axis", 1))
                rank = node.get_output_partial_shape(0).rank
                if rank.is_static and axis < 0:
                    axis += rank.get_length()
                if axis != channel_axis:
                    return None
            return _ACTIVATIONS[kind]
        if kind not in _TRANSPARENT or node.get_input_size() == 0:
            return None
        moved = moved or kind in ("Transpose", "Reshape", "Squeeze", "Unsqueeze")
        node = node.input_value(0).get_node()
    return None
