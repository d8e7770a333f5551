"""The search service: typed FastAPI endpoints over the same `Querier` as `cbir search` and the page.

Why FastAPI on uvicorn: the OpenAPI 3 spec and the /docs page come from the endpoints' own type hints (so
they cannot drift from the code), request validation is declared rather than written, and Gradio — already
a dependency — is itself a FastAPI app, so the page mounts in the same process and shares the models.

Every answer of `POST /v1/search` is the document `cbir search --json` prints for the same photo and
settings; every error is `{"detail": "<one readable message>"}` with its status."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import CbirError, __version__
from ..artifacts import RunBusy, writing
from ..images import PhotoTooLarge, load_rgb
from ..retrieval.ingest import add_photos, remove_images
from ..retrieval.query import Querier
from ..retrieval.rerank import METHODS, SERVED_DEFAULT, Rerank
from ..ui.app import LOOPBACK, MAX_UPLOAD_MB, read_upload
from .batcher import Batcher, Busy
from .keys import load_keys, scopes_of
from .live import LiveQuerier
from .metrics import Metrics

log = logging.getLogger(__name__)

MAX_K = 1000
MAX_FILTER = 2000  # characters of a --filter expression
MAX_PHOTOS_PER_ADD = 64
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
IMAGE_TYPES = ("image/", "application/octet-stream")  # what an upload may say it is (clients often say octet)


DESCRIPTION = ("Object-level image search: a photo's boxes, each box's nearest gallery boxes and images, over one "
               "index of a cbir run (`GET /v1/index` names it). Every error is `{\"detail\": message}`.")


@dataclass(kw_only=True)
class ServeConfig:
    run: Path
    index: str
    host: str = "127.0.0.1"
    port: int = 8000
    detector: str = "run"
    device: str = "auto"
    weights: str | None = None
    detector_weights: str | None = None
    rerank: str = SERVED_DEFAULT
    keys: Path | None = None  # plus $CBIR_API_KEYS
    public_read: bool = False  # searching needs no key (allowed on loopback only)
    cors: tuple[str, ...] = ()  # allowed origins; none: no CORS headers at all
    max_upload_mb: float = MAX_UPLOAD_MB
    max_batch: int = 8
    max_queue: int = 32
    timeout_s: float = 30.0
    ui: bool = True
    ui_auth: str | None = None  # USER:PASS for the page (or $CBIR_UI_AUTH)


# ---------------------------------------------------------------- the schema (what /openapi.json says)

class Problem(BaseModel):
    detail: str = Field(description="one readable sentence saying what was wrong")


class Hit(BaseModel):
    image_id: int
    itself: bool = Field(description="this row belongs to the query photo itself (a gallery photo given as query)")
    instance: int
    class_id: int
    class_name: str
    category: str
    path: str = Field(description="the gallery photo's path as the run records it")
    box: list[float] = Field(description="x, y, w, h in the gallery photo's original pixels")
    source: str
    similarity: float


class FoundBox(BaseModel):
    box: list[float] = Field(description="x, y, w, h in the query photo's original pixels (empty for words)")
    score: float
    source: str = Field(description="detected, fallback-full (nothing found: the whole photo), gt or text")
    category: str
    neighbours: list[Hit] = Field(description="the box's nearest gallery boxes, best first")
    images: list[Hit] = Field(description="the box's nearest gallery images, each once by its best box")


class SearchResult(BaseModel):
    """What `cbir search --json` prints."""
    query: str
    itself: int | None = Field(description="the run's image id of the query photo when it is one of the run's")
    boxes: list[FoundBox]
    images: list[Hit] = Field(description="all boxes merged: each gallery image once, by its best match")
    text: str | None = None
    text_weight: float | None = None
    understood: list[str] | None = None
    not_understood: list[str] | None = None


class TextQuery(BaseModel):
    text: str = Field(min_length=1, max_length=1000)
    k: int = Field(10, ge=1, le=MAX_K)
    rerank: Method | None = Field(None, description="default: the service's --rerank")
    filter: str | None = Field(None, max_length=MAX_FILTER)
    category: str | None = Field(None, max_length=200)


class GalleryBox(BaseModel):
    instance: int
    box: list[float]
    category: str
    source: str
    score: float


class GalleryImage(BaseModel):
    image_id: int
    path: str
    class_id: int
    class_name: str
    split: str
    boxes: list[GalleryBox]


class Added(BaseModel):
    image_id: int
    filename: str
    instances: int
    new: bool = Field(description="false: the same photo (same bytes) was in the index already")


class AddResult(BaseModel):
    added: list[Added]
    instances: int


class Removed(BaseModel):
    image_id: int
    vectors: int


class IndexInfo(BaseModel):
    name: str
    count: int
    backbone: str
    mode: str
    detector: str
    has_text: bool
    categories: list[str]
    version: str | None


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    index: str
    count: int
    version: str | None
    problem: str | None = None


# the endpoints' parameter types (module level: the endpoints' annotations are resolved here)
Photos = Annotated[UploadFile, File(description="the photo (JPEG, PNG, WebP, GIF, BMP or TIFF)")]
K = Annotated[int, Form(ge=1, le=MAX_K, description="neighbours per box")]
Filter = Annotated[str | None, Form(max_length=MAX_FILTER, description="a Milvus-style expression, as --filter")]
ImageId = Annotated[int, PathParam(ge=0, le=2 ** 53, description="an image id of the index")]
Method = Literal[tuple(METHODS)]

ERRORS = {status: {"model": Problem, "description": why} for status, why in {
    401: "no API key, or an unknown one", 403: "the key lacks the scope", 404: "no such image in the index",
    409: "another process is writing the run", 413: "upload over the byte or pixel cap",
    415: "not an image content type", 422: "a value that is not valid", 503: "the queue is full (see Retry-After)",
    504: "not answered within the request timeout"}.items()}


def errors(*codes: int) -> dict:
    return {code: ERRORS[code] for code in (*codes, 422)}


# ---------------------------------------------------------------- answers (run in the batcher's thread)

@dataclass(frozen=True)
class PhotoSettings:
    k: int
    score: float | None
    rerank: str
    filter: str | None
    category: str | None
    text: str | None
    text_weight: float


def answer_photos(querier: Querier, s: PhotoSettings, items: list[tuple]) -> list[dict]:
    photos, names = [p for p, _ in items], [n for _, n in items]
    return querier.photo_documents(photos, names, names, s.k, s.score, s.filter, Rerank(method=s.rerank),
                                   s.category, s.text, s.text_weight)


def answer_each(querier: Querier, _key, calls: list) -> list:
    """Jobs that are not batched with others (words alone, an id, an edit): each item is a call of the querier,
    and each caller gets its own answer or its own error."""
    out = []
    for call in calls:
        try:
            out.append(call(querier))
        except Exception as e:
            out.append(e)
    return out


# ---------------------------------------------------------------- the app

def build_service(cfg: ServeConfig, querier: Querier | None = None) -> FastAPI:
    """The ASGI app (uvicorn serves it; tests call it in-process). `querier`: one already loaded."""
    keys = load_keys(cfg.keys)
    if cfg.public_read and cfg.host not in LOOPBACK:
        raise CbirError(f"--public-read: reading without a key is allowed on loopback only, not on --host {cfg.host}")
    if cfg.host not in LOOPBACK and not keys:
        log.warning("--host %s: the service is reachable from other machines and asks for no key; give --keys FILE "
                    "or $CBIR_API_KEYS", cfg.host)
    querier = querier or Querier(cfg.run, cfg.index, cfg.detector, cfg.device, weights=cfg.weights,
                                 detector_weights=cfg.detector_weights)
    warm_up(querier)
    live = LiveQuerier(querier)
    metrics = Metrics()
    batcher = Batcher(live, cfg.max_batch, cfg.max_queue, metrics.batch_size.observe)
    metrics.queue_depth.set_function(lambda: batcher.depth)
    cap = int(cfg.max_upload_mb * 1024 * 1024)
    temp = Path(tempfile.mkdtemp(prefix="cbir-serve-"))

    @asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        shutil.rmtree(temp, ignore_errors=True)

    app = FastAPI(title="cbir", version=__version__, lifespan=lifespan, description=DESCRIPTION)
    app.state.live, app.state.batcher, app.state.metrics = live, batcher, metrics
    if cfg.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization"])
    bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer KEY`")

    def require(scope: str):
        def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
            if not keys or (scope == "read" and cfg.public_read):
                return
            if credentials is None:
                raise HTTPException(401, "an API key is required: send `Authorization: Bearer KEY`",
                                    headers={"WWW-Authenticate": "Bearer"})
            scopes = scopes_of(keys, credentials.credentials)
            if scopes is None:
                raise HTTPException(401, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
            if scope not in scopes:
                raise HTTPException(403, f"this key may not {scope} (its scopes: {', '.join(sorted(scopes))})")
        return Depends(check)

    async def through_batcher(answer, key, item):
        try:
            future = batcher.submit(answer, key, item)
        except Busy:
            metrics.errors.labels("busy").inc()
            raise HTTPException(503, f"the service is busy ({batcher.depth} requests waiting); try again shortly",
                                headers={"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), cfg.timeout_s)
        except asyncio.TimeoutError:
            metrics.errors.labels("timeout").inc()
            raise HTTPException(504, f"not answered within {cfg.timeout_s:g} s; try again or ask for less") from None

    async def read_photo(upload: UploadFile, folder: Path):
        """An upload checked as the page checks one (bytes cap, decodable, pixel cap, 16 px a side) → (photo,
        its bytes, the name it came with)."""
        kind = (upload.content_type or "application/octet-stream").lower()
        if not kind.startswith(IMAGE_TYPES):
            raise HTTPException(415, f"{upload.filename or 'the upload'}: content type {kind} is not an image")
        data = await upload.read(cap + 1)
        name = safe_name(upload.filename)
        if len(data) > cap:
            raise HTTPException(413, f"{name}: over the upload cap of {cfg.max_upload_mb:g} MB")
        if not data:
            raise HTTPException(422, f"{name}: the file is empty (0 bytes)")
        file = folder / name
        file.write_bytes(data)
        try:
            photo = await run_in_threadpool(read_upload, file)
        except CbirError as e:  # the page's words: "too large" is the pixel cap
            raise HTTPException(413 if " is too large" in str(e) else 422, str(e)) from None
        return photo, data, name

    @app.exception_handler(CbirError)
    async def user_error(request: Request, e: CbirError):
        status = 409 if isinstance(e, RunBusy) else 413 if isinstance(e, PhotoTooLarge) else 422
        metrics.errors.labels("busy" if status == 409 else "bad_input").inc()
        return JSONResponse({"detail": str(e)}, status, headers={"Retry-After": "5"} if status == 409 else None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        metrics.errors.labels("bad_input").inc()
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"][1:]) or "the request"
        return JSONResponse({"detail": f"{where}: {first['msg']}"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        if e.status_code >= 400 and e.status_code not in (503, 504):
            metrics.errors.labels({401: "auth", 403: "auth", 404: "not_found"}.get(e.status_code, "bad_input")).inc()
        return JSONResponse({"detail": str(e.detail)}, e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def crash(request: Request, e: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        metrics.errors.labels("internal").inc()
        return JSONResponse({"detail": f"internal error ({type(e).__name__}); the server's log has the details"}, 500)

    @app.middleware("http")
    async def measure(request: Request, call_next):
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > cap * 1.05 + 1_000_000:  # refused before the body is read
            metrics.errors.labels("too_large").inc()
            return JSONResponse({"detail": f"request body over the upload cap of {cfg.max_upload_mb:g} MB"}, 413)
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "other")
        metrics.requests.labels(request.method, endpoint, str(response.status_code)).inc()
        metrics.latency.labels(request.method, endpoint).observe(time.perf_counter() - start)
        return response

    read, write = require("read"), require("write")

    @app.post("/v1/search", response_model=SearchResult, response_model_exclude_unset=True, tags=["search"],
              dependencies=[read], responses=errors(401, 403, 413, 415, 503, 504))
    async def search(photo: Photos, k: K = 10,
                     rerank: Annotated[Method | None, Form(
                         description="re-ranking of each box's shortlist (default: the service's --rerank)")] = None,
                     filter: Filter = None,
                     category: Annotated[str | None, Form(max_length=200, description="one kind's boxes only")] = None,
                     score: Annotated[float | None, Form(ge=0, le=1, description="detection score threshold "
                                                                               "(default: the run's)")] = None,
                     box: Annotated[int | None, Form(ge=1, le=100, description="answer for this box only "
                                                                             "(1 = the first)")] = None,
                     text: Annotated[str | None, Form(max_length=1000, description="words moving each box")] = None,
                     text_weight: Annotated[float, Form(ge=0, le=1)] = 0.3):
        """A photo → its boxes and, per box, the nearest gallery boxes and images, plus the merged ranking."""
        with tempfile.TemporaryDirectory(dir=temp) as folder:
            photo_, _, name = await read_photo(photo, Path(folder))
        settings = PhotoSettings(k, score, rerank or cfg.rerank, filter, category, (text or "").strip() or None,
                                 text_weight)
        doc = await through_batcher(answer_photos, settings, (photo_, name))
        return chosen_box(doc, box)

    @app.post("/v1/search/text", response_model=SearchResult, response_model_exclude_unset=True, tags=["search"],
              dependencies=[read], responses=errors(401, 403, 503, 504))
    async def search_text(query: TextQuery):
        """Words alone (an index with a text side: a `cbir train-text` set)."""
        call = partial(Querier.text_document, text=query.text, k=query.k, filter=query.filter,
                       rerank=Rerank(method=query.rerank or cfg.rerank), category=query.category)
        return await through_batcher(answer_each, "each", call)

    def gallery_rows(q: Querier, image_id: int):
        rows = q.si.table[q.si.table.image_id == image_id]
        if rows.empty:
            raise HTTPException(404, f"image {image_id} is not in index {q.si.name}")
        return rows

    @app.get("/v1/images/{image_id}", response_model=GalleryImage, tags=["gallery"], dependencies=[read],
             responses=errors(401, 403, 404))
    def image(image_id: ImageId):  # plain def: FastAPI runs it in a thread (an index switch reads files)
        """The gallery row of one image: its path, label, split and indexed boxes."""
        q = live.current()  # one index version for the whole answer
        rows = gallery_rows(q, image_id)
        categories = q.categories
        first = rows.iloc[0]
        return GalleryImage(image_id=image_id, path=str(first.path), class_id=int(first.class_id),
                            class_name=str(first.class_name) if isinstance(first.class_name, str) else "",
                            split=str(first.split),
                            boxes=[GalleryBox(instance=int(r.instance), box=[float(r.x), float(r.y), float(r.w),
                                                                           float(r.h)],
                                              category=categories.get(int(r.category_id), ""), source=str(r.source),
                                              score=float(r.score)) for r in rows.itertuples()])

    @app.get("/v1/images/{image_id}/thumbnail", tags=["gallery"], dependencies=[read], response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG"}, **errors(401, 403, 404)})
    def thumbnail(image_id: ImageId, size: Annotated[int, Query(ge=16, le=1024)] = 256):
        """A JPEG of the gallery photo, at most `size` px a side: only an id reaches a file, never a path."""
        q = live.current()
        file = q.si.image_path(str(gallery_rows(q, image_id).iloc[0].path))
        try:
            data = jpeg_thumbnail(file, size)
        except CbirError:
            raise HTTPException(404, f"image {image_id}: its photo file is gone from the gallery") from None
        return Response(data, media_type="image/jpeg")

    @app.get("/v1/images/{image_id}/similar", response_model=SearchResult, response_model_exclude_unset=True,
             tags=["search"], dependencies=[read], responses=errors(401, 403, 404, 503, 504))
    async def similar(image_id: ImageId, k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
                      rerank: Method | None = None,
                      filter: Annotated[str | None, Query(max_length=MAX_FILTER)] = None,
                      category: Annotated[str | None, Query(max_length=200)] = None):
        """Neighbours of an image of the run (`search --query-id`), itself left out."""
        gallery_rows(await run_in_threadpool(live.current), image_id)
        call = partial(Querier.id_document, image_id=image_id, k=k, filter=filter,
                       rerank=Rerank(method=rerank or cfg.rerank),
                       category=category)
        return await through_batcher(answer_each, "each", call)

    @app.post("/v1/images", response_model=AddResult, status_code=201, tags=["gallery"], dependencies=[write],
              responses=errors(401, 403, 409, 413, 415, 503, 504))
    async def add(photos: Annotated[list[UploadFile], File(description="photos to add")]):
        """Add photos to the index (`index --add`: the same code, the run's lock, replayed on rebuilds). Each is
        kept under RUN/uploads/ by its content; the same bytes twice are one image."""
        if len(photos) > MAX_PHOTOS_PER_ADD:
            raise HTTPException(413, f"{len(photos)} photos in one request; send at most {MAX_PHOTOS_PER_ADD}")
        uploads = querier.layout.uploads  # the run folder never changes
        kept = []
        with tempfile.TemporaryDirectory(dir=temp) as folder:
            for upload in photos:  # every photo is checked before anything is written to the run
                _, data, name = await read_photo(upload, Path(folder))
                suffix = SUFFIX.get(photo_format(data), ".jpg")
                kept.append((name, uploads / f"{hashlib.sha256(data).hexdigest()[:32]}{suffix}", data))
        new = await through_batcher(answer_each, "each", partial(add_uploads, kept=kept))
        table = (await run_in_threadpool(live.current)).si.table  # the version just committed (served from now)
        return added_result(table, kept, new)

    @app.delete("/v1/images/{image_id}", response_model=Removed, tags=["gallery"], dependencies=[write],
                responses=errors(401, 403, 404, 409, 503, 504))
    async def remove(image_id: ImageId):
        """Remove an image's boxes from the index (`index --remove`, replayed on rebuilds)."""
        gallery_rows(await run_in_threadpool(live.current), image_id)
        return await through_batcher(answer_each, "each", partial(remove_image, image_id=image_id))

    @app.get("/v1/index", response_model=IndexInfo, tags=["service"], dependencies=[read],
             responses=errors(401, 403))
    def index_info():
        q = live.current()
        m = q.si.manifest
        return IndexInfo(name=m["name"], count=m["count"], backbone=q.spec["backbone"], mode=m["mode"],
                         detector=q.detector_note, has_text=q.has_text, categories=sorted(q.categories.values()),
                         version=live.version)

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz():
        """The process answers."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Ready, tags=["service"], responses={503: {"model": Ready}})
    def readyz():
        """Models loaded and the index open (503 while the newest committed version could not be opened)."""
        q = live.current()
        body = Ready(ready=live.problem is None, index=q.si.name, count=q.si.manifest["count"], version=live.version,
                     problem=live.problem)
        return JSONResponse(body.model_dump(), 200 if body.ready else 503)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"],
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def prometheus():
        """Requests, latency histograms, queue depth, batch sizes and errors by kind (Prometheus text format)."""
        body, kind = metrics.exposition()
        return Response(body, media_type=kind)

    if cfg.ui:
        mount_page(app, querier, batcher, temp, cfg)
    return app


def warm_up(querier: Querier) -> None:
    """One query of a blank photo before the first client's: the models' first pass (ONNX session, torch
    kernels, the text encoder) is slow, and would otherwise land on someone's request."""
    from ..images import Photo

    blank = Image.new("RGB", (64, 64), "white")
    querier.query([Photo(blank, 64, 64)], 1, rerank=Rerank())
    if querier.has_text:
        querier.text.vectors(["warm up"])


def chosen_box(doc: dict, box: int | None) -> dict:
    """The document narrowed to one box (the page's box choice): its neighbours and images only."""
    if box is None:
        return doc
    if box > len(doc["boxes"]):
        raise HTTPException(422, f"box {box}: the photo has {len(doc['boxes'])} box(es)")
    one = doc["boxes"][box - 1]
    return {**doc, "boxes": [one], "images": one["images"]}


def add_uploads(querier: Querier, kept: list[tuple[str, Path, bytes]]) -> dict[str, int]:
    """Write the checked uploads under RUN/uploads/ and add them with `add_photos` (under the run's lock);
    the image id of each photo that was not in the index yet, by its file."""
    with writing(querier.layout):  # the lock first: a busy run (409) gets no upload files either
        for _, target, data in kept:
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                staged = target.with_name(f".{target.name}.part")
                staged.write_bytes(data)
                staged.replace(target)
        return add_photos(querier.layout, querier.si.name, [t for _, t, _ in kept], querier=querier)[2]


def added_result(table, kept: list[tuple[str, Path, bytes]], ids: dict[str, int]) -> AddResult:
    """What `POST /v1/images` answers: per upload, its image id and boxes in the index, and whether it is new."""
    out, total = [], 0
    for name, target, _ in kept:
        rows = table[table.path == str(target.absolute())]
        if rows.empty:  # nothing found in it and no whole-photo fallback: add_photos said why
            raise CbirError(f"{name}: nothing was added for this photo")
        total += len(rows) if str(target.absolute()) in ids else 0
        out.append(Added(image_id=int(rows.image_id.iloc[0]), filename=name, instances=len(rows),
                         new=str(target.absolute()) in ids))
    return AddResult(added=out, instances=total)


def remove_image(querier: Querier, image_id: int) -> Removed:
    return Removed(image_id=image_id, vectors=remove_images(querier.layout, querier.si.name, [image_id]))


def safe_name(filename: str | None) -> str:
    """The upload's own file name without folders or odd characters (names the query, as --image does)."""
    name = re.sub(r"[^\w .+-]", "_", Path(filename or "").name)[:120].strip(" .")
    return name or "upload"


def photo_format(data: bytes) -> str | None:
    try:
        with Image.open(BytesIO(data)) as im:
            return im.format
    except Exception:  # decodable was checked already; the suffix only needs a guess
        return None


def jpeg_thumbnail(file: Path, size: int) -> bytes:
    image = load_rgb(file)
    image.thumbnail((size, size))
    out = BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


def mount_page(app: FastAPI, querier: Querier, batcher: Batcher, temp: Path, cfg: ServeConfig) -> None:
    """The Gradio page at /ui, its searches going through the service's batcher (one queue for both)."""
    import gradio as gr

    from ..ui.app import CardFiles, build_app, example_photos, parse_auth, run_queries

    def page_batch(live_querier, _key, items):  # each item: one batch of the page's requests
        return [run_queries(live_querier, requests) for requests in items]

    def answer(requests):
        try:
            return batcher.submit(page_batch, "page", requests).result(cfg.timeout_s)
        except Busy:
            raise CbirError("the service is busy; try again in a moment") from None

    examples, cards = temp / "examples", temp / "cards"
    examples.mkdir()
    cards.mkdir()
    blocks = build_app(querier, example_photos(querier, examples), CardFiles(cards), rerank=cfg.rerank,
                       answer=answer)
    blocked = [str(p) for p in (querier.si.image_dir, querier.layout.root) if p]
    gr.mount_gradio_app(app, blocks, path="/ui", auth=parse_auth(cfg.ui_auth), allowed_paths=[str(examples)],
                        blocked_paths=blocked, max_file_size=f"{int(cfg.max_upload_mb)}mb")


def serve(cfg: ServeConfig) -> None:
    """`cbir serve`: the app on uvicorn, until Ctrl-C."""
    import uvicorn

    app = build_service(cfg)
    log.info("serving index %s of %s on http://%s:%d (API docs at /docs%s)", cfg.index, cfg.run, cfg.host, cfg.port,
             ", the page at /ui" if cfg.ui else "")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", timeout_graceful_shutdown=10)

