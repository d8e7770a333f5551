"""The same stage in this process and on Ray (`--engine`): photos/s, and Ray's overhead ratio on the same cores.

    python benchmarks/engine_bench.py --cub ../shared/data/cub_sample \
        --detector onnx:../shared/weights/coco_ssd_mobilenet_v1_quant.onnx \
        --labels ../shared/weights/coco_ssd_mobilenet_v1_quant.labels.txt \
        --weights ../shared/weights/torchvision_mobilenet_v2_features_imagenet.pth

Each configuration runs in its own process, on a fresh copy of one prepared run:
- `local` on 1 core (taskset, 1 torch thread) against `ray` with 1 node of 1 CPU, the whole cluster on that core;
- `local` on 2 cores (2 torch threads) against `ray` with 2 nodes of 1 CPU each (one 1-thread replica per node).
A Ray cluster is Ray's own `cluster_utils.Cluster`, every node on 127.0.0.1, started before the clock starts; the
stage's time includes connecting, starting the actors and loading the model in each. Each cluster runs the stage
twice, on two fresh copies of the run: `cold` is the first job on a new cluster (Ray Data starts its own helper
actors then, once per cluster), `warm` the second, as a job joining a running cluster (`ray:ADDRESS`) meets it.
Ray's start-up is how much later its first shard is kept than the local run's first shard on the same cores;
"after start-up" divides the photos by the stage's time less that start-up: the pipeline's rate once its actors
hold a model. The outputs
are compared with the local run's on the same cores (boxes byte for byte, vectors by their largest difference).
`photos for 25 %` extrapolates, from the measured start-up and rates, the fewest photos at which the whole Ray
stage is within 25 % of the local one (an estimate that assumes the rates hold, not a measurement); `--passes`
measures it instead, on galleries that list the sample several times (the same photo files under new image ids,
so each pass is the same work again).
Each local configuration runs twice, in fresh processes before and after its Ray runs, and the faster of the two is
the baseline: a local run slowed by something else on the machine (seen here: 36 s against 15 s for the same
stage, from one run of the script to the next) would otherwise make Ray look faster than it is.
With `--gpu` (a GPU machine), the Ray runs use 1..N actors per GPU.
Results → benchmarks/results/engine_bench_<device>.{md,json}.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"


def run_stage(a) -> list[dict]:
    """One configuration, in this process: for each of its runs in turn (on the same cluster), the stage's wall
    time and the time its first shard was kept."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the cluster below is on 127.0.0.1 only
    from dataclasses import replace

    import torch

    from cbir.engines import LOCAL, parse_engine

    torch.set_num_threads(a.threads)
    engine, cluster = LOCAL, None
    if a.nodes:
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                                "include_dashboard": False, "num_gpus": 0})
        for _ in range(a.nodes):
            cluster.add_node(num_cpus=a.cpus_per_node, node_ip_address="127.0.0.1",
                             num_gpus=a.gpus_per_node)
        cluster.wait_for_nodes()
        engine = replace(parse_engine(f"ray:{cluster.address}"), actors=a.actors,
                         gpus_per_actor=(a.gpus_per_node / a.actors) if a.gpus_per_node else 0.0)
    results = [time_stage(a, run, engine) for run in a.runs]
    if cluster is not None:
        import ray

        ray.shutdown()
        cluster.shutdown()
    return results


def time_stage(a, run: Path, engine) -> dict:
    """The stage on `run`: its seconds, and when its first shard was kept (a thread watches the shard folder)."""
    from cbir.detection.stage import DetectConfig, detect
    from cbir.encoders.stage import EmbedConfig, embed
    from cbir.layout import RunLayout

    artifact = "detections" if a.stage == "detect" else "embeddings/full"
    partial = RunLayout(run).partial(artifact)
    first: list[float] = []

    def watch():
        while not first:
            if partial.exists() and any(partial.glob("shard_*")):
                first.append(time.perf_counter())
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    started = time.perf_counter()
    if a.stage == "detect":
        detect(DetectConfig(run=run, detector=a.detector, labels=a.labels, categories=("bird",), workers=0,
                            device=a.device, engine=engine))
    else:
        embed(EmbedConfig(run=run, mode="full", backbone="mobilenet_v2", weights=a.weights, workers=0,
                          device=a.device, engine=engine))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "first_shard_s": (first[0] - started) if first else None}


def compare(stage: str, reference: Path, run: Path) -> str:
    import numpy as np

    if stage == "detect":
        same = all(filecmp.cmp(reference / "detections" / f, run / "detections" / f, shallow=False)
                   for f in ("detections.json", "raw_detections.json"))
        return "boxes identical" if same else "boxes differ"
    x, y = (np.load(r / "embeddings" / "full" / "vectors.npy") for r in (reference, run))
    return f"vectors: largest difference {np.abs(x - y).max():.1e}"


