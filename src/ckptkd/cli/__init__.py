"""The command line (`main`), a thin face over the Python API, and the tools behind some of its commands: the
terminal tables (`tables`), `verify` and `bench`."""

from .main import main

__all__ = ["main"]
