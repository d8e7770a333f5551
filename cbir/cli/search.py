"""Index and search commands: `index` (PCA + a vector store, --add / --remove) and `search`."""

from __future__ import annotations

from pathlib import Path

from .. import CbirError
from ..artifacts import to_json
from ..retrieval.rerank import Rerank
from .flags import (
    bounded,
    csv_list,
    filter_expression,
    force_arg,
    image_ids,
    index_args,
    moved_weights_args,
    name,
    path,
    query_detector_arg,
    rerank_arg,
    run_arg,
    server_url,
    splits,
    text,
)


def index_config(a, run: Path, embeddings: str, name: str | None = None):
    from ..retrieval.index import IndexConfig

    return IndexConfig(run=run, embeddings=embeddings, name=name, pca=a.pca, whiten=a.whiten, factory=a.factory,
                       gpu=a.gpu, gallery=csv_list(getattr(a, "gallery", "train,test")), store=a.store,
                       memory_budget=a.memory_budget, refine=a.refine, force=getattr(a, "force", False))


BUILD_ONLY = ("pca", "whiten", "factory", "store", "gallery", "memory_budget", "refine")  # what only building an index reads


def cmd_index(a):
    from ..retrieval.index import build_index
    from ..retrieval.ingest import add_photos, parse_ids, remove_images

    name = a.name or a.embeddings
    if not name:
        raise CbirError("--embeddings NAME (to build) or --name NAME (to --add / --remove) is required")
    if a.add and a.remove:
        raise CbirError("--add and --remove in one call: run them one after the other (each is one atomic edit of "
                        "the index)")
    unused = ["--embeddings"] * bool(a.name and a.embeddings) + [
        f"--{dest}" for dest, default in a.build_defaults.items() if getattr(a, dest) != default]
    unused = unused if a.add or a.remove else []
    if unused:
        raise CbirError(f"{unused[0]} shapes a new index; --add / --remove edit index {name} with the settings it "
                        f"was built with (rebuild it with --embeddings to change them)")
    if a.add:
        added, errors, ids = add_photos(a.run, name, [Path(p) for p in a.add], not a.no_detector, a.moved_weights,
                                        a.detector_weights)
        for path, image_id in ids.items():
            print(f"image_id {image_id}\t{path}")
        print(f"index {name}: added {added} instance(s) of {len(ids)} photo(s) (image ids above); "
              f"{len(errors)} unreadable photo(s) skipped" if ids else
              f"index {name}: nothing new to add: the readable photos given are in it already; {len(errors)} "
              f"unreadable photo(s) skipped")
    elif a.remove:
        print(f"index {name}: removed {remove_images(a.run, name, parse_ids(a.remove))} vector(s)")
    else:
        if not a.embeddings:
            raise CbirError("--embeddings NAME is required to build an index (e.g. --embeddings det)")
        m = build_index(index_config(a, a.run, a.embeddings, a.name)).manifest
        where = f"Milvus {m['milvus_index']} in {m['uri']} / {m['collection']}" if m["store"] == "milvus" else "FAISS"
        print(f"{a.run}/index/{m['name']}: {m['count']} vectors, {m['factory']} ({where}; PCA fitted on "
              f"{m['train_rows']} train rows; {len(m['edits'])} --add/--remove edit(s) kept)")


def add_index(sub):
    p = sub.add_parser("index", help="PCA (fitted on train) + FAISS index over an embeddings set; --add / --remove",
                       description="Build RUN/index/NAME: L2-normalise, PCA fitted on the train split only, "
                                   "L2-normalise (inner product = cosine), then a FAISS index_factory index. With "
                                   "--add: detect → embed → add new photos (resumable); with --remove: drop images by "
                                   "id. A rebuild replays earlier --add/--remove edits.")
    run_arg(p)
    p.add_argument("--embeddings", type=name, help="embeddings set to index (e.g. full, gt, det)")
    p.add_argument("--name", type=name, help="index name (default: the embeddings name)")
    index_args(p)
    p.add_argument("--gallery", type=splits, default="train,test",
                   help="splits to put in the index (default train,test)")
    p.add_argument("--add", type=path, nargs="+", metavar="PATH",
                   help="photos or folders of photos to add to an existing index")
    p.add_argument("--no-detector", action="store_true", help="with --add: embed whole photos, do not detect")
    p.add_argument("--remove", type=image_ids, metavar="IDS",
                   help="comma-separated image ids to remove from an existing index")
    p.add_argument("--weights", type=text, dest="moved_weights",
                   help="with --add: new place of the backbone weights file if "
                   "it moved (checked against the recorded fingerprint)")
    p.add_argument("--detector-weights", type=text,
                   help="with --add: new place of the detector weights file if it moved")
    force_arg(p, "the index (earlier --add/--remove edits are replayed)")
    p.set_defaults(func=cmd_index, build_defaults={dest: p.get_default(dest) for dest in BUILD_ONLY})


def cmd_search(a):
    from ..images import open_photo
    from ..retrieval.query import Querier

    if not (a.image or a.query_id is not None or a.text):
        raise CbirError("give --image PHOTO, --query-id ID or --text WORDS (or a photo or id with words)")
    if a.server:
        return search_server(a)
    if a.run is None or a.index is None:
        raise CbirError("--run RUN and --index NAME are required (or --server URL of a running `cbir serve`)")
    if a.no_detector and a.detector != "run":
        raise CbirError(f"--no-detector and --detector {a.detector}: give one of them")
    q = Querier(a.run, a.index, "none" if a.no_detector else a.detector, weights=a.weights,
                detector_weights=a.detector_weights)
    rerank = Rerank(method=a.rerank)
    mix = {"text": a.text, "text_weight": a.text_weight}
    if a.image:
        photos, names = [open_photo(Path(p)) for p in a.image], [Path(p).name for p in a.image]
        docs = q.photo_documents(photos, a.image, names, a.k, filter=a.filter, rerank=rerank, category=a.category,
                                 **mix)
    elif a.query_id is not None:
        docs = [q.id_document(a.query_id, a.k, a.filter, rerank, a.category, **mix)]
    else:
        docs = [q.text_document(a.text, a.k, a.filter, rerank, a.category)]
    print_documents(docs, q.detector_note, a)


