"""The `local` engine: the model built once in this process, the shards computed one after another."""

from __future__ import annotations

from collections.abc import Sequence

from . import EngineConfig, Keep, ShardWork


def map_shards(cfg: EngineConfig, work: ShardWork, missing: list[tuple[int, Sequence]], keep: Keep,
               progress=None) -> None:
    if not missing:
        return
    model = work.load()
    for number, items in missing:
        keep(number, work.run(model, items, progress))
