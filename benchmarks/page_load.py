"""Bounded load test of the page: starts `cbir ui` on a free loopback port, then 1, 10 and 50 concurrent
clients (plain HTTP, one thread each, calling the page's API as its browser code does, pictures fetched
too) send queries for a fixed time; records p50 / p95 latency, answered queries/s, how many were told the
page is busy, and the CPU the page and the load generator used. Loopback only; stops by itself.

    python benchmarks/page_load.py --run RUN --index det [--clients 1,10,50] [--seconds 30] [--warmup 10]
        [--rerank kreciprocal]

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


def urls_in(value) -> list[str]:
    """Every file URL in a Gradio answer: the boxed photo and the neighbour cards a browser would fetch."""
    if isinstance(value, dict):
        return ([value["url"]] if isinstance(value.get("url"), str) else []) + \
            [u for v in value.values() for u in urls_in(v)]
    if isinstance(value, list):
        return [u for v in value for u in urls_in(v)]
    return []


def one_query(http, url: str, photo: Path, rerank: str) -> str:
    """What the page's browser code does for one search, over Gradio's HTTP API: upload the photo, queue the
    call, read its event stream to the end, then fetch every picture of the answer. Returns "answered" or
    "busy"; anything else raises."""
    with photo.open("rb") as f:
        uploaded = http.post(url + "gradio_api/upload", files={"files": f}).raise_for_status().json()[0]
    call = http.post(url + "gradio_api/call/search", json={"data": [
        {"path": uploaded, "meta": {"_type": "gradio.FileData"}}, 0.3, 10, rerank, "", 0.3]})
    if call.status_code == 503:  # the bounded queue is full: the page said it is busy at once
        return "busy"
    event = call.raise_for_status().json()["event_id"]
    with http.stream("GET", f"{url}gradio_api/call/search/{event}", timeout=600) as stream:
        lines = list(stream.iter_lines())
    kind = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")), "")
    if kind != "complete":
        raise RuntimeError(f"event {kind!r}: {' '.join(lines)[:120]}")
    data = json.loads(next(line[5:] for line in lines if line.startswith("data:")))
    for picture in urls_in(data):
        http.get(picture).raise_for_status()
    return "answered"


def client_loop(url: str, photos: list[Path], rerank: str, until: float, latencies: list, busy: list, errors: list,
                seed: int) -> None:
    """One simulated visitor, searching again as soon as an answer is in (a busy page: again after 0.5 s).
    Plain HTTP, not gradio_client: on 2 cores ten gradio_client threads burnt more CPU than the page they
    measured (29 s against the server's 13 s for one 20 s row), which measured the client."""
    import httpx

    rng = np.random.default_rng(seed)
    with httpx.Client(timeout=60) as http:
        while time.time() < until:
            photo = photos[rng.integers(len(photos))]
            start = time.perf_counter()
            try:
                if one_query(http, url, photo, rerank) == "answered":
                    latencies.append(time.perf_counter() - start)
                    continue
                busy.append(time.perf_counter() - start)
            except Exception as e:  # noqa: BLE001 — counted and shown, the load goes on
                errors.append(f"{type(e).__name__}: {e}"[:120])
            time.sleep(0.5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, server: int, photos: list[Path], clients: int, seconds: float, rerank: str) -> dict:
    """One row: `clients` visitors for `seconds`, with the CPU the page and this load generator used (on a
    small machine both share the same cores, so the client's share is part of the reading)."""
    latencies, busy, errors = [], [], []
    server_cpu, client_cpu = cpu_seconds(server), time.process_time()
    until = time.time() + seconds
    threads = [threading.Thread(target=client_loop, args=(url, photos, rerank, until, latencies, busy, errors, i))
               for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    elapsed = time.perf_counter() - start
    server_cpu, client_cpu = cpu_seconds(server) - server_cpu, time.process_time() - client_cpu
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"clients": clients, "answered": len(latencies), "busy": len(busy), "errors": len(errors),
            "p50_s": round(float(np.median(lat)), 3), "p95_s": round(float(np.percentile(lat, 95)), 3),
            "max_s": round(float(lat.max()), 3), "queries_per_s": round(len(latencies) / elapsed, 2),
            "server_cpu_s_per_query": round(server_cpu / max(len(latencies), 1), 3),
            "client_cpu_share": round(client_cpu / max(server_cpu + client_cpu, 1e-9), 3),
            "first_error": errors[0] if errors else ""}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--index", default="det")
    p.add_argument("--clients", default="1,10,50")
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--rerank", default="kreciprocal")
    p.add_argument("--photos", type=int, default=40, help="test photos sent at random")
    p.add_argument("--warmup", type=float, default=10,
                   help="seconds of 10-client load first, not recorded: the rows measure a page in steady state "
                        "(model warmed up, recurring neighbour cards written), not its first minute")
    a = p.parse_args()
    from cbir.datasets import load_dataset
    from cbir.layout import RunLayout

    data = load_dataset(RunLayout(a.run))
    photos = [data.image_path(p) for p in data.images[data.images.split == "test"].path.head(a.photos)]
    proc, url = start_page(a.run, a.index)
    try:
        load(url, proc.pid, photos, 10, a.warmup, a.rerank)
        rows = []
        for n in map(int, a.clients.split(",")):
            row = load(url, proc.pid, photos, n, a.seconds, a.rerank)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    OUT.mkdir(exist_ok=True)
    result = {"machine": machine, "run": a.run, "index": a.index, "seconds": a.seconds, "warmup_s": a.warmup,
              "rerank": a.rerank,
              "detector": "none", "rows": rows}
    (OUT / "page_load_cpu.json").write_text(json.dumps(result, indent=1))
    header = ["clients", "answered", "busy", "errors", "p50_s", "p95_s", "max_s", "queries_per_s",
              "server_cpu_s_per_query", "client_cpu_share"]
    lines = [f"Page load ({machine}; `cbir ui --detector none`, index {a.index}, re-ranking {a.rerank}, "
             f"{a.seconds:g} s per row after a {a.warmup:g} s warm-up; the load generator shares the cores; "
             f"`python benchmarks/page_load.py`)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    (OUT / "page_load_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
