"""`cbir serve`: the service in-process (FastAPI's TestClient) and as a real subprocess on 127.0.0.1, over the
mini sample boxed by the real COCO-trained ONNX SSD and embedded with real ImageNet MobileNetV2.

Answers are compared with `cbir search --json` run for real; refused requests must leave the run as it was;
the app is fuzzed against its own OpenAPI spec with schemathesis."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import pytest
from conftest import MINI, MOBILENET, REPO, SHARED, SSD, SSD_LABELS, _free_port, copy_run
from PIL import Image

from cbir.service.batcher import Batcher, Busy

pytest.importorskip("onnxruntime")
from fastapi.testclient import TestClient

from cbir.service.app import ServeConfig, build_service

PHOTOS = sorted((MINI / "images").rglob("*.jpg"))
OUTSIDE = sorted((SHARED / "data" / "cub_sample" / "images").rglob("*.jpg"))[-1]  # a CUB photo not in the mini run
WRITE_KEY, READ_KEY = "write-key-0123456789abcdef", "read-key-0123456789abcdef"


@pytest.fixture(scope="module")
def boxed_run(mini_run, tmp_path_factory) -> Path:
    from cbir.detection.stage import DetectConfig, detect
    from cbir.encoders.stage import EmbedConfig, embed
    from cbir.retrieval.index import IndexConfig, build_index

    run = copy_run(mini_run, tmp_path_factory.mktemp("serve") / "run")
    detect(DetectConfig(run=run, detector=f"onnx:{SSD}", labels=str(SSD_LABELS), categories=("bird",), score=0.5,
                        workers=0, force=True))
    embed(EmbedConfig(run=run, mode="det", backbone="mobilenet_v2", weights=str(MOBILENET), workers=0))
    build_index(IndexConfig(run=run, embeddings="det", pca=16, factory="Flat"))
    return run


@pytest.fixture
def run(boxed_run, tmp_path) -> Path:
    """A writable copy per test: edits by one test never reach another."""
    return copy_run(boxed_run, tmp_path / "run")


def client(run: Path, **settings) -> TestClient:
    return TestClient(build_service(ServeConfig(run=run, index="det", ui=False, **settings)))


def upload(path: Path, name: str | None = None, kind: str = "image/jpeg"):
    return {"photo": (name or path.name, path.read_bytes(), kind)}


def cli(*argv: str) -> tuple[int, str, str]:
    """`cbir ARGV` as the command line runs it (argparse, the handler, the printing), in this process."""
    from cbir.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def cli_search(run: Path, *args: str) -> dict | list:
    code, out, err = cli("search", "--run", str(run), "--index", "det", "--json", *args)
    assert code == 0, err[-2000:]
    return json.loads(out)


def state_of(run: Path) -> dict:
    """What a refused request must not change: every file of the run with its size and time."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")
            if p.is_file() and p.name != ".lock"}


def test_answers_equal_the_cli(run):
    """Photos (a gallery photo that finds itself, one from outside), re-ranking, a filter, an id, one box."""
    photos = [PHOTOS[0], OUTSIDE]
    settings = [("5", "none", None), ("4", "kreciprocal", "split == 'test'")]
    with client(run) as c:
        for k, rerank, filter_ in settings:
            form = {"k": k, "rerank": rerank, **({"filter": filter_} if filter_ else {})}
            served = [c.post("/v1/search", files=upload(p), data=form) for p in photos]
            assert [r.status_code for r in served] == [200, 200], served[0].text
            local = cli_search(run, "--image", *map(str, photos), "--k", k, "--rerank", rerank,
                               *(["--filter", filter_] if filter_ else []))
            assert [{**r.json(), "query": str(p)} for r, p in zip(served, photos)] == local
        similar = c.get("/v1/images/3/similar", params={"k": 6, "rerank": "none"}).json()
        assert similar == cli_search(run, "--query-id", "3", "--k", "6", "--rerank", "none")
        whole = c.post("/v1/search", files=upload(PHOTOS[0]), data={"k": "3"}).json()
        one = c.post("/v1/search", files=upload(PHOTOS[0]), data={"k": "3", "box": "1"}).json()
        assert one["boxes"] == whole["boxes"][:1] and one["images"] == whole["boxes"][0]["images"]
        assert whole["itself"] == 3 and whole["images"][0]["itself"]


