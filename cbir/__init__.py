"""cbir: object-detection-based multi-instance image retrieval."""

__version__ = "0.1.0"


class CbirError(Exception):
    """A user-facing failure: the CLI prints its message on one line and exits 2, no traceback."""


def error_chain(error: BaseException | None):
    """`error` and what it wraps: Ray's `.cause`, then `__cause__` or `__context__`. Each error once, since
    some libraries chain an error to itself (pymilvus: `raise e from e`)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
