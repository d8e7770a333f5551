"""Shared fixtures: real CUB data from ../shared, the shipped mini sample, and runs built once per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from cbir.datasets.prepare import PrepareConfig, prepare
from cbir.detection.stage import DetectConfig, detect
from cbir.encoders.stage import EmbedConfig, embed
from cbir.metrics.eda import eda

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "cub_sample"
FULL_ANNOTATIONS = SHARED / "data" / "cub_annotations_full"
MOBILENET = SHARED / "weights" / "torchvision_mobilenet_v2_features_imagenet.pth"
EFFICIENTNET = SHARED / "weights" / "timm_tf_efficientnet_lite0_from_57934424.pth"
EXTERNAL = SAMPLE / "external_detections" / "yolov5n_coco_birds.json"
SSD = SHARED / "weights" / "coco_ssd_mobilenet_v1_quant.onnx"
SSD_LABELS = SSD.with_suffix(".labels.txt")
MINI = REPO / "examples" / "cub_mini"
MINI_SPLIT = "classes:1-10/11-20"

# Ray's idea of this node's address: loopback, as on macOS, not the address of this machine's network interface
# (Ray rewrites 127.0.0.1 to it, and no traffic may go there); read when ray is first imported
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def pytest_sessionstart(session):
    if not SAMPLE.exists():
        raise pytest.UsageError(f"{SHARED} is missing: the tests need the shared CUB sample and weights beside the checkout")


@pytest.fixture(scope="session")
def mini_run(tmp_path_factory) -> Path:
    """cub_mini prepared, external detections imported, full/gt/det embedded with real MobileNetV2."""
    run = tmp_path_factory.mktemp("mini") / "run"
    prepare(PrepareConfig(run=run, root=MINI, split=MINI_SPLIT, workers=1))
    detect(DetectConfig(run=run, detections=MINI / "external_detections.json"))
    for mode in ("full", "gt", "det"):
        embed(EmbedConfig(run=run, mode=mode, backbone="mobilenet_v2", weights=str(MOBILENET), workers=0))
    return run


@pytest.fixture(scope="session")
def sample_run(tmp_path_factory) -> Path:
    """The shared 1,115-image sample (classes 1-10 train / 11-20 test), external detections, real
    MobileNetV2 full and det embeddings: meaningful features for quality floors and cross-checks."""
    run = tmp_path_factory.mktemp("sample") / "run"
    prepare(PrepareConfig(run=run, root=SAMPLE, split="classes:1-10/11-20", workers=2))
    eda(run)
    detect(DetectConfig(run=run, detections=EXTERNAL))
    for mode in ("full", "det"):
        embed(EmbedConfig(run=run, mode=mode, backbone="mobilenet_v2", weights=str(MOBILENET), workers=2,
                          batch_size=64))
    return run


MILVUS_USER, MILVUS_PASSWORD = "cbir_tests", "Pw-never-written-7f3a9c"  # the tests look for it in every file


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """One real Milvus standalone server per test run (the PyPI `milvus` package, loopback only), with
    authentication on; cbir reaches it as a user of its own through $CBIR_MILVUS_TOKEN."""
    from pymilvus import MilvusClient
    from support.milvus_server import TOKEN, MilvusServer

    from cbir.retrieval.milvus_store import TOKEN_VARIABLE

    server = MilvusServer(tmp_path_factory.mktemp("milvus-server"), authorization=True).start()
    previous = os.environ.get(TOKEN_VARIABLE)
    try:
        admin = MilvusClient(uri=f"http://127.0.0.1:{server.port}", token=TOKEN)
        admin.create_user(MILVUS_USER, MILVUS_PASSWORD)
        admin.grant_role(MILVUS_USER, "admin")
        admin.close()
        os.environ[TOKEN_VARIABLE] = f"{MILVUS_USER}:{MILVUS_PASSWORD}"
        yield server
    finally:
        server.stop()
        if previous is None:
            os.environ.pop(TOKEN_VARIABLE, None)
        else:
            os.environ[TOKEN_VARIABLE] = previous


RAY_NODE_CPUS = 2


def on_ray(cluster) -> dict:
    """A stage config's engine on the test cluster, one replica per node with a local run's torch threads."""
    from dataclasses import replace

    from cbir.engines import parse_engine

    return {"engine": replace(parse_engine(f"ray:{cluster.address}"), cpus_per_actor=RAY_NODE_CPUS)}


@pytest.fixture(scope="session")
def ray_cluster():
    """One local multi-node Ray cluster per test run (Ray's own `cluster_utils.Cluster`): a head that holds no
    CPU and two worker nodes of two (logical) CPUs each, every process on 127.0.0.1; `ON_RAY` puts one model
    replica of two torch threads on each, the thread count of a local run here, so that the arithmetic and
    hence the boxes are the same bit for bit. Tests that remove a node add one back."""
    from ray.cluster_utils import Cluster

    fast_death = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 500,
                  "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}  # a lost node is seen in ~2 s
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": False, "_system_config": fast_death})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=RAY_NODE_CPUS, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        import ray

        ray.shutdown()  # the stages leave their driver connected; a node with a driver on it cannot be removed
        cluster.shutdown()


def copy_run(src: Path, dest: Path) -> Path:
    """A copy of a run as a user makes one (cp -a / rsync -a keep the artifact links)."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture
def mini_copy(tmp_path) -> Path:
    """A writable copy of cub_mini, for tests that damage files."""
    dest = tmp_path / "cub"
    shutil.copytree(MINI, dest)
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_page(run: Path, index: str, detector: str = "none"):
    """`cbir ui` started for real on a free loopback port (no detector unless `detector="run"`); yields its URL,
    stops it after."""
    port = _free_port()
    log = open(run / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cbir.cli", "ui", "--run", str(run), "--index", index, "--port",
                             str(port), "--detector", detector], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"ui did not start: {(run / 'ui.log').read_text()[-2000:]}")
            time.sleep(1)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def predict(url: str, path: Path, k: int = 5, score: float = 0.3, rerank: str = "kreciprocal"):
    """One query through the page's API, as gradio_client sends it."""
    from gradio_client import Client, handle_file

    return Client(url, verbose=False).predict(handle_file(str(path)), score, k, rerank, "", 0.3, api_name="/search")
