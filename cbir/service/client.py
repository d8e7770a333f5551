"""`cbir search --server URL`: the same search, answered by a running `cbir serve` (its index, its models).

The client sends what the flags say and prints what comes back exactly as a local search prints it; an
unreachable server or a refused request is one line naming the URL and the server's own message."""

from __future__ import annotations

import os
from pathlib import Path

import httpx

from .. import CbirError

KEY_VARIABLE = "CBIR_API_KEY"


class ServiceClient:
    def __init__(self, url: str, key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        key = key or os.environ.get(KEY_VARIABLE)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, trust_env=False)

    def _call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise CbirError(f"{self.url}: cannot reach the service ({type(e).__name__}: {e or 'no answer'})") from None
        if response.status_code >= 400:
            try:
                detail = response.json()["detail"]
            except (ValueError, KeyError, TypeError):
                detail = response.text[:200] or response.reason_phrase
            raise CbirError(f"{self.url}{path}: {response.status_code} {detail}")
        return response.json()

    def info(self) -> dict:
        return self._call("GET", "/v1/index")

    def search_photos(self, paths: list[Path], settings: dict) -> list[dict]:
        """One request per photo (the server batches concurrent ones); each document names the photo as given."""
        docs = []
        for path in paths:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise CbirError(f"{path}: {e.strerror}") from None
            form = {k: str(v) for k, v in settings.items() if v is not None}
            doc = self._call("POST", "/v1/search", files={"photo": (Path(path).name, data, "application/octet-stream")},
                             data=form)
            docs.append({**doc, "query": str(path)})
        return docs

    def similar(self, image_id: int, settings: dict) -> dict:
        params = {k: v for k, v in settings.items() if v is not None and k in ("k", "rerank", "filter", "category")}
        return self._call("GET", f"/v1/images/{image_id}/similar", params=params)

    def text(self, text: str, settings: dict) -> dict:
        body = {k: v for k, v in settings.items() if v is not None and k in ("k", "rerank", "filter", "category")}
        return self._call("POST", "/v1/search/text", json={"text": text, **body})
