"""cbir: object-detection-based multi-instance image retrieval."""

__version__ = "0.1.0"


class CbirError(Exception):
    """A user-facing failure: the CLI prints its message on one line and exits 2, no traceback."""
