"""volinfer: stream huge 3D volumes through OpenVINO models tile by tile, with nearly flat peak RAM.

Data flow, one module each: :mod:`~volinfer.io.reader` (read lazily) → :mod:`~volinfer.tiling.geometry` (where tiles go) →
:mod:`~volinfer.run.feeder` (tile input) → :mod:`~volinfer.model.tile_model` / :mod:`~volinfer.run.engine` (infer) →
:mod:`~volinfer.tiling.stitch` (combine) → :mod:`~volinfer.run.postprocess` → :mod:`~volinfer.io.writer` (write as it goes).
"""

import os as _os
import signal as _signal
import sys as _sys
import threading as _threading


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C while the command line is still importing OpenVINO and friends (about a second): one line, exit 130,
    nothing written yet. The command's own handlers replace this one once it starts (volinfer.cliutil)."""
    _sys.stderr.write("interrupted: nothing was written\n")
    _sys.stderr.flush()
    _os._exit(130)  # not SystemExit: raised inside an extension's import (OpenVINO's) it became an ImportError


_STARTING_CLI = (_threading.current_thread() is _threading.main_thread()
                 and _os.path.basename(_sys.argv[0] if _sys.argv else "") in ("volinfer", "volinfer.exe", "-m",
                                                                                "__main__.py"))
if _STARTING_CLI and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)

from volinfer.version import __version__  # noqa: E402
from volinfer.api import predict  # noqa: E402
from volinfer.run.report import RunReport  # noqa: E402
from volinfer.errors import VolinferError  # noqa: E402
from volinfer.model.tile_model import CompileOptions, TileModel  # noqa: E402
from volinfer.model.settings import ModelSettings  # noqa: E402

__all__ = ["predict", "RunReport", "VolinferError", "TileModel", "CompileOptions", "ModelSettings", "__version__"]