def configurations(a) -> list[tuple[str, dict, list[dict]]]:
    """(the cores compared, the local configuration, the Ray configurations on the same cores)."""
    if a.gpu:
        local = {"name": "local (1 GPU)", "cores": None, "threads": os.cpu_count(), "nodes": 0}
        return [("1 GPU", local, [{"name": f"ray, 1 node, {n} actor(s) on the GPU", "cores": None,
                                   "threads": os.cpu_count(), "nodes": 1, "cpus_per_node": os.cpu_count(),
                                   "gpus_per_node": 1, "actors": n} for n in a.actors])]
    return [("1 core", {"name": "local, 1 core", "cores": "0", "threads": 1, "nodes": 0},
             [{"name": "ray, 1 node of 1 CPU", "cores": "0", "threads": 1, "nodes": 1, "cpus_per_node": 1}]),
            ("2 cores", {"name": "local, 2 cores", "cores": "0,1", "threads": 2, "nodes": 0},
             [{"name": "ray, 2 nodes of 1 CPU", "cores": "0,1", "threads": 2, "nodes": 2, "cpus_per_node": 1}])]


ID_STEP = 10_000_000  # pass k's image ids are k * ID_STEP + the sample's own


def repeated_sample(cub: Path, passes: int, folder: Path) -> Path:
    """The CUB sample listed `passes` times, as a CUB folder: pass k's photos are the sample's files under
    images/k/ (a link to the sample's image folder), with image ids k * ID_STEP + id and the same class, box
    and split. Every photo is decoded and computed again in each pass: the stages key nothing by content."""
    images = folder / "images"
    images.mkdir(parents=True)
    shutil.copy(cub / "classes.txt", folder / "classes.txt")
    for k in range(passes):
        (images / str(k)).symlink_to((cub / "images").resolve(), target_is_directory=True)
    for name in ("images.txt", "image_class_labels.txt", "bounding_boxes.txt", "train_test_split.txt"):
        rows = [line.split(" ", 1) for line in (cub / name).read_text().splitlines() if line.strip()]
        with open(folder / name, "w") as f:
            prefix = "{}/" if name == "images.txt" else ""  # the pass's folder, before the image's path
            f.writelines(f"{k * ID_STEP + int(i)} {prefix.format(k)}{rest}\n"
                         for k in range(passes) for i, rest in rows)
    return folder


def prepare_run(a, passes: int) -> tuple[Path, int]:
    """The prepared run of a gallery of `passes` passes (both stages' input: embedding full images needs no
    boxes), and its photo count."""
    from cbir.datasets import load_dataset
    from cbir.datasets.prepare import PrepareConfig, prepare
    from cbir.layout import RunLayout

    work = a.work / f"x{passes}"
    cub = a.cub if passes == 1 else repeated_sample(a.cub, passes, work / "cub")
    prepared = work / "prepared"
    prepare(PrepareConfig(run=prepared, root=cub, split="classes:1-10/11-20", workers=2))
    return prepared, int(load_dataset(RunLayout(prepared)).images.split.isin(["train", "test"]).sum())


