"""Bounded load test of the page: starts `cbir ui` on a free loopback port, then 1, 10 and 50 concurrent
clients (gradio_client, one thread each) send queries for a fixed time; records p50 / p95 latency,
answered queries/s and how many were told the page is busy. Loopback only; stops by itself.

    python benchmarks/page_load.py --run RUN --index det [--clients 1,10,50] [--seconds 30] [--rerank kreciprocal]

Results → benchmarks/results/page_load_cpu.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

OUT = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_page(run: str, index: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cbir.cli", "ui", "--run", run, "--index", index, "--port",
                             str(port), "--detector", "none"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise SystemExit("the page did not start")
            time.sleep(1)


def client_loop(url: str, photos: list[Path], rerank: str, until: float, latencies: list, busy: list, errors: list,
                seed: int) -> None:
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    rng = np.random.default_rng(seed)
    while time.time() < until:
        photo = photos[rng.integers(len(photos))]
        start = time.perf_counter()
        try:
            client.predict(handle_file(str(photo)), 0.3, 10, rerank, "", 0.3, api_name="/search")
            latencies.append(time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 — a full queue answers with an error, which is the point
            (busy if "queue" in str(e).lower() or "full" in str(e).lower() else errors).append(str(e)[:120])
            time.sleep(0.5)


def load(url: str, photos: list[Path], clients: int, seconds: float, rerank: str) -> dict:
    latencies, busy, errors = [], [], []
    until = time.time() + seconds
    threads = [threading.Thread(target=client_loop, args=(url, photos, rerank, until, latencies, busy, errors, i))
               for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"clients": clients, "answered": len(latencies), "busy": len(busy), "errors": len(errors),
            "p50_s": round(float(np.median(lat)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
            "max_s": round(float(lat.max()), 3), "queries_per_s": round(len(latencies) / elapsed, 2),
            "first_error": errors[0] if errors else ""}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--index", default="det")
    p.add_argument("--clients", default="1,10,50")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--rerank", default="kreciprocal")
    p.add_argument("--photos", type=int, default=40, help="test photos sent at random")
    a = p.parse_args()
    from cbir.datasets import load_dataset
    from cbir.layout import RunLayout

    data = load_dataset(RunLayout(a.run))
    photos = [data.image_path(p) for p in data.images[data.images.split == "test"].path.head(a.photos)]
    proc, url = start_page(a.run, a.index)
    try:
        rows = []
        for n in map(int, a.clients.split(",")):
            row = load(url, photos, n, a.seconds, a.rerank)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    OUT.mkdir(exist_ok=True)
    result = {"machine": machine, "run": a.run, "index": a.index, "seconds": a.seconds, "rerank": a.rerank,
              "detector": "none", "rows": rows}
    (OUT / "page_load_cpu.json").write_text(json.dumps(result, indent=1))
    header = ["clients", "answered", "busy", "errors", "p50_s", "p95_s", "max_s", "queries_per_s"]
    lines = [f"Page load ({machine}; `cbir ui --detector none`, index {a.index}, re-ranking {a.rerank}, "
             f"{a.seconds:g} s per row; `python benchmarks/page_load.py`)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    (OUT / "page_load_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
