"""`--engine ray`: detect and embed on a local multi-node Ray cluster (every process on 127.0.0.1) give the local
run's boxes byte for byte and its vectors to 1e-5, with the same fingerprints; a worker or a whole node killed
mid-stage, a driver killed or interrupted, and an unreachable cluster are survived or get one line."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import MINI, MINI_SPLIT, MOBILENET, RAY_NODE_CPUS, REPO, SSD, SSD_LABELS, copy_run, on_ray

from cbir.cli import main
from cbir.datasets.prepare import PrepareConfig, prepare
from cbir.detection import stage as detect_stage
from cbir.detection.stage import DetectConfig, DetectWork, detect
from cbir.encoders import stage as embed_stage
from cbir.encoders.stage import EmbedConfig, embed
from cbir.layout import RunLayout

SHARD = 4  # photos per shard here: the 32 photos of cub_mini make 8 shards, spread over both nodes
SSD_ARGS = {"detector": f"onnx:{SSD}", "labels": str(SSD_LABELS), "categories": ("bird",), "workers": 0}
EMBED_ARGS = {"backbone": "mobilenet_v2", "weights": str(MOBILENET), "workers": 0}
FILES = ("detections/detections.json", "detections/raw_detections.json")


@pytest.fixture(autouse=True)
def small_shards(monkeypatch):
    monkeypatch.setattr(detect_stage, "SHARD_IMAGES", SHARD)
    monkeypatch.setattr(embed_stage, "SHARD_IMAGES", SHARD)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ray") / "prepared"
    prepare(PrepareConfig(run=run, root=MINI, split=MINI_SPLIT, workers=1))
    return run


@pytest.fixture(scope="module")
def local_run(prepared, tmp_path_factory) -> Path:
    """The reference: the ONNX SSD's boxes and MobileNetV2 vectors of every mode, computed in this process."""
    run = copy_run(prepared, tmp_path_factory.mktemp("ray") / "local")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(detect_stage, "SHARD_IMAGES", SHARD)
        patch.setattr(embed_stage, "SHARD_IMAGES", SHARD)
        detect(DetectConfig(run=run, **SSD_ARGS))
        for mode in ("full", "gt", "det"):
            embed(EmbedConfig(run=run, mode=mode, **EMBED_ARGS))
    return run


def assert_same_boxes(a: Path, b: Path) -> None:
    for name in FILES:
        assert filecmp.cmp(a / name, b / name, shallow=False), name


def assert_same_vectors(a: Path, b: Path, mode: str) -> None:
    x, y = (np.load(run / "embeddings" / mode / "vectors.npy") for run in (a, b))
    assert x.shape == y.shape and len(x) > 0
    assert np.abs(x - y).max() <= 1e-5, mode
    rows = [(run / "embeddings" / mode / "rows.parquet").read_bytes() for run in (a, b)]
    assert rows[0] == rows[1]


def fingerprint(run: Path, artifact: str) -> str:
    from cbir.artifacts import Artifact

    return Artifact(RunLayout(run), artifact).meta()["fingerprint"]


