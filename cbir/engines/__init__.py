"""Where the heavy stages (detect, embed) compute their shards: in this process (`local`) or on a Ray cluster
(`ray`, `ray:ADDRESS`). A stage describes its work once as a `ShardWork`; an engine maps the shards the run
does not hold yet and hands each result back to the driver, which writes it with the same atomic shard code
(`artifacts.run_in_shards`) whatever the engine. So the run folder is only ever written by the driver, the
fingerprints never name the engine, and a new engine is one new module registered in `ENGINES`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .. import CbirError

ENGINES = {"local": "cbir.engines.local", "ray": "cbir.engines.ray_engine"}


class ShardWork(Protocol):
    """One stage's computation, picklable so that a cluster can ship it: the model is built where it runs
    (`load`: once per actor or per local stage), and a shard is decoded (`decode`, CPU only: files → model
    inputs) and then put through the model (`infer`). `run` does both in this process with the overlap of
    decoding and compute tuned for one machine; `size` counts a shard's units for the progress bar, and
    `needs` names the files every node must see to do a shard (the model's, one of its photos)."""

    def load(self) -> Any: ...

    def run(self, model: Any, items: Sequence, progress=None) -> Any: ...

    def decode(self, items: Sequence) -> Any: ...

    def infer(self, model: Any, decoded: Any) -> Any: ...

    def size(self, items: Sequence) -> int: ...

    def needs(self, items: Sequence) -> list[str]: ...


Keep = Callable[[int, Any], None]  # (shard number, result): writes the shard; called on the driver


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    kind: str = "local"  # a key of ENGINES
    address: str | None = None  # ray: a running cluster's HOST:PORT (None: start a Ray instance on this machine)
    actors: int | None = None  # model replicas; default one per GPU (with gpus_per_actor) or per CPU
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0

    def __post_init__(self):
        if self.kind not in ENGINES:
            raise CbirError(f"--engine {self.kind}: choose from local, ray or ray:HOST:PORT")
        if self.actors is not None and self.actors < 1:
            raise CbirError(f"--actors {self.actors}: must be at least 1")
        if self.gpus_per_actor < 0 or self.cpus_per_actor <= 0:
            raise CbirError("--gpus-per-actor must be 0 or more and --cpus-per-actor above 0")
        if self.kind == "local" and (self.address or self.actors or self.gpus_per_actor):
            raise CbirError("--actors, --gpus-per-actor and an address need --engine ray")


LOCAL = EngineConfig()


def parse_engine(text: str) -> EngineConfig:
    """`local`, `ray` (a Ray instance started on this machine, bound to 127.0.0.1) or `ray:HOST:PORT` (join a
    running cluster at its GCS address, as `ray start --head` prints it)."""
    kind, colon, address = text.strip().partition(":")
    if colon and not address:
        raise CbirError(f"--engine {text}: an empty address; give ray:HOST:PORT, or ray for an instance here")
    if kind == "ray" and address:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise CbirError(f"--engine {text}: give the cluster's address as ray:HOST:PORT (e.g. ray:10.0.0.5:6379)")
    elif address:
        raise CbirError(f"--engine {text}: only ray takes an address (ray:HOST:PORT)")
    return EngineConfig(kind=kind, address=address or None)


def absolute(value: str | Path | None) -> str | None:
    """A file argument as every process sees it: an existing relative path (or onnx:PATH) made absolute, since
    a Ray worker does not start in the driver's folder; names (DEFAULT, a torchvision model) stay as given."""
    if not value:
        return None
    value = str(value)
    prefix, path = ("onnx:", value[5:]) if value.startswith("onnx:") else ("", value)
    return prefix + str(Path(path).absolute()) if Path(path).exists() else value


def files_here(*values: str | Path | None) -> list[str]:
    """The values that name a file on this machine, absolute: what a node must see to build the model (a
    name such as DEFAULT or a torchvision model is no file)."""
    return [f for f in map(absolute, values) if f and Path(f.removeprefix("onnx:")).exists()]


def map_shards(cfg: EngineConfig, work: ShardWork, missing: list[tuple[int, Sequence]], keep: Keep,
               progress=None) -> None:
    """Compute every (number, items) shard of `missing` with `work` on the engine `cfg` names and `keep` each
    result as it arrives (in any order on a cluster)."""
    module = importlib.import_module(ENGINES[cfg.kind])
    module.map_shards(cfg, work, missing, keep, progress)
