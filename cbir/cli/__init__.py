"""`cbir` command line: flags → keyword-only stage configs → one stage function; a short summary on stdout.

One module per command group, each command's parser beside its handler: `data` (prepare, eda, download-cub),
`detection` (detect, train-detector), `embedding` (embed), `search` (index, search), `evaluation` (evaluate,
evaluate-objects, compare-methods, evaluate-text), `training` (train-embedder, train-text), `page` (ui) and
`run` (run, sync, status); `flags` holds the flag groups they share. The config builders (`prepare_config`,
`detect_config`, ...) live with their command and are shared by `cbir run`, so a flag means the same thing
everywhere.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .. import CbirError, __version__
from ..artifacts import Interrupted, machine_fault
from .data import add_download, add_eda, add_prepare
from .detection import add_detect, add_train_detector
from .embedding import add_embed
from .evaluation import add_compare_methods, add_evaluate, add_evaluate_objects, add_evaluate_text
from .flags import Parser
from .page import add_ui
from .run import add_run, add_status, add_sync
from .search import add_index, add_search
from .serve import add_serve
from .training import add_train_embedder, add_train_text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cbir", description="Object-detection-based multi-instance image retrieval "
                                     "on CUB-200-2011 and your own photos. Stages: prepare → detect → embed → "
                                     "index → evaluate / search / ui; `run` chains them; `status` shows a run.")
    parser.add_argument("--version", action="version", version=f"cbir {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for register in (add_prepare, add_eda, add_download, add_status,
                     add_detect, add_embed, add_index, add_search,
                     add_evaluate, add_evaluate_objects, add_compare_methods, add_train_embedder,
                     add_train_detector, add_train_text, add_evaluate_text, add_run,
                     add_sync, add_ui, add_serve):
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "eval_pca", ()) is None:  # `cbir run` evaluates the index's own PCA setting
        args.eval_pca = (args.pca,)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    logging.getLogger("PML").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    for noisy in ("milvus_lite", "pymilvus", "grpc", "httpx", "httpcore"):  # failures reach cbir as exceptions: one line each
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.CRITICAL)
    try:
        args.func(args)
    except Interrupted as e:
        print(f"cbir {args.command}: {e}", file=sys.stderr)
        return 130
    except CbirError as e:
        print(f"cbir {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: disk full, read-only, permissions
        print(f"cbir {args.command}: error: {machine_fault(e, getattr(args, 'run', None) or getattr(args, 'out', None))}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cbir {args.command}: interrupted; nothing half-written was kept — the run holds what it had before",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
