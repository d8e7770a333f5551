"""`--memory-budget`: the FAISS layout for a vector count and a RAM budget, as autofaiss's max-index-memory.

The candidates are tried from the most accurate down and the first whose resident bytes fit the budget is
built: exact search (small galleries only), IVF with 8-bit scalar codes (SQ8: recall@10 0.96-0.99 up to
10^6 in benchmarks/results/index_bench_cpu.md), IVF with product-quantiser codes of 4 dimensions per byte
(PQ d/4: 4x smaller, recall near 0.5 on its own, so pair it with `--refine`; offered from 9,984 training
vectors, what its 256-centroid codebooks need), and, when even those codes
exceed the budget, IVF-SQ8 with its inverted lists in a file beside the index that search memory-maps
(FAISS's OnDiskInvertedLists): RAM then holds the coarse centroids, and the OS pages lists in as queries
touch them. Past 10^6 vectors the coarse quantiser is itself an HNSW graph over the centroids, so adding
and searching 10^7 vectors does not scan 10^4 centroids per vector.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .. import CbirError

HEADROOM = 0.8  # of the budget for the index; the rest for query batches, the table and Python
ID_BYTES = 8  # an int64 id per vector in the inverted lists
FLAT_MAX = 100_000  # exact search beyond this is too slow to be the budget's choice (12 ms/query at 10^5)
HNSW_QUANTIZER_MIN_LISTS = 4096
TRAIN_PER_LIST = 39  # FAISS warns below 39 training vectors per centroid
PQ_MIN_TRAIN = 39 * 256  # each 8-bit PQ codebook has 256 centroids
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_budget(text: str) -> int:
    """`4G`, `512M`, `2.5G`, `1000000` (bytes; binary units, as autofaiss's max-index-memory)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", str(text).upper())
    if not m or float(m[1]) <= 0:
        raise CbirError(f"--memory-budget {text!r}: a size such as 4G, 512M or 2.5G")
    return int(float(m[1]) * UNITS[m[2]])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


@dataclass(frozen=True, kw_only=True)
class Layout:
    factory: str  # the FAISS index_factory body
    on_disk: bool  # inverted lists in a memory-mapped file beside the index
    ram_bytes: int  # what the index holds resident when searched
    disk_bytes: int  # the index files
    reason: str  # why this one, for meta.json and the log

    def describe(self) -> dict:
        return {"factory": self.factory, "on_disk": self.on_disk, "ram_bytes": self.ram_bytes,
                "disk_bytes": self.disk_bytes, "reason": self.reason}


def ivf_lists(n: int, n_train: int) -> int:
    """4·sqrt(n) coarse lists, at most one per 39 training vectors."""
    return max(1, min(int(4 * math.sqrt(n)), n_train // TRAIN_PER_LIST))


def pq_bytes(dim: int) -> int:
    """Bytes per PQ code: 4 dimensions per byte, rounded down to a divisor of the dimension."""
    return max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)


def choose_layout(n: int, dim: int, budget: int, n_train: int) -> Layout:
    """The most accurate layout of `n` vectors of `dim` whose resident size fits `budget` bytes."""
    usable = budget * HEADROOM
    flat = n * (4 * dim + ID_BYTES)
    if n <= FLAT_MAX and flat <= usable:
        return Layout(factory="Flat", on_disk=False, ram_bytes=flat, disk_bytes=flat,
                      reason=f"{n} vectors: exact search fits ({human(flat)} of {human(budget)})")
    lists = ivf_lists(n, n_train)
    hnsw = lists >= HNSW_QUANTIZER_MIN_LISTS
    quantizer = lists * 4 * dim + (lists * 32 * 2 * 4 if hnsw else 0)
    coarse = f"IVF{lists}_HNSW32" if hnsw else f"IVF{lists}"
    tried = []
    codes = [("SQ8", dim)] + ([(f"PQ{pq_bytes(dim)}", pq_bytes(dim))] if n_train >= PQ_MIN_TRAIN else [])
    for code, size in codes:
        ram = quantizer + n * (size + ID_BYTES)
        if ram <= usable:
            return Layout(factory=f"{coarse},{code}", on_disk=False, ram_bytes=ram, disk_bytes=ram,
                          reason=f"{n} vectors x {dim}-d: {code} codes in RAM, {human(ram)} of {human(budget)}"
                                 + (f" ({', '.join(tried)} do not fit)" if tried else ""))
        tried.append(f"{code} {human(ram)}")
    lists_bytes = n * (dim + ID_BYTES)
    return Layout(factory=f"{coarse},SQ8", on_disk=True, ram_bytes=quantizer, disk_bytes=quantizer + lists_bytes,
                  reason=f"{n} vectors x {dim}-d: no codes fit {human(budget)} in RAM ({', '.join(tried)}); SQ8 "
                         f"inverted lists on disk ({human(lists_bytes)}, memory-mapped), centroids in RAM "
                         f"({human(quantizer)})")


def train_sample_size(factory: str, n_train: int) -> int:
    """Training vectors to draw for a body: enough for its coarse lists and PQ codebooks, not all of a 10^7 set."""
    m = re.match(r"IVF(\d+)", factory)
    if not m:
        return n_train
    return min(n_train, max(TRAIN_PER_LIST * int(m[1]), 65_536))
