"""The `ray` engine: a stage's missing shards as a Ray Data pipeline — shard rows → (a pool of decoders, where the
model leaves CPUs free) → an actor pool holding the model (one load per actor) → back to the driver, which writes
each shard as it arrives.

Results stream back instead of being written on the nodes, so the run folder needs no shared storage and is
written by one process under its lock, with the same atomic shard files as a local run: a killed driver
resumes from them, and a shard is never half-written by a node that died. What every node must see is what
the model reads: the photos and the weights file, at the same paths (a shared filesystem, as Ray Data's
own file readers assume); that is checked on each node before any work (`_check_nodes`).

Decoders are for the CPUs the actors do not take (a GPU node's cores): they reserve no CPU and are bounded
by Ray Data's backpressure. Where the actors take every CPU (one replica per CPU), a separate decoder would
only be one more process importing torch on cores the model already uses (measured here: 10 s of start-up
on one core against 5), so each actor decodes its own shard as a local stage does (`ShardWork.run`).
A worker process that dies is restarted and its shard done again: Ray Data's own defaults for actor pools
(max_restarts and max_task_retries -1), for the decoders and the model actors alike.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import pickle
import socket
from collections.abc import Sequence

from .. import CbirError, error_chain
from . import EngineConfig, Keep, ShardWork

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3


def _import_ray(cfg: EngineConfig):
    """Ray, or one line saying how to install it. A loopback address means a cluster on this machine, whose
    nodes were started on 127.0.0.1: Ray would otherwise rewrite it to this machine's network address (which
    such a cluster does not listen on), so it is told to keep loopback — before its first import."""
    if cfg.address and _is_loopback(cfg.address.rpartition(":")[0]):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        import ray.data
    except ImportError:
        raise CbirError("--engine ray needs Ray Data: pip install 'cbir[ray]' (or 'ray[data]')") from None
    return ray


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _connect(ray, cfg: EngineConfig) -> None:
    """Join the cluster at `cfg.address`, or start a Ray instance on this machine bound to 127.0.0.1. The
    connection stays open for the process's later stages (`cbir run`: detect, then each embedding), so the
    job's idle worker processes serve them too; Ray closes it when the process exits. One already open (a
    notebook's, or an earlier stage's) is used, unless it is to another cluster than `cfg.address`."""
    if ray.is_initialized():
        if not cfg.address or ray.get_runtime_context().gcs_address == cfg.address:
            return
        ray.shutdown()
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False, "configure_logging": False}
    if cfg.address:
        host, _, port = cfg.address.rpartition(":")
        try:  # Ray itself retries a dead address for a minute or more
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise CbirError(f"--engine ray:{cfg.address}: no Ray cluster answers there ({e.strerror or e}); start "
                            f"one with `ray start --head` or give its GCS address") from None
        ray.init(address=cfg.address, **quiet)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, **quiet)  # not $RAY_ADDRESS


def _actors(ray, cfg: EngineConfig, shards: int) -> int:
    """--actors, else one per GPU (with --gpus-per-actor) or per CPU of the cluster; never more than shards."""
    have = ray.cluster_resources()
    if cfg.actors:
        return min(cfg.actors, shards)
    if cfg.gpus_per_actor:
        fit = int(have.get("GPU", 0) // cfg.gpus_per_actor)
        if not fit:
            raise CbirError(f"--gpus-per-actor {cfg.gpus_per_actor}: the Ray cluster has {have.get('GPU', 0):g} "
                            f"GPU(s)")
    else:
        fit = int(have.get("CPU", 0) // cfg.cpus_per_actor)
        if not fit:
            raise CbirError(f"--cpus-per-actor {cfg.cpus_per_actor}: the Ray cluster has {have.get('CPU', 0):g} "
                            f"CPU(s)")
    return min(fit, shards)


def _decoders(ray, cfg: EngineConfig, actors: int, shards: int) -> int:
    """Decoders: one per CPU the model actors leave free (a GPU node's spare cores), never more than shards;
    none where the actors take every CPU (they decode their own shards). They reserve no CPU, so that the
    actors may take every CPU; the count keeps them from outnumbering the cores, each being a process that
    holds torch."""
    free = int(ray.cluster_resources().get("CPU", 0) - actors * cfg.cpus_per_actor)
    return max(0, min(shards, free))


def _missing_files(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def _check_nodes(ray, paths: list[str]) -> None:
    """Every alive node with CPUs sees `paths` (the model's files and the first shard's photos that the driver
    sees: a photo gone from the folder is skipped and reported by the stage, as a local run does, not refused
    here): else one line naming the node, before a shard is sent where its photos would all read as unreadable."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    check = ray.remote(num_cpus=0)(_missing_files)
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    answers = ray.get([check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                       .remote(paths) for n in nodes])
    for node, missing in zip(nodes, answers):
        if missing:
            raise CbirError(f"--engine ray: node {node['NodeManagerAddress']} cannot read {missing[0]}; every node "
                            f"must see the photos and weights at the same paths (a shared filesystem)")


def _decoder(work: ShardWork) -> type:
    """The class of the decoders: long-lived processes. As 0-CPU tasks they were not: Ray ends an idle worker
    above its soft limit (one per CPU) after a second, so while the model ran each shard's decode started a
    fresh process that imported torch (a new pid per shard, seen here), and Ray ran at a fifth of the local
    rate on one core."""

    class Decoder:
        def __call__(self, row: dict) -> dict:
            decoded = work.decode(pickle.loads(row["items"]))
            return {"shard": row["shard"], "count": row["count"], "decoded": pickle.dumps(decoded)}

    return Decoder


def _model_actor(work: ShardWork, threads: int) -> type:
    """The class of the pool's actors: the model loaded once per actor, on `threads` threads (the CPUs the actor
    holds: Ray leaves an inherited OMP_NUM_THREADS as it is, so two 1-CPU replicas on two cores ran two threads
    each, seen here), then every shard it is given, decoded already (by the decoders) or not (then here, as a
    local stage decodes beside its model). `work` travels inside the class (not as a constructor argument held
    in the object store, which Ray warns a restarted actor could lose)."""

    class Model:
        def __init__(self):
            import torch

            torch.set_num_threads(threads)
            self.model = work.load()

        def __call__(self, row: dict) -> dict:
            if "decoded" in row:
                result = work.infer(self.model, pickle.loads(row["decoded"]))
            else:
                result = work.run(self.model, pickle.loads(row["items"]))
            return {"shard": row["shard"], "count": row["count"], "result": pickle.dumps(result)}

    return Model


def _user_error(error: BaseException) -> CbirError | None:
    """The CbirError a task raised (one line for the user), found through Ray's wrappers."""
    return next((e for e in error_chain(error) if isinstance(e, CbirError)), None)


def map_shards(cfg: EngineConfig, work: ShardWork, missing: list[tuple[int, Sequence]], keep: Keep,
               progress=None) -> None:
    if not missing:
        return
    ray = _import_ray(cfg)
    _connect(ray, cfg)
    try:
        from ray.data import ActorPoolStrategy, DataContext

        DataContext.get_current().enable_progress_bars = False  # the stage's own tqdm counts photos or boxes
        _check_nodes(ray, [p for p in work.needs(missing[0][1]) if os.path.exists(p)])
        rows = [{"shard": number, "count": work.size(items), "items": pickle.dumps(items)} for number, items in missing]
        actors = _actors(ray, cfg, len(rows))
        decoders = _decoders(ray, cfg, actors, len(rows))
        pipeline = ray.data.from_items(rows, override_num_blocks=len(rows))
        if decoders:
            pipeline = pipeline.map(_decoder(work), compute=ActorPoolStrategy(size=decoders), num_cpus=0)
        threads = max(1, round(cfg.cpus_per_actor))
        pipeline = pipeline.map(_model_actor(work, threads), compute=ActorPoolStrategy(size=actors),
                                num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor or None)
        # one shard per batch, without prefetching: `iter_rows` holds each block back until the next one has
        # arrived (seen here: the first shard was kept only when the second was done), which delays every
        # shard's write by one shard and loses a finished one to a killed driver
        for batch in pipeline.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            keep(int(batch["shard"][0]), pickle.loads(batch["result"][0]))
            if progress is not None:
                progress.update(int(batch["count"][0]))
    except Exception as e:  # Ray wraps a task's error in its own types
        if isinstance(e, CbirError):
            raise
        found = _user_error(e)
        if found is not None:
            raise found from None
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise CbirError(f"--engine ray: the cluster failed ({type(e).__name__}: {first[:200]}); finished shards "
                        f"are kept, rerun to resume") from None