def run_configuration(a, c: dict, stage: str, runs: list[Path], device: str) -> list[dict]:
    """One configuration in a child process (pinned to its cores): each of `runs` in turn."""
    command = [sys.executable, __file__, "--one", "--stage", stage, "--runs", *map(str, runs),
               "--cub", str(a.cub), "--detector", a.detector, "--weights", a.weights, "--threads", str(c["threads"]),
               "--nodes", str(c["nodes"]), "--cpus-per-node", str(c.get("cpus_per_node", 1)),
               "--gpus-per-node", str(c.get("gpus_per_node", 0)), "--actors", str(c.get("actors", "")),
               "--device", device] + (["--labels", a.labels] if a.labels else [])
    if c["cores"]:
        command = ["taskset", "-c", c["cores"], *command]
    env = {**os.environ, "OMP_NUM_THREADS": str(c["threads"])}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{c['name']} {stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cub", type=Path, required=True)
    p.add_argument("--detector", required=True)
    p.add_argument("--labels")
    p.add_argument("--weights", required=True)
    p.add_argument("--stages", default="detect,embed")
    p.add_argument("--passes", default="1,5", help="galleries of the CUB sample listed this many times")
    p.add_argument("--gpu", action="store_true", help="a GPU machine: local against 1..N actors on one GPU")
    p.add_argument("--actors", default="1,2,4", help="--gpu: actors per GPU to try")
    p.add_argument("--work", type=Path, default=Path("/tmp/cbir_engine_bench"))
    # one configuration (what the parent runs in a child process)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--runs", type=Path, nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cpus-per-node", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--gpus-per-node", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        a.actors = int(a.actors) if a.actors.isdigit() else None
        print(json.dumps(run_stage(a)))
        return
    a.actors = [int(n) for n in a.actors.split(",")]
    device = "cuda" if a.gpu else "cpu"
    shutil.rmtree(a.work, ignore_errors=True)
    rows = []
    for passes in map(int, a.passes.split(",")):
        prepared, photos = prepare_run(a, passes)
        for stage in a.stages.split(","):
            for cores, local, on_ray in configurations(a):
                # the local configuration before and after its Ray runs (the faster is the baseline)
                group = []
                for c, jobs in [(local, ("before Ray",)), *[(r, ("cold", "warm")) for r in on_ray],
                                (local, ("after Ray",))]:
                    runs = [a.work / f"{stage}-{len(rows) + len(group) + i}" for i in range(len(jobs))]
                    for run in runs:
                        shutil.copytree(prepared, run, symlinks=True)
                    for job, run, result in zip(jobs, runs, run_configuration(a, c, stage, runs, device)):
                        first = result["first_shard_s"]
                        group.append({"stage": stage, "photos": photos, "passes": passes, "cores": cores,
                                      "local": c is local,
                                      "config": f"{c['name']}, {job}", "seconds": round(result["seconds"], 1),
                                      "photos_per_s": round(photos / result["seconds"], 2),
                                      "first_shard_s": round(first, 1) if first else None, "run": str(run)})
                        print(json.dumps(group[-1]), flush=True)
                against_local(group)
                for r in group:  # compared: the copies go (5 passes of embeddings are a GB of shards)
                    shutil.rmtree(r.pop("run"), ignore_errors=True)
                rows += group
    write(rows, a, device)


def against_local(rows: list[dict]) -> None:
    """Each Ray row against the faster local run on the same cores: the outputs, the whole stage, its start-up
    (how much later its first shard came), and the rate once the start-up is left out."""
    base = min((r for r in rows if r["local"]), key=lambda r: r["seconds"])
    for r in rows:
        if r["local"]:
            r["same_as_local"] = "baseline" if r is base else "-"
            continue
        r["same_as_local"] = compare(r["stage"], Path(base["run"]), Path(r["run"]))
        r["vs_local"] = round(r["photos_per_s"] / base["photos_per_s"], 3)
        if r["first_shard_s"] and base["first_shard_s"]:
            r["start_up_s"] = round(r["first_shard_s"] - base["first_shard_s"], 1)
            r["after_start_up_vs_local"] = round(base["seconds"] / (r["seconds"] - r["start_up_s"]), 3)
            r["photos_for_25_percent"] = photos_within(0.75, r["start_up_s"], r["photos"] / base["seconds"],
                                                       r["photos"] / (r["seconds"] - r["start_up_s"]))


def photos_within(ratio: float, start_up_s: float, local_rate: float, ray_rate: float) -> int | None:
    """The fewest photos n at which n / local_rate >= ratio * (start_up_s + n / ray_rate): where Ray's start-up,
    paid once, has shrunk to what `ratio` allows. None where Ray's own rate is below `ratio` of the local one
    (no size is enough); 0 where the start-up does not matter."""
    room = 1 / local_rate - ratio / ray_rate
    if room <= 0:
        return None
    return max(0, math.ceil(ratio * start_up_s / room))


def write(rows: list[dict], a, device: str) -> None:
    import ray
    import torch

    OUT.mkdir(exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores" + (f", {torch.cuda.get_device_name(0)}" if a.gpu else "")
    (OUT / f"engine_bench_{device}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    title = f"# Engine benchmark: local against Ray ({machine}, ray {ray.__version__}, torch {torch.__version__})"
    sample = rows[0]["photos"] // rows[0]["passes"]
    about = (f"The CUB sample ({sample:,} photos), and galleries that list it several times (`photos` = {sample:,} "
             "x passes: the same files under new image ids, so each pass is the same work again); detect = the "
             "COCO SSD (ONNX), embed = full images through MobileNetV2 (ImageNet weights). Each row is a fresh "
             "process on a fresh copy of the run; the Ray cluster (loopback, `cluster_utils.Cluster`) is started "
             "before the clock. Each local configuration runs before and after its Ray runs, and the faster "
             "(`baseline`) is what Ray is compared with. `vs local`: photos/s over the baseline's; `start-up`: how"
             " much later Ray kept its first shard than the baseline; `after start-up`: the baseline's seconds "
             "over Ray's less its start-up; `photos for 25 %`: the fewest photos at which the whole Ray stage "
             "would be within 25 % of the local one, extrapolated from these rates and start-up (an estimate; the "
             "larger galleries measure it). `cold`: the first job on a new cluster; `warm`: the second, as a job "
             "that joins a running cluster meets it.")
    header = ("| stage | photos | engine | seconds | photos/s | first shard (s) | vs local | start-up (s) | after "
              "start-up vs local | photos for 25 % | output against local |")
    lines = [title, "", about, "", header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['photos']} | {r['config']} | {r['seconds']} | {r['photos_per_s']} | "
                     f"{r['first_shard_s']} | {r.get('vs_local', '-')} | {r.get('start_up_s', '-')} | "
                     f"{r.get('after_start_up_vs_local', '-')} | {within_text(r)} | {r['same_as_local']} |")
    (OUT / f"engine_bench_{device}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def within_text(row: dict) -> str:
    if "photos_for_25_percent" not in row:
        return "-"
    n = row["photos_for_25_percent"]
    return "never" if n is None else f"{n:,}"


if __name__ == "__main__":
    main()
