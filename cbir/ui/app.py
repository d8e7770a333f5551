"""Gradio page over `search.Querier`: upload a photo, see every object boxed with its category, pick a box,
and see its neighbours; on an index with a text side, type words (alone, or moving the photo's boxes).

The page does no retrieval of its own: it calls the same Querier as `cbir search --image`, so what
the page shows is what the CLI prints.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from .. import CbirError
from ..artifacts import atomic_path
from ..datasets import short_name
from ..images import Photo, PhotoTooLarge, load_rgb, open_photo
from ..retrieval.query import Querier, results_json
from ..retrieval.rerank import METHODS, SERVED_DEFAULT, SHORTLIST, Rerank

log = logging.getLogger(__name__)

DETECTED, FALLBACK = (0, 200, 60), (255, 140, 0)
MAX_UPLOAD_PIXELS = 200_000_000  # larger uploads are refused
MAX_UPLOAD_MB = 50  # Gradio refuses bigger files before they reach the model
MIN_SIDE = 16  # smaller photos hold nothing to detect or embed
PAGE_DECODE_PIXELS = 12_000_000  # uploads are decoded reduced to this for speed; boxes stay in original pixels
NOTHING_FOUND = "nothing found - whole image"  # a detector found nothing: the whole photo stood in
BOX_KIND = {"fallback-full": "whole image", "gt": "GT box"}
MAX_BATCH = 8  # concurrent requests answered by one detector / encoder / store pass
CARD_CACHE = 2048  # neighbour thumbnail files kept (~20 kB each)
LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_VARIABLE = "CBIR_UI_AUTH"
MAX_QUEUE = 32  # requests waiting beyond this get "queue is full" (try again) instead of an unbounded wait


def photo_input(**kwargs) -> gr.Image:
    """gr.Image that hands the uploaded file to `open_photo` as it is: Gradio's own preprocessing decodes it
    first and answers a non-image with PIL's internal error text; ours gives a message a person can read.
    (Set on the instance: a gr.Image subclass makes Gradio write a .pyi stub beside this module.)"""
    image = gr.Image(type="filepath", **kwargs)
    image.preprocess = lambda payload: None if payload is None or payload.path is None else str(payload.path)
    return image


def read_upload(path: Path) -> Photo:
    """An uploaded photo, or a message saying plainly why it cannot be searched."""
    try:
        photo = open_photo(path, max_pixels=MAX_UPLOAD_PIXELS, decode_pixels=PAGE_DECODE_PIXELS)
    except PhotoTooLarge:
        raise CbirError(f"{path.name} is too large: the page takes photos up to {MAX_UPLOAD_PIXELS / 1e6:.0f} Mpx") \
            from None
    except CbirError:
        raise CbirError(f"{path.name} is not a photo this page can read (JPEG, PNG, WebP, GIF, BMP or TIFF)") from None
    if min(photo.width, photo.height) < MIN_SIDE:
        raise CbirError(f"{path.name} is {photo.width}×{photo.height} px: too small to search (at least {MIN_SIDE} px "
                        f"a side)")
    return photo


def draw_boxes(image: Image.Image, boxes: list[dict], labels: list[str], whole: str = NOTHING_FOUND) -> Image.Image:
    """Numbered boxes; a fallback (whole-image) box is orange and says why (`whole`)."""
    out = image.copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 150))
    font = ImageFont.load_default(size=max(12, round(min(out.size) / 28)))
    for box, label in zip(boxes, labels):
        x, y, w, h = box["bbox"] if "bbox" in box else box["box"]
        fallback = box["source"].startswith("fallback")
        colour = FALLBACK if fallback else DETECTED
        inset = width if fallback else 0
        draw.rectangle([x + inset, y + inset, x + w - 1 - inset, y + h - 1 - inset], outline=colour, width=width)
        text = f"{label.split()[0]} {whole}" if fallback else label
        tx, ty = x + inset + 2, y + inset + 2
        if fallback:  # bottom-left: the page's caption covers the photo's top-left corner
            ty = y + h - inset - 4 - (draw.textbbox((0, 0), text, font=font)[3])
        draw.rectangle(draw.textbbox((tx, ty), text, font=font), fill=colour)
        draw.text((tx, ty), text, fill=(0, 0, 0), font=font)
    return out


class CardFiles:
    """Neighbour thumbnails (a gallery image, its matching box drawn), written once as JPEG files in `folder`
    and handed to the gallery as paths: the folder is one of Gradio's static paths, so a card that recurs
    across queries is neither decoded, drawn, re-encoded, hashed nor copied again — on 2 cores that was a
    sixth of the page's CPU per query. At most `limit` files are kept, least recently shown dropped first."""

    def __init__(self, folder: Path, limit: int = CARD_CACHE):
        self.folder, self.limit = folder, limit
        self.files: OrderedDict[tuple, str] = OrderedDict()
        self.lock = threading.Lock()  # the search and the box choice may ask at once
        gr.set_static_paths([folder])

    def __call__(self, path: Path, box: tuple[float, ...], source: str, image_id: int) -> str:
        key = (str(path), box, source, image_id)
        with self.lock:
            if key in self.files:
                self.files.move_to_end(key)
                return self.files[key]
        image = draw_boxes(load_rgb(path), [{"box": list(box), "source": source}], [f"#{image_id}"])
        image.thumbnail((320, 320))
        file = self.folder / f"{hashlib.sha1(repr(key).encode()).hexdigest()}.jpg"
        with atomic_path(file) as staged:  # whole: a card being served is never seen half-written
            image.save(staged, "JPEG", quality=90)
        with self.lock:
            self.files[key] = str(file)
            while len(self.files) > self.limit:
                Path(self.files.popitem(last=False)[1]).unlink(missing_ok=True)
        return str(file)


