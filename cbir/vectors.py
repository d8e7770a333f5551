"""Small array helpers shared by encoders, retrieval and metrics."""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row (last axis) scaled to length 1; zero rows stay zero."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


READ_THREADS = 8  # reads in flight: a cold disk here answered 100,000 random rows in 1.7 s with 8 threads, 9.4 s with 1
_readers: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child cannot use its parent's threads


def _reader_pool() -> ThreadPoolExecutor:
    global _readers
    if _readers is None or _readers[0] != os.getpid():
        _readers = (os.getpid(), ThreadPoolExecutor(READ_THREADS, thread_name_prefix="take_rows"))
    return _readers[1]


def take_rows(vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """`vectors[ids]`, for a memory-mapped .npy read with positioned reads on several threads, one read per run of
    consecutive ids. Indexing the map makes each row a page fault served with the kernel's readahead: 10^5
    random rows of a 4 GB file read the whole file (3.9 GB) into this process's pages, and a 10 GB one put
    9.4 GB in a search's RSS. Read this way, the same rows cost 458 MB of I/O, no mapped pages, and less time
    cold (1.65 s against 2.35 s); warm, 0.3 s. A build's chunk of consecutive rows is one read."""
    ids = np.asarray(ids, np.int64)
    whole_map = isinstance(vectors, np.memmap) and isinstance(vectors.base, mmap.mmap)  # not a view: offset holds
    if not whole_map or vectors.ndim != 2 or not vectors.flags.c_contiguous or not ids.size:
        return np.asarray(vectors[ids])
    if ids.min() < 0 or ids.max() >= len(vectors):
        raise IndexError(f"row ids outside 0..{len(vectors) - 1}")
    unique, inverse = np.unique(ids.ravel(), return_inverse=True)
    out = np.empty((len(unique), vectors.shape[1]), vectors.dtype)
    row = out.itemsize * out.shape[1]
    buffer = memoryview(out).cast("B")
    breaks = np.flatnonzero(np.diff(unique) != 1) + 1
    runs = np.stack([np.r_[0, breaks], np.r_[breaks, len(unique)]], 1)  # [first, stop) positions in `unique`
    fd = os.open(vectors.filename, os.O_RDONLY)
    try:
        def read(part: np.ndarray) -> None:
            for first, stop in part.tolist():
                done, size, at = 0, (stop - first) * row, vectors.offset + int(unique[first]) * row
                while done < size:
                    got = os.preadv(fd, [buffer[first * row + done:stop * row]], at + done)
                    if not got:
                        raise OSError(f"{vectors.filename}: ends before row {unique[first]}")
                    done += got

        list(_reader_pool().map(read, np.array_split(runs, min(len(runs), READ_THREADS * 4))))
    finally:
        os.close(fd)
    return out[inverse.ravel()].reshape(*ids.shape, out.shape[1])
