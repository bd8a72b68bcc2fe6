"""volinfer: stream huge 3D volumes through OpenVINO models tile by tile, with nearly flat peak RAM.

Data flow, one module each: :mod:`~volinfer.reader` (read lazily) → :mod:`~volinfer.geometry` (where tiles go) →
:mod:`~volinfer.feeder` (tile input) → :mod:`~volinfer.model` / :mod:`~volinfer.engine` (infer) →
:mod:`~volinfer.stitch` (combine) → :mod:`~volinfer.postprocess` → :mod:`~volinfer.writer` (write as it goes).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("volinfer")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+src"

from .api import predict  # noqa: E402
from .engine import RunReport  # noqa: E402
from .errors import VolinferError  # noqa: E402
from .model import CompileOptions, TileModel  # noqa: E402
from .settings import ModelSettings  # noqa: E402

__all__ = ["predict", "RunReport", "VolinferError", "TileModel", "CompileOptions", "ModelSettings", "__version__"]
