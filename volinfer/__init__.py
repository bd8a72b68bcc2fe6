"""volinfer: stream huge 3D volumes through OpenVINO models tile by tile, with nearly flat peak RAM.

Data flow, one module each: :mod:`~volinfer.io.reader` (read lazily) → :mod:`~volinfer.tiling.geometry` (where tiles go) →
:mod:`~volinfer.tiling.feeder` (tile input) → :mod:`~volinfer.model.tile_model` / :mod:`~volinfer.run.engine` (infer) →
:mod:`~volinfer.tiling.stitch` (combine) → :mod:`~volinfer.run.postprocess` → :mod:`~volinfer.io.writer` (write as it goes).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("volinfer")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+src"

from volinfer.api import predict  # noqa: E402
from volinfer.run.engine import RunReport  # noqa: E402
from volinfer.errors import VolinferError  # noqa: E402
from volinfer.model.tile_model import CompileOptions, TileModel  # noqa: E402
from volinfer.model.settings import ModelSettings  # noqa: E402

__all__ = ["predict", "RunReport", "VolinferError", "TileModel", "CompileOptions", "ModelSettings", "__version__"]
