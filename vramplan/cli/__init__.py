"""The `vramplan` command line: one module per command, the shared setup flags in _flags.py. The
CLI parses, calls the library and renders; it holds no arithmetic."""
from vramplan.cli._app import main, run

__all__ = ["main", "run"]