def neighbour_cards(querier: Querier, cards: CardFiles, rows: list[dict]) -> list[tuple[str, str]]:
    out = []
    for r in rows:
        file = cards(querier.si.image_path(r["path"]), tuple(r["box"]), r["source"], r["image_id"])
        name = short_name(r["class_name"]) or "added photo"
        if querier.multi_category and r["category"]:
            name = r["category"]  # the box's kind says more than its photo's label
        if querier.photo_folder and not Path(r["path"]).is_absolute():  # a user's folder: where the photo lives
            name = f"{r['path']} ({name})" if r["class_name"] else r["path"]
        out.append((file, f"{'itself: ' if r['itself'] else ''}{name} · sim {r['similarity']:.3f}"))
    return out


def run_queries(querier: Querier, requests: list[tuple]) -> list[tuple[dict, Image.Image | None]]:
    """The page's one action for a batch of concurrent requests (path, score, k, re-ranking, words, weight):
    per request a JSON-able results document (or {"error": message}) and the decoded photo to draw the boxes
    on. Requests with the same settings go through the detector, the encoder and the store together; words
    without a photo are a text query of their own."""
    out: list = [None] * len(requests)
    groups: dict[tuple, list[int]] = {}
    photos = {}
    for i, (path, score, k, method, text, weight) in enumerate(requests):
        text = (text or "").strip() or None
        try:
            if not path and text:
                out[i] = (_text_doc(querier, text, int(k), method), None)
                continue
            if not path:
                raise CbirError("upload a photo first" + (" or type some words" if querier.has_text else ""))
            photos[i] = read_upload(Path(path))
            groups.setdefault((float(score), int(k), method or "none", text, float(weight)), []).append(i)
        except CbirError as e:
            out[i] = ({"error": str(e)}, None)
    for (score, k, method, text, weight), members in groups.items():
        start = time.perf_counter()
        answers = querier.query([photos[i] for i in members], k, score=score,
                                names=[Path(requests[i][0]).name for i in members], rerank=Rerank(method=method),
                                text=text, text_weight=weight)
        latency = round((time.perf_counter() - start) * 1000, 1)
        for i, (boxes, merged) in zip(members, answers):
            name = Path(requests[i][0]).name
            doc = results_json(name, boxes, merged, querier.categories, querier.own_image(photos[i], name))
            doc.update(latency_ms=latency, batch=len(members), size=[photos[i].width, photos[i].height],
                       **(querier.words(text, weight) if text else {}))
            out[i] = (doc, photos[i].image)
    return out


def _text_doc(querier: Querier, text: str, k: int, method: str) -> dict:
    start = time.perf_counter()
    boxes, merged = querier.query_text(text, k, rerank=Rerank(method=method or "none"))
    doc = results_json(f"words {text!r}", boxes, merged, querier.categories)
    doc.update(latency_ms=round((time.perf_counter() - start) * 1000, 1), batch=1, size=None,
               **querier.words(text, 1.0))
    return doc


def words_line(doc: dict) -> str:
    """What the page says about the words of a query: which the text encoder understood, which not."""
    if "text" not in doc:
        return ""
    line = f"words at weight {doc['text_weight']:.2f} · understood: {', '.join(doc['understood']) or 'nothing'}"
    return line + (f" · **not understood: {', '.join(doc['not_understood'])}**" if doc["not_understood"] else "")


