"""Service load benchmark: `cbir serve` under 1, 10 and 50 concurrent clients on loopback, against the
in-process batched `Querier` measured in the same run.

    python benchmarks/serve_load.py --photos ../shared/data/cub_sample/images [--seconds 20] [--work DIR]
        --detector onnx:SSD.onnx --labels SSD.labels.txt --weights MOBILENET.pth

1. A run of the photos as a folder (`cbir run --photos DIR --modes det`, the given detector and MobileNetV2).
2. **In process**: `Querier.photo_documents` over batches of `--max-batch` photos for `--seconds`: what the
   models and the store can answer with no HTTP at all (photos decoded beforehand, as the service decodes
   them in its request threads while the batch before is computed).
3. **Over HTTP**: `cbir serve --no-ui` as a subprocess; for each client count, that many threads each POST
   /v1/search (a photo drawn from the folder, k 10) back to back for `--seconds`, each request timed from
   send to full answer. Reported: answered queries/s, p50/p95 latency of the answered ones, 503s (the bounded
   queue refusing the excess, which a client retries after Retry-After), and anything else (timeouts,
   dropped connections, 5xx) — which should be zero.

The clients run on the same 2 cores as the server: at 50 clients they take CPU from it, which the
in-process baseline does not pay. Results → benchmarks/results/serve_load_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
from report import write_report

from cbir.images import open_photo
from cbir.retrieval.query import Querier
from cbir.retrieval.rerank import Rerank

CLIENTS = (1, 10, 50)


def build_run(photos: Path, run: Path, flags: list[str]) -> None:
    if (run / "index" / "det").exists():
        return
    subprocess.run([sys.executable, "-m", "cbir.cli", "run", "--photos", str(photos), "--out", str(run),
                    "--modes", "det", "--backbone", "mobilenet_v2", *flags], check=True)


def in_process(run: Path, files: list[Path], seconds: float, batch: int) -> dict:
    querier = Querier(run, "det")
    photos = [open_photo(f) for f in files[:64]]
    names = [f.name for f in files[:64]]
    querier.photo_documents(photos[:batch], names[:batch], names[:batch], 10, rerank=Rerank())  # warm up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        i = done % (len(photos) - batch)
        querier.photo_documents(photos[i:i + batch], names[i:i + batch], names[i:i + batch], 10, rerank=Rerank())
        done += batch
    return {"queries": done, "seconds": round(time.perf_counter() - start, 2),
            "queries/s": round(done / (time.perf_counter() - start), 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, port: int, log: Path, max_queue: int, max_batch: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cbir.cli", "serve", "--run", str(run), "--index", "det",
                             "--port", str(port), "--no-ui", "--rerank", "none", "--max-queue", str(max_queue),
                             "--max-batch", str(max_batch)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).read())["ready"]:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"cbir serve did not start: {log.read_text()[-2000:]}")


def load(url: str, blobs: list[tuple[str, bytes]], clients: int, seconds: float, timeout: float) -> dict:
    latencies, statuses, failures = [], [], []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client(seed: int):
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=timeout, trust_env=False) as http:
            while time.perf_counter() < stop:
                name, data = blobs[rng.randrange(len(blobs))]
                start = time.perf_counter()
                try:
                    r = http.post("/v1/search", files={"photo": (name, data, "image/jpeg")}, data={"k": "10"})
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                took = time.perf_counter() - start
                with lock:
                    statuses.append(status)
                    if status == 200:
                        latencies.append(took)
                    elif status == 503:
                        pass
                    else:
                        failures.append(str(status))
                if status == 503:
                    time.sleep(float(r.headers.get("retry-after", 1)) * rng.uniform(0.5, 1.5))

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"clients": clients, "answered": len(latencies), "queries/s": round(len(latencies) / wall, 2),
            "p50 ms": round(float(np.percentile(ms, 50)), 0) if len(ms) else None,
            "p95 ms": round(float(np.percentile(ms, 95)), 0) if len(ms) else None,
            "503 (queue full)": statuses.count(503), "other failures": len(failures),
            "failure kinds": sorted(set(failures))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=Path, required=True, help="a folder of real photos")
    ap.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--detector", default=None)
    ap.add_argument("--labels", default=None)
    ap.add_argument("--weights", default=None, help="MobileNetV2 weights")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=32)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="serve_load_"))
    flags = [*(["--detector", a.detector] if a.detector else []), *(["--labels", a.labels] if a.labels else []),
             *(["--weights", a.weights] if a.weights else [])]
    run = work / "run"
    build_run(a.photos, run, flags)
    files = sorted(a.photos.rglob("*.jpg"))
    random.Random(0).shuffle(files)
    baseline = in_process(run, files, a.seconds, a.max_batch)
    port = free_port()
    server = start_server(run, port, work / "serve.log", a.max_queue, a.max_batch)
    blobs = [(f.name, f.read_bytes()) for f in files[:64]]
    try:
        rows = [load(f"http://127.0.0.1:{port}", blobs, n, a.seconds, timeout=60.0) for n in CLIENTS]
    finally:
        server.terminate()
        server.wait(60)
    for row in rows:
        row["share of in-process"] = f"{100 * row['queries/s'] / baseline['queries/s']:.0f} %"
    ten = next(r for r in rows if r["clients"] == 10)
    fifty = next(r for r in rows if r["clients"] == 50)
    verdicts = [f"10 clients: {ten['share of in-process']} of the in-process throughput (goal: at least 80 %) — "
                f"{'met' if ten['queries/s'] >= 0.8 * baseline['queries/s'] else 'NOT met'}",
                f"50 clients: p95 {fifty['p95 ms']} ms, {fifty['503 (queue full)']} answered 503, "
                f"{fifty['other failures']} timeouts or dropped connections (goal: none) — "
                f"{'met' if fifty['other failures'] == 0 else 'NOT met'}"]
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "command": " ".join(["python", *sys.argv]), "photos": len(files), "in_process": baseline,
              "http": rows, "verdicts": verdicts, "max_batch": a.max_batch, "max_queue": a.max_queue}
    table = pd.DataFrame([{k: v for k, v in r.items() if k != "failure kinds"} for r in rows])
    parts = ["# Service load", "", f"`{result['command']}` — {result['machine']}", "",
             f"A run of {len(files)} photos (`cbir run --photos --modes det {' '.join(flags)}`); queries are "
             f"photos of the folder, k 10, no re-ranking, `--max-batch {a.max_batch} --max-queue {a.max_queue}`; "
             f"{a.seconds:g} s per row. In process (`Querier.photo_documents`, batches of {a.max_batch}, photos "
             f"decoded beforehand): **{baseline['queries/s']} queries/s**.", "",
             table.to_markdown(index=False), "", *[f"- {v}" for v in verdicts], "",
             "The clients share the server's 2 cores (HTTP, multipart encoding, threads): at 50 clients they take "
             "CPU the in-process baseline does not pay.", ""]
    write_report("serve_load_cpu", result, parts)
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