def search_server(a) -> None:
    """`search --server URL`: the same flags, answered by a running service with its own index and models."""
    from ..service.client import ServiceClient

    local = [f for f, given in (("--run", a.run), ("--weights", a.weights), ("--detector-weights",
                                a.detector_weights), ("--no-detector", a.no_detector),
                                ("--detector", a.detector != "run")) if given]
    if local:
        raise CbirError(f"{local[0]} is the server's choice with --server (it serves its own run and models)")
    client = ServiceClient(a.server, a.key)
    info = client.info()
    if a.index and a.index != info["name"]:
        raise CbirError(f"--index {a.index}: {a.server} serves index {info['name']}")
    settings = {"k": a.k, "rerank": a.rerank, "filter": a.filter, "category": a.category}
    if a.image:
        docs = client.search_photos(a.image, {**settings, "text": a.text, "text_weight": a.text_weight})
    elif a.query_id is not None:
        if a.text:
            raise CbirError("--query-id with --text: the service answers an id alone (GET /v1/images/ID/similar)")
        docs = [client.similar(a.query_id, settings)]
    else:
        docs = [client.text(a.text, settings)]
    print_documents(docs, info["detector"], a)


def print_documents(docs: list[dict], detector_note: str, a) -> None:
    """What `search` prints: the JSON documents (--json), or per query its boxes' and images' tables."""
    if a.json:
        print(to_json(docs[0] if len(docs) == 1 else docs), end="")
        return
    for doc in docs:
        print(f"# {doc['query']} — {detector_note}" + (f"; filter: {a.filter}" if a.filter else ""))
        if doc["itself"] is not None:
            print(f"this photo is image {doc['itself']} of the run: it finds itself (rows marked itself)")
        if a.text:
            print(f"words {a.text!r} at weight {doc['text_weight']}: understood {', '.join(doc['understood']) or '-'}"
                  + (f"; not understood: {', '.join(doc['not_understood'])}" if doc["not_understood"] else ""))
        if not doc["boxes"]:
            print(f"\nno {a.category} found in this photo (score >= the run's threshold)")
        for i, b in enumerate(doc["boxes"], 1):
            print(f"\nbox {i} {b['category'] or ''} {b['box']} score {b['score']} ({b['source']})")
            print(_table(b["neighbours"]))
        print("\nimages (each ranked by its best instance):")
        print(_table(doc["images"]) + "\n")


def _table(records: list[dict]) -> str:
    import pandas as pd

    if not records:
        return "(no results)"
    table = pd.DataFrame(records)
    columns = ["similarity", "image_id", "instance", "category", "class_name", "box", "path"]
    if table.itself.any():
        table["itself"] = table.itself.map({True: "itself", False: ""})
        columns.append("itself")
    return table[columns].to_string(index=False)


def add_search(sub):
    p = sub.add_parser("search", help="nearest boxes and images for a new photo (--image) or a run image (--query-id)",
                       description="Detect the objects in a photo with the run's detector (whole photo when none is "
                                   "found or the boxes were imported), embed each box with the index's backbone and "
                                   "preprocessing, and list each box's nearest gallery instances and images. Reads "
                                   "only: needs no lock, works while another command writes the run.")
    p.add_argument("--run", type=path, help="run directory (not with --server)")
    p.add_argument("--index", type=name, help="index name under RUN/index/ (with --server: the served one)")
    p.add_argument("--server", type=server_url, metavar="URL",
                   help="ask a running `cbir serve` at URL instead (e.g. http://127.0.0.1:8000)")
    p.add_argument("--key", type=text, help="with --server: an API key (or $CBIR_API_KEY, which stays out of "
                   "the process list)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--image", type=path, nargs="+", metavar="PHOTO",
                       help="one or more photo files (answered together: "
                       "one detector, encoder and search pass)")
    group.add_argument("--query-id", type=bounded(int, 0),
                       help="an image id already in the run (excluded from its own results)")
    p.add_argument("--text", type=text, metavar="WORDS",
                   help="words: alone, the query; with --image or --query-id, each box's "
                   "vector moved towards them (needs the index of a `cbir train-text` set, e.g. gt@text-minilm)")
    p.add_argument("--text-weight", type=bounded(float, 0.0, 1.0), default=0.3,
                   help="with a photo: unit((1-w)·photo + w·words); 0 = the photo alone, 1 = the words alone "
                        "(default 0.3)")
    p.add_argument("--k", type=bounded(int, 1, 10000), default=10, help="neighbours per box (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--filter", type=filter_expression, metavar="EXPR",
                   help="search only rows matching a Milvus-style expression over id, "
                   "image_id, instance, class_id, category_id, split, source, score, path — e.g. \"split == 'test' "
                   "and class_id in [1, 2]\" (==, !=, <, <=, >, >=, in, not in, and, or, not; any store)")
    p.add_argument("--no-detector", action="store_true",
                   help="query with the whole photo, no detection (= --detector none)")
    query_detector_arg(p)
    p.add_argument("--category", type=text, metavar="NAME",
                   help="reverse search for one kind, e.g. person: query with the "
                   "photo's boxes of that category only, among the gallery's boxes of it")
    rerank_arg(p)
    moved_weights_args(p)
    p.set_defaults(func=cmd_search)
