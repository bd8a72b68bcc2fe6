"""Cache-friendly transposing element-wise operations.

Tiles move between two memory orders: NIfTI's (x fastest) and the model's NCDHW buffers (z fastest). A numpy
element-wise op between two such views walks one of them with a large stride and is 3-4x slower than the same op done
in slabs of a few planes along the output's fastest axis, where both operands stay in cache.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


def blockwise(fn: Callable[..., None], out: np.ndarray, *inputs: np.ndarray, step: int = 8) -> None:
    """Call ``fn(*inputs_chunk, out_chunk)`` on chunks of ``step`` along the last axis (one call if ``out`` is
    already walked in the same order as every input)."""
    n = out.shape[-1]
    if n <= step or all(a.strides[-1] == a.itemsize for a in inputs):
        fn(*inputs, out)
        return
    for k in range(0, n, step):
        fn(*(a[..., k : k + step] for a in inputs), out[..., k : k + step])


def cast_copy(src: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = src`` with any dtype conversion, chunked (see module docs)."""
    blockwise(lambda s, o: np.copyto(o, s, casting="unsafe"), out, src)