def build_app(querier: Querier, examples: list[str], cards: CardFiles, default_k: int = 10,
              rerank: str = SERVED_DEFAULT, answer=None) -> gr.Blocks:
    """The page. `answer` (a batch of requests → `run_queries`' answers) is how its searches reach the models:
    by default `run_queries` on `querier`; the service passes its batcher, so the page and the API share one
    queue, one model pass at a time and the index version of the moment."""
    answer = answer or partial(run_queries, querier)
    default_score = float(querier.detect_meta.get("score_threshold", 0.3))
    whole = NOTHING_FOUND if querier.detector is not None else "whole photo, no detector in this run"
    with gr.Blocks(title="cbir — find similar objects", analytics_enabled=False) as app:
        gr.Markdown(f"# cbir — find similar objects\nIndex **{querier.si.manifest['name']}** "
                    f"({querier.si.manifest['count']} instances, {querier.spec['backbone']}); {querier.detector_note}."
                    f"\n\nPhotos up to {MAX_UPLOAD_MB} MB and {MAX_UPLOAD_PIXELS / 1e6:.0f} Mpx, at least {MIN_SIDE} px "
                    f"a side: JPEG, PNG, WebP, GIF, BMP or TIFF.")
        state = gr.State({})
        with gr.Row():
            with gr.Column(scale=1):
                # the upload's own file reaches open_photo (modes, EXIF, huge photos handled there), not a copy
                # Gradio re-encoded
                photo = photo_input(label="Photo", sources=["upload", "clipboard"], height=320, image_mode=None)
                # without a detector in the loop there is no score to threshold: no slider
                score = gr.Slider(0.05, 0.95, value=default_score, step=0.05, label="detection score threshold",
                                  visible=querier.detector is not None)
                k = gr.Slider(1, 30, value=default_k, step=1, label="neighbours (k)")
                method = gr.Radio(list(METHODS), value=rerank, label=f"re-ranking of each box's top {SHORTLIST}")
                words = gr.Textbox(label="Words (alone, or moving the photo's boxes towards them)",
                                   placeholder="a bird with a red crown", visible=querier.has_text)
                weight = gr.Slider(0.0, 1.0, value=0.3, step=0.05, label="weight of the words beside a photo",
                                   visible=querier.has_text)
                button = gr.Button("Search", variant="primary")
                if examples:
                    gr.Examples(examples=[[e] for e in examples], inputs=[photo], label="Test-split examples")
            with gr.Column(scale=2):
                # JPEG: Gradio re-encodes every picture it returns, and JPEG costs ~4 ms where WebP took ~70 ms
                # and PNG ~300 ms for a boxed photo and its ten neighbours on 2 cores
                boxed = gr.Image(label=f"Boxes found (orange = {whole})", interactive=False,
                                 height=360, format="jpeg")
                latency = gr.Markdown()
                choice = gr.Radio(label="Box", choices=[], type="index")
                gallery = gr.Gallery(label="Nearest gallery images for the selected box", columns=5, height=420,
                                     format="jpeg")
                merged = gr.Dataframe(label="All boxes merged: each gallery image once, by its best match",
                                      interactive=False)

        def show(doc, image):
            """One request's outputs: state, boxed photo, status line, box choice, neighbour cards, merged table."""
            if "error" in doc:
                return {}, None, f"**{doc['error']}**", gr.Radio(choices=[], value=None), [], pd.DataFrame()
            if not doc["boxes"]:
                return doc, image, "**no box of that kind in this photo**", gr.Radio(choices=[], value=None), [], \
                    pd.DataFrame()
            table = pd.DataFrame([{"rank": i, "image_id": r["image_id"], "class": r["class_name"],
                                   "similarity": r["similarity"]} for i, r in enumerate(doc["images"], 1)])
            if doc["size"] is None:  # words alone
                return (doc, None, f"{words_line(doc)} · query latency **{doc['latency_ms']:.0f} ms**",
                        gr.Radio(choices=["words"], value="words"),
                        neighbour_cards(querier, cards, doc["boxes"][0]["neighbours"]), table)
            kind = [f"{b['category']} " if querier.multi_category and b["category"] else "" for b in doc["boxes"]]
            labels = [f"{i} {c}({b['score']:.2f})" if b["source"] == "detected" else
                      f"{i} {BOX_KIND.get(b['source'], '')}" for i, (c, b) in enumerate(zip(kind, doc["boxes"]), 1)]
            names = [f"box {i} · {c}" + BOX_KIND.get(b["source"], f"score {b['score']:.2f}")
                     for i, (c, b) in enumerate(zip(kind, doc["boxes"]), 1)]
            scale = image.width / doc["size"][0]  # boxes are in original pixels, the picture may be reduced
            drawn = [{**b, "box": [v * scale for v in b["box"]]} for b in doc["boxes"]]
            shared = f", answered with {doc['batch'] - 1} other request(s)" if doc["batch"] > 1 else ""
            itself = (f"<br>this photo is image {doc['itself']} of the gallery: it finds itself (marked itself)"
                      if doc["itself"] is not None else "")
            return (doc, draw_boxes(image, drawn, labels, whole),
                    f"{len(doc['boxes'])} box(es) · query latency **{doc['latency_ms']:.0f} ms** "
                    f"(detect + embed + search, {doc['size'][0]}×{doc['size'][1]} px{shared})" +
                    (f"<br>{words_line(doc)}" if "text" in doc else "") + itself,
                    gr.Radio(choices=names, value=names[0]),
                    neighbour_cards(querier, cards, doc["boxes"][0]["neighbours"]), table)

        def search(paths, scores, ks, methods, texts, weights):
            """Batched: Gradio hands over up to MAX_BATCH queued requests at once; one list per output."""
            start = time.perf_counter()
            try:
                answers = answer(list(zip(paths, scores, ks, methods, texts, weights)))
            except CbirError as e:
                answers = [({"error": str(e)}, None)] * len(paths)
            except Exception as e:
                log.exception("query failed")
                answers = [({"error": f"could not process this photo ({type(e).__name__}: {e})"}, None)] * len(paths)
            shown = tuple(map(list, zip(*[show(doc, image) for doc, image in answers])))
            log.debug("answered a batch of %d request(s) in %.0f ms", len(paths), (time.perf_counter() - start) * 1000)
            return shown

        def select(doc, index):
            if not doc or index is None:
                return []
            return neighbour_cards(querier, cards, doc["boxes"][index]["neighbours"])

        button.click(search, [photo, score, k, method, words, weight], [state, boxed, latency, choice, gallery, merged],
                     api_name="search", batch=True, max_batch_size=MAX_BATCH, concurrency_limit=1)
        choice.change(select, [state, choice], [gallery], api_name=False)
    # one model, one request batch at a time; past MAX_QUEUE waiting requests a new one is told the page is
    # busy at once instead of joining an ever-longer wait
    return app.queue(max_size=MAX_QUEUE, default_concurrency_limit=1)