def test_add_then_search_finds_it_and_delete_then_not(run):
    with client(run) as c:
        before = c.get("/v1/index").json()["count"]
        added = c.post("/v1/images", files=[("photos", (OUTSIDE.name, OUTSIDE.read_bytes(), "image/jpeg"))])
        assert added.status_code == 201, added.text
        (entry,) = added.json()["added"]
        assert entry["new"] and entry["instances"] >= 1
        again = c.post("/v1/images", files=[("photos", ("copy.jpg", OUTSIDE.read_bytes(), "image/jpeg"))]).json()
        assert again["added"][0] == {**entry, "filename": "copy.jpg", "new": False} and again["instances"] == 0
        assert c.get("/v1/index").json()["count"] == before + entry["instances"]
        top = c.post("/v1/search", files=upload(OUTSIDE), data={"k": "3", "rerank": "none"}).json()["images"][0]
        assert top["image_id"] == entry["image_id"] and top["similarity"] > 0.999
        row = c.get(f"/v1/images/{entry['image_id']}").json()
        assert row["split"] == "added" and Path(row["path"]).parent == run.absolute() / "uploads"
        thumb = c.get(f"/v1/images/{entry['image_id']}/thumbnail", params={"size": 64})
        assert thumb.headers["content-type"] == "image/jpeg" and max(Image.open(_bytes(thumb)).size) == 64
        gone = c.delete(f"/v1/images/{entry['image_id']}")
        assert gone.status_code == 200 and gone.json()["vectors"] == entry["instances"]
        ids = [r["image_id"] for r in c.post("/v1/search", files=upload(OUTSIDE), data={"k": "10"}).json()["images"]]
        assert entry["image_id"] not in ids and c.get("/v1/index").json()["count"] == before
        assert c.get(f"/v1/images/{entry['image_id']}").status_code == 404
    manifest = json.loads((run / "index" / "det" / "meta.json").read_text())["summary"]
    assert [e["op"] for e in manifest["edits"]] == ["add", "remove"]  # the same record `index --add/--remove` keeps


def _bytes(response):
    from io import BytesIO

    return BytesIO(response.content)


