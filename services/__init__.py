"""toolbus processes: the executor service, the sandbox worker, the CLI and the Python client."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("toolbus")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
