"""Where no exact tiling fits the budget, the run takes the largest tile that does, searched from the whole padded
volume down one size multiple on one axis at a time (rtA D8: shortening every tied axis at once stepped from 32³ to
24³, so a probabilities run, whose float32 output strips put 32³ 0.8 MB over a budget a labels run fitted, ran 308
tiles of 24³ instead of 84 of 32x32x24)."""

from types import SimpleNamespace

import numpy as np
import pytest

from volinfer.errors import VolinferError
from volinfer.run.setup import _largest_fitting

MB_PER_VOXEL = 1e-3  # a model whose memory grows by 1 MB a thousand voxels


def need(extra_per_voxel: float = 0.0):
    """A tiling's predicted memory: the model, plus output buffers pricier for some kinds of output."""
    return lambda t: float(np.prod(t)) * (MB_PER_VOXEL + extra_per_voxel)


TM = SimpleNamespace(multiple=8, tile=(40, 40, 40))


def test_the_fallback_is_the_first_fit_shortening_one_axis_at_a_time():
    """32³ (32.8 MB) is just over a 32 MB budget: the next tile down is 32x32x24 on one axis, not 24³ (2.4x fewer
    voxels)."""
    tile = _largest_fitting(TM, need(), 32.0, (97, 45, 70), True, start=(40, 40, 40))
    assert sorted(tile) == [24, 32, 32] and need()(tile) <= 32.0


def test_labels_and_probabilities_fall_back_to_tiles_one_step_apart():
    """Output buffers priced a little higher (probabilities) move the fallback by one step on one axis, not a
    whole cube step: a budget labels meet at 32³ gives probabilities 32x32x24, shortening the axis that frees the
    most memory."""
    labels = _largest_fitting(TM, need(), 33.0, (97, 45, 70), True, start=(40, 40, 40))
    probs = _largest_fitting(TM, need(0.0001), 33.0, (97, 45, 70), True, start=(40, 40, 40))
    assert labels == (32, 32, 32)
    assert sorted(probs) == [24, 32, 32]
    assert sum(a != b for a, b in zip(labels, probs)) == 1


def test_uneven_memory_shortens_the_axis_that_frees_the_most():
    """Where the tied longest axes differ in what they cost (output strips span x, so y and z rows cost more), the
    one whose shortening frees the most goes first."""
    def uneven(t):
        return float(np.prod(t)) * MB_PER_VOXEL + 0.05 * t[1] * t[2]
    tile = _largest_fitting(TM, uneven, 100.0, (97, 45, 70), True, start=(40, 40, 40))
    assert tile == (40, 32, 32) and uneven(tile) <= 100.0  # all three at once gave 32³


def test_nothing_fits_is_still_refused_under_a_given_budget():
    with pytest.raises(VolinferError, match="--max-memory 102 KB is too small"):
        _largest_fitting(TM, need(), 0.1, (97, 45, 70), True, start=(40, 40, 40))
