import sys
from pathlib import Path

import numpy as np
import openvino as ov
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from models import tiny_unet  # noqa: E402

from converters.offline import no_telemetry  # noqa: E402

no_telemetry()  # tests call openvino.convert_model directly: no usage reports over the network

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def whole_volume_reference(model: ov.Model, vol: np.ndarray, tile: int, multiple: int, layout: str = "NCDHW",
                           pad_mode: str = "constant") -> np.ndarray:
    """Independent reference: pad the whole (C, x, y, z) volume to the grid's padded size, run it in one go at f32,
    crop back. Returns (C_out, x, y, z)."""
    from volinfer.tiling.geometry import padded_size  # the one formula shared with the engine, tested on its own

    c, *shape = vol.shape
    padded = [padded_size(n, tile, multiple) for n in shape]
    pv = np.pad(vol, [(0, 0)] + [(0, p - n) for p, n in zip(padded, shape)], mode=pad_mode)
    m = model.clone()
    m.reshape({0: [1, c, *padded] if layout == "NCDHW" else [1, *padded, c]})
    cm = ov.Core().compile_model(m, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = pv[None] if layout == "NCDHW" else np.moveaxis(pv, 0, -1)[None]
    out = cm(x.astype(np.float32))[0][0]
    if layout == "NDHWC":
        out = np.moveaxis(out, -1, 0)
    return out[:, : shape[0], : shape[1], : shape[2]]


@pytest.fixture
def unet2():
    """Two-level tiny U-Net (sizes divisible by 4), size multiple stored in rt_info."""
    m = tiny_unet(levels=2)
    m.set_rt_info("4", ["volinfer", "size_multiple"])
    return m


@pytest.fixture(autouse=True)
def _quick_speed_profile(monkeypatch):
    """Conversions in tests time only the model's own tile, twice (the speed profile adds ~0.1 s, not ~2 s, to each
    of the suite's conversions); tests/test_speed_profile.py sets the budget back where it checks more sizes."""
    from volinfer.model import speed_profile

    monkeypatch.setattr(speed_profile, "TOTAL_BUDGET_S", 0.0)
    monkeypatch.setattr(speed_profile, "MIN_TIMED_S", 0.0)
