"""molden: denoising objectives for atomistic graph neural networks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("molden")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+local"
