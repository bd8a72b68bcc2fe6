"""Settings as values (issue 12): built once from keywords or CLI options, validated in their constructors, frozen,
and a run given a RunSettings equals the same run given keywords."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from models import save_unet2

from converters.settings import ConvertSettings
from volinfer import TileModel, VolinferError, predict
from volinfer.run.settings import OutputSettings, RunSettings, TilingSettings, from_cli

RNG = np.random.default_rng(12)


@pytest.fixture
def xml(tmp_path):
    return save_unet2(tmp_path / "m.xml", tile=32)


def test_keywords_land_in_their_parts_and_nothing_else_changes():
    s = RunSettings.from_kwargs(tile=32, stitch="gaussian", kind="probabilities", channels=[1], nan_value=0,
                                device="CPU", requests=3, layout="ndhwc", resume=True, mirror="xz",
                                zarr_output={"chunks": 16, "pyramid": 2}, options={"threads": 2})
    assert (s.tiling.tile, s.tiling.stitch, s.tiling.mirror) == (32, "gaussian", (0, 2))
    assert (s.output.kind, s.output.channels, s.output.chunks, s.output.pyramid) == ("probabilities", (1,), 16, 2)
    assert s.output.compression is True  # not given: the default
    assert (s.input.nan_value, s.runtime.requests, s.runtime.layout, s.runtime.threads) == (0, 3, "NDHWC", 2)
    assert s.resume and not s.overwrite
    assert RunSettings.from_kwargs(s, kind="raw").output.kind == "raw"  # on top of a base: one field changed
    assert RunSettings.from_kwargs(s, kind="raw").tiling == s.tiling
    assert RunSettings.from_kwargs(**s.as_kwargs()) == s  # the keyword form round-trips


def test_settings_are_frozen_and_unknown_keywords_refused():
    s = RunSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tiling.sigma = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError, match="tilee"):
        RunSettings.from_kwargs(tilee=32)
    with pytest.raises(TypeError, match="tile_size"):
        ConvertSettings.from_kwargs(tile_size=32)


@pytest.mark.parametrize("make,match", [
    (lambda: TilingSettings(sigma=0), "sigma"),
    (lambda: TilingSettings(tile=[0, 32, 32]), "tile"),
    (lambda: TilingSettings(overlap=1.5), "overlap"),
    (lambda: TilingSettings(stitch="diagonal"), "stitch"),
    (lambda: TilingSettings(mirror="xq"), "mirror"),
    (lambda: OutputSettings(kind="labelz"), "kind"),
    (lambda: OutputSettings(threshold=float("nan")), "threshold"),
    (lambda: RunSettings.from_kwargs(requests=0), "requests"),
    (lambda: RunSettings.from_kwargs(nan_value=float("inf")), "nan_value"),
    (lambda: RunSettings.from_kwargs(normalize={"kind": "zscore", "mean": 0, "std": 0}), "std"),
    (lambda: RunSettings.from_kwargs(normalize="zscor"), "normalize"),
    (lambda: RunSettings.from_kwargs(normalize=3), "normalize"),
    (lambda: ConvertSettings.from_kwargs(tile=[0, 8, 8]), "tile"),
    (lambda: ConvertSettings.from_kwargs(calibration_tiles=0), "calibration"),
])
def test_validated_once_at_construction(make, match):
    with pytest.raises(VolinferError, match=match):
        make()


def test_normalize_takes_the_cli_form_too():
    assert RunSettings.from_kwargs(normalize="zscore").input.normalize == {"kind": "zscore"}
    assert RunSettings.from_kwargs(normalize="percentile:1:99").input.normalize == \
        {"kind": "percentile", "lower": 1.0, "upper": 99.0}


def test_from_cli_matches_the_keyword_form():
    params = dict(tile="32x32x16", overlap="0.25", stitch="crop", sigma=None, pad_mode="edge", kind="labels",
                  activation=None, channels="1", threshold=0.4, normalize="zscore", output_name="1", device="CPU",
                  precision="f32", threads=None, streams=None, requests=2, cache_dir=None, nan_value=None,
                  no_constant_reuse=True, chunks=None, no_compression=True, pyramid=0, max_memory="600M",
                  norm_stats="tile", mirror="xyz", layout=None, resume=False, overwrite=True, quiet=True,
                  as_json=False, prob_dtype="float32")
    s = from_cli(params)
    assert s == RunSettings.from_kwargs(
        tile=[32, 32, 16], overlap="0.25", stitch="crop", pad_mode="edge", channels=(1,), threshold=0.4,
        normalize={"kind": "zscore"}, model_output="1", precision="f32", reuse_constant=False, compression=False,
        max_memory_mb=600.0, norm_stats="tile", mirror=(0, 1, 2), overwrite=True, progress=False)


def test_predict_with_settings_equals_predict_with_keywords(xml):
    vol = RNG.standard_normal((21, 19, 13)).astype(np.float32)
    kw = dict(tile=16, overlap=4, stitch="gaussian", kind="probabilities", precision="f32")
    by_keywords = predict(vol, TileModel(xml), **kw)
    by_settings = predict(vol, TileModel(xml), None, RunSettings.from_kwargs(**kw))
    np.testing.assert_array_equal(by_keywords, by_settings)
    # keywords override single fields of given settings
    mixed = predict(vol, TileModel(xml), None, RunSettings.from_kwargs(**kw), kind="labels")
    np.testing.assert_array_equal(mixed, predict(vol, TileModel(xml), **{**kw, "kind": "labels"}))
    assert mixed.dtype != by_settings.dtype
