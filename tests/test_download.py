"""download-cub against a local HTTP server on 127.0.0.1 (the real server is not reachable here)."""

import hashlib
import http.server
import io
import tarfile
import threading

import pytest

from cbir import CbirError
from cbir.datasets.download import download_cub, fetch


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one in-memory archive, honouring `Range: bytes=N-` like a real file server."""

    payload = b""
    requests: list = []

    def do_GET(self):  # noqa: N802
        self.requests.append(self.headers.get("Range"))
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") else 0
        body = self.payload[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in (("CUB_200_2011/images.txt", "1 a/b.jpg\n"), ("CUB_200_2011/README", "x" * 50_000)):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text.encode()))
    RangeHandler.payload, RangeHandler.requests = buf.getvalue(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/CUB_200_2011.tgz", hashlib.md5(RangeHandler.payload).hexdigest()
    httpd.shutdown()


def test_download_verifies_and_extracts(server, tmp_path):
    url, md5 = server
    root = download_cub(tmp_path, url, md5)
    assert root == tmp_path / "CUB_200_2011" and (root / "images.txt").read_text() == "1 a/b.jpg\n"
    assert download_cub(tmp_path, url, md5) == root  # idempotent: no second download
    assert len(RangeHandler.requests) == 1


def test_partial_download_resumes_with_range(server, tmp_path):
    url, md5 = server
    half = len(RangeHandler.payload) // 2
    (tmp_path / "CUB_200_2011.tgz.part").write_bytes(RangeHandler.payload[:half])
    download_cub(tmp_path, url, md5)
    assert RangeHandler.requests == [f"bytes={half}-"]
    assert hashlib.md5((tmp_path / "CUB_200_2011.tgz").read_bytes()).hexdigest() == md5


def test_wrong_md5_is_refused_and_moved_aside(server, tmp_path):
    url, _ = server
    with pytest.raises(CbirError, match="md5"):
        download_cub(tmp_path, url, "0" * 32)
    assert (tmp_path / "CUB_200_2011.tgz.bad").exists() and not (tmp_path / "CUB_200_2011").exists()


def test_offline_gives_a_clear_error(tmp_path):
    with pytest.raises(CbirError, match="cannot reach"):
        fetch("http://127.0.0.1:9/CUB_200_2011.tgz", tmp_path / "x.tgz", timeout=2)
