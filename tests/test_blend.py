"""Gaussian / mean blending against an independent blend computed here with numpy (float64, whole-volume arrays).

Nothing of volinfer's weighting is reused: tile positions, the Gaussian profile and the normaliser are computed in
this file from the documented formulas, and every tile is run through OpenVINO (f32) here. Blended output must
also be bitwise the same whatever the number of infer requests and with or without the constant-tile cache (the
engine stitches every tile in submission order, cached constant tiles included).
"""

import itertools

import numpy as np
import openvino as ov
import pytest
from models import tiny_unet

from volinfer import TileModel, predict
from volinfer.tiling.geometry import TileGrid
from volinfer.run.postprocess import OutputSpec
from volinfer.tiling.stitch import BlendStitcher
from volinfer.io.writer import ArrayWriter

RNG = np.random.default_rng(7)


def starts(n: int, tile: int, multiple: int, overlap: int) -> list[int]:
    """Documented blend grid: the volume padded to max(tile, n rounded up to the multiple); stride = the largest
    multiple of ``multiple`` <= tile - overlap (at least one multiple); a last tile flush with the padded end;
    tiles starting past the volume are dropped."""
    padded = max(tile, -(-n // multiple) * multiple)
    stride = max(multiple, (tile - overlap) // multiple * multiple)
    s = sorted(set(list(range(0, padded - tile, stride)) + [padded - tile]))
    return [v for v in s if v < n]


def profile(mode: str, tile: int, sigma: float = 0.125) -> np.ndarray:
    """Documented 1-D weight: exp(-(i - (t-1)/2)^2 / (2 (sigma t)^2)), peak 1, floored at 1e-3; ones for mean."""
    if mode == "mean":
        return np.ones(tile)
    i = np.arange(tile) - (tile - 1) / 2
    w = np.exp(-0.5 * (i / (sigma * tile)) ** 2)
    return np.maximum(w / w.max(), 1e-3)


def blend(tiles: dict, shape, tile, multiple, overlap, mode: str, sigma: float = 0.125) -> np.ndarray:
    """sum(w * out) / sum(w) over every tile's in-volume part; ``tiles[(sx, sy, sz)]`` is a (C, tx, ty, tz) output."""
    grid = [starts(n, t, m, o) for n, t, m, o in zip(shape, tile, multiple, overlap)]
    w1 = [profile(mode, t, sigma) for t in tile]
    c = next(iter(tiles.values())).shape[0]
    num, den = np.zeros((c, *shape)), np.zeros(shape)
    for s in itertools.product(*grid):
        sl = tuple(slice(a, min(a + t, n)) for a, t, n in zip(s, tile, shape))
        w = [wi[: r.stop - r.start] for wi, r in zip(w1, sl)]
        w3 = w[0][:, None, None] * w[1][None, :, None] * w[2][None, None, :]
        num[(slice(None), *sl)] += tiles[s][(slice(None), *(slice(0, len(wi)) for wi in w))] * w3
        den[sl] += w3
    return num / den


def model_tiles(model: ov.Model, vol: np.ndarray, tile, multiple, overlap) -> dict:
    """Every tile of the blend grid, zero-padded past the volume, run through OpenVINO at f32."""
    padded = [max(t, -(-n // m) * m) for n, t, m in zip(vol.shape, tile, multiple)]
    pv = np.pad(vol, [(0, p - n) for p, n in zip(padded, vol.shape)])
    m = model.clone()
    m.reshape({0: [1, 1, *tile]})
    cm = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    grid = [starts(n, t, mu, o) for n, t, mu, o in zip(vol.shape, tile, multiple, overlap)]
    return {s: cm(pv[tuple(slice(a, a + t) for a, t in zip(s, tile))][None, None])[0][0].astype(np.float64)
            for s in itertools.product(*grid)}


def with_constant_regions(shape) -> np.ndarray:
    """Noise with three constant regions (air at 0, two plateaus), so whole tiles are constant, some in the middle
    of a z-row, after tiles still in flight."""
    vol = RNG.standard_normal(shape).astype(np.float32)
    vol[:, :, shape[2] // 2 :] = 0.0
    vol[:, shape[1] // 2 :, : shape[2] // 2] = 2.5
    vol[-shape[0] // 3 :, : shape[1] // 2, : shape[2] // 2] = -1.0
    return vol


CASES = [  # shape, tile, size multiple (levels of the tiny U-Net), overlap
    ((45, 38, 31), (12, 12, 12), 1, (4, 4, 4)),
    ((37, 29, 45), (16, 16, 16), 2, (6, 6, 6)),
    ((9, 40, 33), (16, 12, 16), 1, (4, 8, 10)),  # x shorter than the tile; overlap above half the tile in z
]


@pytest.mark.parametrize("mode", ["gaussian", "mean"])
@pytest.mark.parametrize("shape,tile,multiple,overlap", CASES)
def test_blend_equals_independent_numpy_blend_and_is_bitwise_reproducible(mode, shape, tile, multiple, overlap):
    levels = {1: 0, 2: 1}[multiple]
    model = tiny_unet(levels=levels, seed=3)
    vol = with_constant_regions(shape)
    ov3 = (overlap,) * 3 if isinstance(overlap, int) else overlap
    mult = (multiple,) * 3

    def run(requests: int, reuse: bool):
        tm = TileModel(model.clone(), tile=list(tile))
        tm.multiple = multiple
        return predict(vol, tm, kind="raw", stitch=mode, overlap=list(ov3), requests=requests, reuse_constant=reuse,
                       report=True)

    base, _ = run(1, False)
    ref = blend(model_tiles(model, vol, tile, mult, ov3), shape, tile, mult, ov3, mode)
    got = np.moveaxis(base, -1, 0)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-5)
    if mode == "gaussian":  # the comparison can fail: a slightly different Gaussian is far outside the tolerance
        other = blend(model_tiles(model, vol, tile, mult, ov3), shape, tile, mult, ov3, mode, sigma=0.15)
        assert np.abs(other - got).max() > 1e-3
    for requests, reuse in [(3, True), (1, True), (3, False)]:
        out, rep = run(requests, reuse)
        if reuse:
            assert "constant" in rep.extra  # the cache really served tiles
        assert out.tobytes() == base.tobytes(), (requests, reuse)


@pytest.mark.parametrize("kind", ["probabilities", "labels"])
def test_blended_probabilities_and_labels_follow_the_blended_logits(kind):
    shape, tile, ov3 = (30, 27, 25), (12, 12, 12), (4, 4, 4)
    model = tiny_unet(levels=0, out_ch=3, seed=5)
    vol = with_constant_regions(shape)
    out = predict(vol, TileModel(model.clone(), tile=12), kind=kind, stitch="gaussian", overlap=4, requests=3)
    logits = blend(model_tiles(model, vol, tile, (1,) * 3, ov3), shape, tile, (1,) * 3, ov3, "gaussian")
    if kind == "probabilities":
        e = np.exp(logits - logits.max(0))
        np.testing.assert_allclose(np.moveaxis(out, -1, 0), e / e.sum(0), atol=1e-5)
    else:
        top2 = np.sort(logits, axis=0)[-2:]
        clear = top2[1] - top2[0] > 1e-4  # away from ties, labels must agree exactly
        assert out.dtype == np.uint8 and clear.mean() > 0.99
        np.testing.assert_array_equal(out[clear], logits.argmax(0)[clear])


GEOMETRIES = [  # shape, tile, multiple, overlap: overlap above the stride, zero overlap, one tile, uneven last tiles
    ((33, 21, 40), (8, 8, 8), (1, 1, 1), (6, 6, 6)),
    ((20, 19, 18), (8, 8, 8), (1, 1, 1), (0, 0, 0)),
    ((5, 6, 7), (8, 8, 8), (1, 1, 1), (2, 2, 2)),
    ((30, 26, 22), (16, 8, 12), (4, 4, 4), (4, 6, 8)),
]


@pytest.mark.parametrize("shape,tile,multiple,overlap", GEOMETRIES)
@pytest.mark.parametrize("mode", ["gaussian", "mean"])
def test_stitcher_alone_matches_numpy_blend_and_holds_only_open_sums(shape, tile, multiple, overlap, mode):
    """The stitcher fed synthetic tile outputs (no model) in grid order, against the numpy blend; its float buffers
    stay the size it declares, well below whole planes when there are several tile rows."""
    grid = TileGrid.build(shape, tile, multiple, overlap, "blend")
    outs = {t.start: RNG.standard_normal((2, *tile)).astype(np.float32) for t in grid}
    writer = ArrayWriter(grid.shape, 2, np.dtype(np.float32))
    st = BlendStitcher(grid, OutputSpec(2, kind="raw"), writer, mode)
    row = None
    for t in grid:
        if row is not None and t.index[2] != row:
            st.end_row(t.start[2])
        row = t.index[2]
        st.add(t, outs[t.start])
    st.finish()
    ref = blend({s: o.astype(np.float64) for s, o in outs.items()}, shape, tile, multiple, overlap, mode)
    np.testing.assert_allclose(np.moveaxis(writer.result(), -1, 0), ref, rtol=1e-5, atol=1e-5)
    held = BlendStitcher.buffer_bytes(grid, 2)
    assert held == st._strip.nbytes + st._carry.nbytes + st._tmp.nbytes
    # open sums only: the current tile row (tile_z x tile_y x X), the planes the next z-row overlaps (x Y x X), one
    # 16-plane chunk of a weighted tile; float32, two channels
    zs = starts(shape[2], tile[2], multiple[2], overlap[2])
    shared = max([min(a + tile[2], shape[2]) - b for a, b in zip(zs, zs[1:])], default=0)
    X, Y, Z = shape
    assert held <= 2 * 4 * (min(tile[2], Z) * min(tile[1], Y) * X + shared * Y * X + 16 * tile[1] * tile[0])


def test_tiles_out_of_grid_order_are_refused():
    grid = TileGrid.build((20, 20, 20), (8, 8, 8), (1, 1, 1), (2, 2, 2), "blend")
    st = BlendStitcher(grid, OutputSpec(2, kind="raw"), ArrayWriter(grid.shape, 2, np.dtype(np.float32)), "mean")
    tiles = list(grid)
    out = np.zeros((2, 8, 8, 8), np.float32)
    st.add(tiles[4], out)  # (x 1, y 1): y-row 1
    with pytest.raises(RuntimeError, match="grid order"):
        st.add(tiles[0], out)  # y-row 0 after y-row 1: its rows were already closed