def test_an_add_by_another_process_is_served_without_a_restart(run):
    with client(run) as c:
        before = c.get("/v1/index").json()
        out = subprocess.run([sys.executable, "-m", "cbir.cli", "index", "--run", str(run), "--name", "det", "--add",
                              str(OUTSIDE)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        new_id = int(out.stdout.split()[1])
        after = c.get("/v1/index").json()
        assert after["version"] != before["version"] and after["count"] > before["count"]
        top = c.post("/v1/search", files=upload(OUTSIDE), data={"k": "2"}).json()["images"][0]
        assert top["image_id"] == new_id


def test_a_batch_keeps_the_index_version_it_started_with(run):
    """The switch is atomic: a querier taken before a commit still answers from the old version."""
    from cbir.retrieval.ingest import remove_images

    with client(run) as c:
        live = c.app.state.live
        old = live.current()
        remove_images(run, "det", [3])
        new = live.current()
        assert new is not old and 3 not in set(new.si.table.image_id) and 3 in set(old.si.table.image_id)
        assert old.si.store.count == len(old.si.table) and new.si.store.count == len(new.si.table)
        assert new.encoder is old.encoder and new.detector is old.detector  # same spec: models kept


def test_a_version_that_cannot_be_opened_keeps_the_old_one_served_and_readiness_says_why(run):
    from cbir.retrieval.ingest import remove_images

    with client(run) as c:
        count = c.get("/readyz").json()["count"]
        remove_images(run, "det", [3])
        rows = (run / "index" / "det").resolve() / "rows.parquet"
        rows.write_bytes(rows.read_bytes()[:100])  # the new version is damaged on disk
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "damaged" in ready.json()["problem"] and ready.json()["count"] == count
        answer = c.post("/v1/search", files=upload(PHOTOS[0]), data={"k": "3"})
        assert answer.status_code == 200 and answer.json()["images"][0]["image_id"] == 3  # still the old version


BAD = [  # (what, request, status, words in the one-line message)
    ("not an image", dict(files={"photo": ("notes.jpg", b"just some words", "image/jpeg")}), 422, "not a photo"),
    ("0 bytes", dict(files={"photo": ("empty.jpg", b"", "image/jpeg")}), 422, "empty"),
    ("wrong content type", dict(files={"photo": ("a.txt", b"hello", "text/plain")}), 415, "text/plain"),
    ("huge k", dict(files="PHOTO", data={"k": "100000"}), 422, "k: "),
    ("k 0", dict(files="PHOTO", data={"k": "0"}), 422, "k: "),
    ("k beyond the gallery", dict(files="PHOTO", data={"k": "999"}), 422, "exceeds the gallery"),
    ("bad filter", dict(files="PHOTO", data={"filter": "colour == 'red'"}), 422, "unknown field 'colour'"),
    ("unknown category", dict(files="PHOTO", data={"category": "giraffe"}), 422, "not a category"),
    ("no photo", dict(data={"k": "3"}), 422, "photo"),
    ("box past the last", dict(files="PHOTO", data={"box": "50"}), 422, "box 50"),
]


@pytest.mark.parametrize("what,request_,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_their_status_and_one_readable_message(run, what, request_, status, words):
    before = state_of(run)
    if request_.get("files") == "PHOTO":
        request_ = {**request_, "files": upload(PHOTOS[0])}
    with client(run) as c:
        r = c.post("/v1/search", **request_)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words in detail and "\n" not in detail and "Traceback" not in detail
    assert state_of(run) == before


def png_claiming(width: int, height: int) -> bytes:
    """A few bytes of PNG whose header claims width × height (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_other_refusals_change_nothing(run, tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (12, 40), "red").save(tiny)
    before = state_of(run)
    with client(run, max_upload_mb=0.02) as c:
        bomb = {"photo": ("bomb.png", png_claiming(30_000, 30_000), "image/png")}
        cases = [(c.post("/v1/search", files=upload(PHOTOS[0])), 413, "upload cap"),
                 (c.post("/v1/search", files=bomb), 413, "too large"),
                 (c.post("/v1/search", files=upload(tiny, kind="image/png")), 422, "too small"),
                 (c.post("/v1/images", files=[("photos", ("t.png", tiny.read_bytes(), "image/png"))]), 422, "too small"),
                 (c.get("/v1/images/424242"), 404, "not in index"),
                 (c.get("/v1/images/424242/thumbnail"), 404, "not in index"),
                 (c.get("/v1/images/424242/similar"), 404, "not in index"),
                 (c.delete("/v1/images/424242"), 404, "not in index"),
                 (c.get("/v1/images/-1"), 422, "image_id"),
                 (c.post("/v1/search/text", json={"text": "a red bird"}), 422, "text"),
                 (c.post("/v1/search/text", content=b"{not json", headers={"content-type": "application/json"}),
                  422, "JSON")]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        assert words in response.json()["detail"], response.json()
    assert state_of(run) == before


def test_an_edit_while_another_process_writes_the_run_is_409_and_writes_nothing(run):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from cbir.artifacts import writing\n"
                               "with writing(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = state_of(run)
        with client(run) as c:
            r = c.post("/v1/images", files=[("photos", (OUTSIDE.name, OUTSIDE.read_bytes(), "image/jpeg"))])
            assert r.status_code == 409 and "is busy" in r.json()["detail"] and r.headers["retry-after"]
            assert c.delete("/v1/images/1").status_code == 409
        assert state_of(run) == before and not (run / "uploads").exists()
    finally:
        holder.kill()
        holder.wait()


def test_cors_is_off_unless_origins_are_named(run):
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    with client(run) as c:
        assert "access-control-allow-origin" not in c.options("/v1/search", headers=preflight).headers
    with client(run, cors=("https://app.example",)) as c:
        allowed = c.options("/v1/search", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = c.options("/v1/search", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_keys_and_scopes(run, tmp_path, monkeypatch, caplog):
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# service keys\n{WRITE_KEY} write\n")
    monkeypatch.setenv("CBIR_API_KEYS", f"{READ_KEY} read")
    before = state_of(run)
    with client(run, keys=keys) as c:
        adding = {"files": [("photos", (OUTSIDE.name, OUTSIDE.read_bytes(), "image/jpeg"))]}
        bearer = lambda key: {"Authorization": f"Bearer {key}"}
        assert c.get("/v1/index").status_code == 401
        assert c.get("/v1/index", headers=bearer("wrong-key-0123456789abc")).status_code == 401
        assert c.get("/v1/index", headers=bearer(READ_KEY)).status_code == 200
        denied = c.post("/v1/images", headers=bearer(READ_KEY), **adding)
        assert denied.status_code == 403 and "may not write" in denied.json()["detail"]
        assert c.delete("/v1/images/1", headers=bearer(READ_KEY)).status_code == 403
        assert c.post("/v1/images", **adding).status_code == 401
        assert state_of(run) == before  # refused: nothing written
        assert c.get("/healthz").status_code == 200 and c.get("/v1/images/1", headers=bearer(WRITE_KEY)).status_code == 200
        assert c.post("/v1/images", headers=bearer(WRITE_KEY), **adding).status_code == 201
    with client(run, keys=keys, public_read=True) as c:
        assert c.get("/v1/index").status_code == 200 and c.delete("/v1/images/1").status_code == 401
    with pytest.raises(Exception, match="loopback"):
        build_service(ServeConfig(run=run, index="det", host="0.0.0.0", keys=keys, public_read=True, ui=False))
    monkeypatch.delenv("CBIR_API_KEYS")
    with caplog.at_level(logging.WARNING, logger="cbir.service.app"):
        with TestClient(build_service(ServeConfig(run=run, index="det", host="0.0.0.0", ui=False))):
            pass  # its lifespan stops its worker
    assert "reachable from other machines and asks for no key" in caplog.text
    keys.write_text("short write\n")
    with pytest.raises(Exception, match="at least 16"):
        build_service(ServeConfig(run=run, index="det", keys=keys, ui=False))


def test_a_full_queue_says_busy_and_a_slow_answer_times_out(run):
    release = threading.Event()

    def blocked(querier, key, items):
        release.wait(30)
        return items

    with client(run, max_queue=2, timeout_s=0.5) as c:
        batcher = c.app.state.batcher
        batcher.submit(blocked, "hold", 1)  # the worker is busy with this one
        slow = c.post("/v1/search", files=upload(PHOTOS[0]))  # queued behind it: waits, then 504
        assert slow.status_code == 504 and "within 0.5 s" in slow.json()["detail"]
        batcher.submit(blocked, "hold", 2)
        busy = c.post("/v1/search", files=upload(PHOTOS[0]))
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and "busy" in busy.json()["detail"]
        release.set()
        assert c.post("/v1/search", files=upload(PHOTOS[0])).status_code == 200
        metrics = c.get("/metrics").text
    assert 'cbir_errors_total{kind="busy"} 1.0' in metrics and 'cbir_errors_total{kind="timeout"} 1.0' in metrics


def test_concurrent_requests_share_one_model_pass(run):
    release = threading.Event()
    with client(run) as c:
        c.app.state.batcher.submit(lambda q, k, items: (release.wait(30), items)[1], "hold", 0)
        answers = []
        threads = [threading.Thread(target=lambda p=p: answers.append(c.post("/v1/search", files=upload(p),
                                                                             data={"k": "3"})))
                   for p in PHOTOS[:4]]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while c.app.state.batcher.depth < 5 and time.time() < deadline:
            time.sleep(0.05)
        release.set()
        for t in threads:
            t.join(60)
        assert sorted(r.status_code for r in answers) == [200] * 4
        metrics = c.get("/metrics").text
    assert "cbir_batch_size_count 2.0" in metrics and "cbir_batch_size_sum 5.0" in metrics  # the hold, then 4 at once
    assert "cbir_queue_depth 0.0" in metrics and 'cbir_request_seconds_bucket{endpoint="/v1/search"' in metrics


def test_batcher_refuses_past_its_queue_and_keeps_each_callers_error():
    class Live:
        def current(self):
            return "querier"

    release = threading.Event()
    batcher = Batcher(Live(), max_batch=4, max_queue=3)
    hold = batcher.submit(lambda q, k, items: (release.wait(10), items)[1], "hold", 0)
    time.sleep(0.1)
    answers = [batcher.submit(lambda q, k, items: [ValueError(i) if i % 2 else (q, i) for i in items], "x", i)
               for i in range(2)]
    with pytest.raises(Busy):
        batcher.submit(lambda q, k, items: items, "x", 9)
    release.set()
    assert hold.result(10) == 0 and answers[0].result(10) == ("querier", 0)
    with pytest.raises(ValueError):
        answers[1].result(10)
    batcher.close()


def test_health_readiness_and_metrics(run):
    with client(run) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready["ready"] and ready["count"] == c.get("/v1/index").json()["count"]
        c.post("/v1/search", files=upload(PHOTOS[1]))
        text = c.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    for name in ("cbir_requests_total", "cbir_request_seconds_bucket", "cbir_queue_depth", "cbir_batch_size_bucket",
                 "cbir_errors_total"):
        assert name in text.text, name
    spec = c.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and {"/v1/search", "/v1/search/text", "/v1/images", "/v1/images/{image_id}",
                                                 "/v1/images/{image_id}/thumbnail", "/healthz", "/readyz",
                                                 "/metrics"} <= set(spec["paths"])


def test_the_published_spec_is_the_apps(run, tmp_path):
    """docs/openapi.json (linked from the README) is what `cbir serve --openapi` writes for this code."""
    out = tmp_path / "openapi.json"
    code, _, err = cli("serve", "--run", str(run), "--index", "det", "--openapi", str(out))
    assert code == 0, err
    assert json.loads(out.read_text()) == json.loads((REPO / "docs" / "openapi.json").read_text()), \
        "docs/openapi.json is stale: `cbir serve --run RUN --index det --openapi docs/openapi.json`"


def test_fuzzed_against_its_own_openapi_spec(run):
    """schemathesis generates requests from /openapi.json (valid and not) for every operation: no 5xx, and
    every response matches the spec (status documented, body schema, content type). Every other image id is
    one of the gallery's, so the answers of real rows are checked too, not only 404s."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    app = build_service(ServeConfig(run=run, index="det", ui=False))
    gallery = sorted(set(app.state.live.current().si.table.image_id.astype(int)))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    failures, calls = [], 0
    def fuzzer(operation):
        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case):
            nonlocal calls
            calls += 1
            if case.path_parameters and "image_id" in case.path_parameters and calls % 2:
                case.path_parameters["image_id"] = gallery[calls % len(gallery)]  # random ids would all be 404
            try:
                case.call_and_validate(checks=checks)
            except Exception as e:  # every failing case is collected, not only the first
                failures.append(f"{operation.method.upper()} {operation.path}: {type(e).__name__}: {e}"[:600])
        return fuzz

    with TestClient(app):  # the app's lifespan: its batcher stops at the end
        for result in schema.get_all_operations():
            fuzzer(result.ok())()
    assert calls >= 40 and not failures, "\n".join(failures[:5])


@pytest.mark.slow  # kept out of CI's run (25-minute budget); `make test-all` runs it
def test_real_serve_process_with_keys_the_client_and_the_page(run, tmp_path):
    """`cbir serve` for real on a free loopback port: `search --server` prints what a local search prints,
    writes need the write key, the page answers at /ui through the same service, SIGTERM stops it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "CBIR_API_KEYS": f"{WRITE_KEY} write;{READ_KEY} read"}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "cbir.cli", "serve", "--run", str(run), "--index", "det",
                             "--port", str(port), "--public-read"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ready(url, proc, tmp_path / "serve.log")
        photo = str(PHOTOS[5])
        code, remote, err = cli("search", "--server", url, "--image", photo, "--k", "4", "--json")
        assert code == 0, err
        assert json.loads(remote) == cli_search(run, "--image", photo, "--k", "4")
        printed = [cli("search", *where, "--image", photo, "--k", "4")[1]
                   for where in (["--server", url], ["--run", str(run), "--index", "det"])]
        assert printed[0] == printed[1] and "box 1" in printed[0]
        code, _, err = cli("search", "--server", url, "--query-id", "999999")
        assert code == 2 and err.count("\n") == 1 and "404 image 999999" in err
        add = _curl(url + "/v1/images", OUTSIDE, "photos")
        assert add[0] == 401
        add = _curl(url + "/v1/images", OUTSIDE, "photos", WRITE_KEY)
        assert add[0] == 201 and json.loads(add[1])["added"][0]["new"]
        assert urllib.request.urlopen(url + "/ui/", timeout=30).status == 200
        from gradio_client import Client, handle_file

        *_, latency, _, _, merged = Client(url + "/ui/", verbose=False).predict(
            handle_file(str(OUTSIDE)), 0.5, 3, "none", "", 0.3, api_name="/search")
        top = dict(zip(merged["headers"], merged["data"][0]))
        assert "query latency" in latency
        assert top["image_id"] == json.loads(add[1])["added"][0]["image_id"]  # the page sees the service's add
    finally:
        proc.send_signal(signal.SIGTERM)  # uvicorn's graceful stop, then it re-raises the signal: exit -15
        assert proc.wait(30) in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()[-2000:]
    code, _, err = cli("search", "--server", url, "--text", "a bird")
    assert code == 2 and "cannot reach the service" in err and err.count("\n") == 1


def _wait_ready(url: str, proc, log: Path) -> None:
    deadline = time.time() + 180
    while True:
        try:
            if json.loads(urllib.request.urlopen(url + "/readyz", timeout=2).read())["ready"]:
                return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.5)


def _curl(url: str, photo: Path, field: str, key: str | None = None) -> tuple[int, str]:
    """A multipart upload as curl sends it (`curl -F photos=@FILE`)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    command = ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "-F", f"{field}=@{photo}"]
    command += ["-H", f"Authorization: Bearer {key}"] if key else []
    out = subprocess.run([*command, url], capture_output=True, text=True, timeout=120).stdout
    body, _, status = out.rpartition("\n")
    return int(status), body
