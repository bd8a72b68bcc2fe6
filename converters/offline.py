"""OpenVINO's model converter (``openvino.convert_model``, via the optional ``openvino-telemetry`` package) sends usage
telemetry over the network unless it runs in CI; volinfer reaches no network, and offline the send can block the
process's exit (a forked sender waiting on DNS). Its telemetry is one object per process, whose consent is decided
when it is first made: made here under the converter's own CI opt-out, it stays off for the process."""

from __future__ import annotations

import functools
import os


@functools.cache
def no_telemetry() -> None:
    """Turn OpenVINO's converter telemetry off for this process (once; no-op without the package)."""
    try:
        from openvino.tools.ovc.telemetry_utils import init_ovc_telemetry
    except ImportError:
        return
    before = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        init_ovc_telemetry()
    except Exception:  # noqa: BLE001  (telemetry must never stop a conversion)
        pass
    finally:
        if before is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = before