def example_photos(querier: Querier, folder: Path, n: int = 4) -> list[str]:
    """A few test-split photos of different classes, for one-click tries, copied into `folder`: the page
    serves that folder and its own outputs, never the dataset."""
    table = querier.si.table
    test = table[table.split == "test"].drop_duplicates("class_id").head(n)
    copies = []
    for path in test.path:
        copies.append(folder / Path(path).name)
        shutil.copyfile(querier.si.image_path(path), copies[-1])
    return [str(p) for p in copies]


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """--auth USER:PASS (or $CBIR_UI_AUTH) → Gradio's login pair."""
    text = text or os.environ.get(AUTH_VARIABLE)
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise CbirError(f"--auth / ${AUTH_VARIABLE}: give USER:PASS, both non-empty")
    return user, password


def serve(run: Path, index: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          detector: str = "run", device: str = "auto", weights: str | None = None,
          detector_weights: str | None = None, rerank: str = SERVED_DEFAULT, auth: str | None = None) -> None:
    login = parse_auth(auth)
    if host not in LOOPBACK:
        log.warning("--host %s: the page is reachable from other machines%s", host,
                    "" if login else f"; anyone who can reach it can use it — set --auth USER:PASS or ${AUTH_VARIABLE}")
    querier = Querier(run, index, detector, device, weights=weights, detector_weights=detector_weights)
    if querier.has_text:
        querier.text.vectors(["warm up"])  # load the text encoder now, not on the first visitor's words
    with tempfile.TemporaryDirectory(prefix="cbir-ui-") as examples, \
            tempfile.TemporaryDirectory(prefix="cbir-ui-cards-") as cards:
        app = build_app(querier, example_photos(querier, Path(examples)), CardFiles(Path(cards)), rerank=rerank)
        blocked = [str(p) for p in (querier.si.image_dir, querier.layout.root) if p]
        app.launch(server_name=host, server_port=port, share=share, auth=login, allowed_paths=[examples],
                   blocked_paths=blocked, max_file_size=f"{MAX_UPLOAD_MB}mb", show_error=True)