def map_workers() -> list[int]:
    """Pids of the Ray Data actors holding a model (their process title names the map)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and title.startswith("ray::") and "MapWorker" in title:
            pids.append(int(proc.name))
    return pids


def when_first_shard(run: Path, artifact: str, act) -> dict:
    """Call `act()` once the stage has kept its first shard; what was there then is returned (filled in later)."""
    partial = RunLayout(run).partial(artifact)
    seen: dict = {}

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline and not seen:
            shards = list(partial.glob("shard_*")) if partial.exists() else []
            if shards:
                seen["shards_before"] = len(shards)
                seen["acted"] = act()
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return seen


def kill_one_worker() -> int:
    pid = map_workers()[0]
    os.kill(pid, signal.SIGKILL)
    return pid


def lose_a_node(cluster):
    """Remove a worker node the driver is not attached to (that would end the driver, not test the cluster)."""
    import ray

    def remove():
        driver = ray._private.worker.global_worker.node._raylet_socket_name
        cluster.remove_node(next(n for n in cluster.worker_nodes if n._raylet_socket_name != driver),
                            allow_graceful=False)
        return True

    return remove


def test_detect_and_every_embed_mode_on_ray_equal_the_local_run_through_a_killed_worker_and_a_lost_node(
        ray_cluster, local_run, prepared, tmp_path, monkeypatch):
    """Byte-identical boxes and vectors within 1e-5 of the local run, with the same fingerprints. One cluster
    run serves every check (a Ray pipeline costs seconds to start here): a worker process is killed with
    kill -9 during detect, and a whole node is lost during embed det, each once the first shard is kept."""
    run = copy_run(prepared, tmp_path / "ray")
    killed = when_first_shard(run, "detections", kill_one_worker)
    detect(DetectConfig(run=run, **SSD_ARGS, **on_ray(ray_cluster)))
    assert killed.get("acted") and killed["shards_before"] < 32 // SHARD, killed  # while shards were left
    assert_same_boxes(local_run, run)
    assert fingerprint(run, "detections") == fingerprint(local_run, "detections")
    for mode in ("full", "gt", "det"):
        lost = when_first_shard(run, "embeddings/det", lose_a_node(ray_cluster)) if mode == "det" else None
        try:
            embed(EmbedConfig(run=run, mode=mode, **EMBED_ARGS, **on_ray(ray_cluster)))
        finally:
            if len(ray_cluster.worker_nodes) < 2:
                ray_cluster.add_node(num_cpus=RAY_NODE_CPUS, node_ip_address="127.0.0.1")
                ray_cluster.wait_for_nodes()
        assert lost is None or (lost.get("acted") and lost["shards_before"] < 32 // SHARD), lost
        assert_same_vectors(local_run, run, mode)
        assert fingerprint(run, f"embeddings/{mode}") == fingerprint(local_run, f"embeddings/{mode}")

    def must_not_run(*args, **kwargs):
        raise AssertionError("a local rerun of a run made on Ray recomputed it")

    monkeypatch.setattr(DetectWork, "load", must_not_run)
    monkeypatch.setattr(embed_stage.EmbedWork, "load", must_not_run)
    detect(DetectConfig(run=run, **SSD_ARGS))  # the engine is not an input: fresh
    embed(EmbedConfig(run=run, mode="det", **EMBED_ARGS))


DRIVER = """import sys
from cbir.cli import main
from cbir.detection import stage
stage.SHARD_IMAGES = {shard}
sys.exit(main(sys.argv[1:]))
"""


def driver(run: Path, engine: str, marker: str) -> subprocess.Popen:
    """`cbir detect` in its own process (small shards), marked through its environment so that every process it
    starts can be found afterwards."""
    args = ["detect", "--run", str(run), "--detector", SSD_ARGS["detector"], "--labels", SSD_ARGS["labels"],
            "--categories", "bird", "--workers", "0", "--engine", engine, "--cpus-per-actor", str(RAY_NODE_CPUS)]
    env = {**os.environ, "CBIR_TEST_DRIVER": marker}
    return subprocess.Popen([sys.executable, "-c", DRIVER.format(shard=SHARD), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def marked(marker: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"CBIR_TEST_DRIVER={marker}".encode() in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


def stop_at_first_shard(run: Path, process: subprocess.Popen, how: int) -> int:
    partial = RunLayout(run).partial("detections")
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not list(partial.glob("shard_*")):
        time.sleep(0.02)
    process.send_signal(how)
    process.wait(60)
    return len(list(partial.glob("shard_*")))


def test_ctrl_c_stops_cleanly_a_killed_driver_resumes_from_its_shards(ray_cluster, local_run, prepared, tmp_path,
                                                                        monkeypatch):
    """Ctrl-C on a driver that started its own Ray instance (`--engine ray`): one line, and no Ray process left.
    kill -9 of a driver on the cluster: the rerun computes only the shards that were not kept."""
    run = copy_run(prepared, tmp_path / "ray")
    marker = uuid.uuid4().hex
    interrupted = driver(run, "ray", marker)
    kept = stop_at_first_shard(run, interrupted, signal.SIGINT)
    err = interrupted.stderr.read()
    assert interrupted.returncode == 130 and f"interrupted: {kept} of {32 // SHARD} shards are kept" in err, err
    assert "Traceback" not in err
    deadline = time.time() + 30
    while marked(marker) and time.time() < deadline:
        time.sleep(0.5)
    assert not marked(marker), "processes of the interrupted driver's Ray instance were left running"

    killed = driver(run, f"ray:{ray_cluster.address}", marker)
    kept = stop_at_first_shard(run, killed, signal.SIGKILL)
    assert 0 < kept < 32 // SHARD
    done = []
    real_run = DetectWork.run
    monkeypatch.setattr(DetectWork, "run", lambda self, model, rows, progress=None:
                        done.append(len(rows)) or real_run(self, model, rows, progress))
    detect(DetectConfig(run=run, **SSD_ARGS))  # resumed here, locally
    assert sum(done) == 32 - kept * SHARD
    assert_same_boxes(local_run, run)


def test_an_unreachable_cluster_is_one_line_within_seconds(mini_run, tmp_path, capsys):
    run = copy_run(mini_run, tmp_path / "run")
    started = time.time()
    code = main(["embed", "--run", str(run), "--mode", "full", "--backbone", "mobilenet_v2", "--weights",
                 str(MOBILENET), "--force", "--engine", "ray:127.0.0.1:1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and time.time() - started < 10
    assert "Traceback" not in err and "ray:127.0.0.1:1: no Ray cluster answers there" in err.splitlines()[-1], err


def test_every_ray_process_listens_on_loopback_only(ray_cluster):
    """Each listening socket of the cluster's processes is bound to 127.0.0.1 (never 0.0.0.0 or this
    machine's network address)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    ray_sockets = [line.split() for line in out.splitlines() if any(name in line for name in (
        '"gcs_server"', '"raylet"', '"ray::', '"python'))]
    assert ray_sockets, out
    wrong = [s[3] for s in ray_sockets if not s[3].startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:"))]
    assert not wrong, wrong


def test_run_json_gives_sync_the_engine_the_run_ran_on(tmp_path):
    """`cbir sync` reruns the stages with the settings `cbir run` recorded: the engine, its address and its pool
    come back as the same EngineConfig (not a dict, not the default local engine)."""
    from dataclasses import replace

    from cbir.engines import parse_engine
    from cbir.evaluation.retrieval import EvalConfig
    from cbir.pipeline import RunConfig, load_run_config, save_run_config
    from cbir.retrieval.index import IndexConfig

    run = tmp_path / "run"
    engine = replace(parse_engine("ray:127.0.0.1:6379"), actors=3, gpus_per_actor=0.5, cpus_per_actor=2)
    cfg = RunConfig(prepare=PrepareConfig(run=run, root=tmp_path / "photos", dataset="photos"),
                    detect=DetectConfig(run=run, **SSD_ARGS, engine=engine),
                    embed=EmbedConfig(run=run, mode="det", **EMBED_ARGS, engine=engine), modes=("full", "det"),
                    index=IndexConfig(run=run, embeddings="det"), evaluate=EvalConfig(run=run))
    layout = RunLayout(run)
    layout.root.mkdir()
    save_run_config(layout, cfg)
    loaded = load_run_config(layout)
    assert loaded.detect.engine == engine and loaded.embed.engine == engine


def test_a_photo_gone_from_the_folder_is_skipped_on_ray_as_in_a_local_run(ray_cluster, mini_copy, tmp_path):
    """The node check probes the first shard's photos; one deleted after `prepare` (the very first the stage
    reads) is the stage's to skip and report, as a local run does, not a node that cannot see the folder."""
    from cbir.datasets import load_dataset

    prepared = tmp_path / "prepared"
    prepare(PrepareConfig(run=prepared, root=mini_copy, split=MINI_SPLIT, workers=1))
    data = load_dataset(RunLayout(prepared))
    first = data.images[data.images.split.isin(DetectConfig(run=prepared).splits)].iloc[0]
    (mini_copy / "images" / first.path).unlink()
    local, ray_run = copy_run(prepared, tmp_path / "local"), copy_run(prepared, tmp_path / "ray")
    detect(DetectConfig(run=local, **SSD_ARGS))
    result = detect(DetectConfig(run=ray_run, **SSD_ARGS, **on_ray(ray_cluster)))
    assert_same_boxes(local, ray_run)
    assert [e["image_id"] for e in result.meta["unreadable"]] == [first.image_id], result.meta


def test_a_node_that_cannot_see_a_file_is_named_in_one_line(ray_cluster, tmp_path):
    import ray

    from cbir import CbirError
    from cbir.engines import parse_engine
    from cbir.engines.ray_engine import _check_nodes, _connect

    here = tmp_path / "weights.onnx"
    here.write_bytes(b"x")
    _connect(ray, parse_engine(f"ray:{ray_cluster.address}"))
    _check_nodes(ray, [str(here)])
    with pytest.raises(CbirError, match=r"node 127\.0\.0\.1 cannot read .*gone\.jpg; every node must see"):
        _check_nodes(ray, [str(here), str(tmp_path / "gone.jpg")])


def test_embed_head_with_a_fine_tuned_trunk_re_embeds_on_ray_as_in_this_process(ray_cluster, tmp_path,
                                                                                   monkeypatch):
    """`cbir embed --head MODEL --engine ray:ADDRESS`: a fine-tuned trunk re-embeds another set's rows on the
    cluster with its own weights, and the vectors are those the same command makes in this process."""
    import torch

    from cbir.encoders.stage import load_embeddings
    from cbir.training.stage import TrainConfig, train_embedder

    run = tmp_path / "run"  # three of cub_mini's four classes to train on: two to learn from, one to validate
    prepare(PrepareConfig(run=run, root=MINI, split="classes:1-16/17-20", workers=1))
    embed(EmbedConfig(run=run, mode="gt", **EMBED_ARGS, size=64, name="gt64"))  # small crops: a short training
    model = train_embedder(TrainConfig(run=run, embeddings="gt64", mode="finetune", epochs=1, lr=1e-3))["name"]
    # on 32 photos the best epoch may be the frozen one (epoch 0); a trunk that moved is made sure of, so that
    # vectors from the ImageNet weights on the cluster could not pass
    weights = run / "models" / model / "backbone.pth"
    state = torch.load(weights)
    state["features.0.0.weight"] *= 0.5
    torch.save(state, weights)
    command = ["embed", "--run", str(run), "--head", model, "--embeddings", "gt64"]
    assert main([*command, "--name", "gt64-here"]) == 0
    monkeypatch.setattr(embed_stage.EmbedWork, "load", lambda self: pytest.fail("the trunk was loaded here"))
    assert main([*command, "--name", "gt64-on-ray", "--engine", f"ray:{ray_cluster.address}",
                 "--cpus-per-actor", str(RAY_NODE_CPUS)]) == 0
    on_cluster, rows, info = load_embeddings(run, "gt64-on-ray")
    here, here_rows, _ = load_embeddings(run, "gt64-here")
    frozen, _, _ = load_embeddings(run, "gt64")
    assert Path(info["spec"]["weights"]) == weights.resolve()
    assert on_cluster.shape == here.shape and np.abs(on_cluster - here).max() <= 1e-5 and rows.equals(here_rows)
    assert not np.allclose(on_cluster, frozen, atol=1e-3)
