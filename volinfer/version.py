"""The installed volinfer version (a source tree without installing reports ``0.0.0+src``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("volinfer")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+src"
