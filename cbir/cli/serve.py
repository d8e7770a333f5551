"""The service: `cbir serve` answers other programs over HTTP, with the page beside it at /ui."""

from __future__ import annotations

from .. import __version__
from .flags import auth, bounded, csv_list, path, serving_args, text


def cmd_serve(a):
    from ..service.app import ServeConfig, build_service, serve

    cfg = ServeConfig(run=a.run, index=a.index, host=a.host, port=a.port, detector=a.detector, device=a.device,
                      weights=a.weights, detector_weights=a.detector_weights, rerank=a.rerank, keys=a.keys,
                      public_read=a.public_read, cors=csv_list(a.cors or ""), max_upload_mb=a.max_upload_mb,
                      max_batch=a.max_batch, max_queue=a.max_queue, timeout_s=a.timeout, ui=not a.no_ui,
                      ui_auth=a.auth)
    if a.openapi:
        from ..artifacts import to_json

        a.openapi.write_text(to_json(build_service(cfg).openapi()))
        print(f"{a.openapi}: the OpenAPI spec of `cbir serve` {__version__}")
        return
    serve(cfg)


def add_serve(sub):
    p = sub.add_parser("serve", help="HTTP search service (OpenAPI at /docs) with the page at /ui",
                       description="Serve the run's index to other programs: POST /v1/search (a photo → boxes and "
                                   "neighbours, as `search --json`), /v1/search/text, GET /v1/images/ID (+ /thumbnail, "
                                   "/similar), POST /v1/images and DELETE /v1/images/ID (the edits of `index "
                                   "--add/--remove`), /healthz, /readyz, /metrics. Concurrent requests are answered "
                                   "in shared batches; a commit by any process is served without a restart.")
    serving_args(p, 8000)
    p.add_argument("--keys", type=path, metavar="FILE",
                   help="API keys, one `KEY SCOPE[,SCOPE]` per line (scopes read, write); "
                   "or $CBIR_API_KEYS with `;` between entries. Without keys every request is let in")
    p.add_argument("--public-read", action="store_true",
                   help="with keys: searching needs no key (loopback --host only)")
    p.add_argument("--cors", type=text, metavar="ORIGINS",
                   help="comma-separated origins allowed to call from a browser (default none: CORS off)")
    p.add_argument("--max-upload-mb", type=bounded(float, 0.1, 1024.0), default=50.0,
                   help="largest upload in MB (413 beyond; default 50)")
    p.add_argument("--max-batch", type=bounded(int, 1, 256), default=8,
                   help="requests answered by one model pass (default 8)")
    p.add_argument("--max-queue", type=bounded(int, 1, 100000), default=32,
                   help="requests waiting beyond this get 503 with Retry-After (default 32)")
    p.add_argument("--timeout", type=bounded(float, 0.1, 3600.0), default=30.0,
                   help="seconds a request may take before 504 (default 30)")
    p.add_argument("--no-ui", action="store_true", help="do not mount the page at /ui")
    p.add_argument("--openapi", type=path, metavar="FILE", help="write the service's OpenAPI spec to FILE and exit")
    p.add_argument("--auth", type=auth, metavar="USER:PASS",
                   help="the page's login (or $CBIR_UI_AUTH); API keys guard the API")
    p.set_defaults(func=cmd_serve)
