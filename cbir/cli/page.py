"""The page: `cbir ui` serves the Gradio page over the run's index."""

from __future__ import annotations

import logging

from .flags import auth, serving_args

log = logging.getLogger("cbir")


def cmd_ui(a):
    from ..ui.app import serve

    if a.share:
        log.warning("--share: the page will be reachable from the internet through a gradio.live link")
    serve(a.run, a.index, a.host, a.port, a.share, a.detector, a.device, a.weights, a.detector_weights,
          a.rerank, a.auth)


def add_ui(sub):
    p = sub.add_parser("ui", help="Gradio page: upload a photo, see the boxes and each box's neighbours",
                       description="Serve a page over `cbir search`: upload a photo (or click a test-split example), "
                                   "see every object boxed with its score, and each box's nearest gallery images.")
    serving_args(p, 7860)
    p.add_argument("--share", action="store_true", help="also publish a public gradio.live link (off by default)")
    p.add_argument("--auth", type=auth, metavar="USER:PASS",
                   help="ask for this login (or set $CBIR_UI_AUTH, which stays out of "
                   "the process list); use it whenever --host is not loopback or with --share")
    p.set_defaults(func=cmd_ui)
