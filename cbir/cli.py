"""`cbir` command line: parses flags, calls one stage function, prints a short summary to stdout."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import CbirError, __version__

log = logging.getLogger("cbir")


def _workers(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for decoding (default 2)")


def _weights(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--weights", default="DEFAULT",
                   help=f"{what} weights: DEFAULT / a torchvision weights name (looked up in $CBIR_WEIGHTS_DIR, "
                        "the torch hub cache, then downloaded), a state_dict PATH, or 'none' (random, plumbing only)")


def cmd_prepare(a):
    from .data import PrepareConfig, prepare
    from .eda import eda

    result = prepare(PrepareConfig(Path(a.cub), Path(a.out), a.split, a.skip_bad, a.workers))
    counts = result.split.split.value_counts()
    print(f"{a.out}/split.csv: {len(result.split)} images ({counts.get('train', 0)} train, "
          f"{counts.get('test', 0)} test), {result.split.class_id.nunique()} classes; "
          f"{len(result.bad)} bad, {result.clipped} boxes clipped")
    if not a.no_eda:
        print(f"EDA report: {eda(Path(a.out))}")


def cmd_eda(a):
    from .eda import eda

    print(f"EDA report: {eda(Path(a.run))}")


def cmd_download(a):
    from .download import CUB_MD5, CUB_URL, download_cub

    print(download_cub(Path(a.out), a.url or CUB_URL, a.md5 or CUB_MD5))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cbir", description="Object-detection-based multi-instance image retrieval "
                                     "on CUB-200-2011 and your own photos. Stages: prepare → detect → embed → "
                                     "index → evaluate / search / ui; `run` chains them.")
    parser.add_argument("--version", action="version", version=f"cbir {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="read CUB, split it, check every image, write split.csv + gt_coco.json + EDA",
                       description="Read the official CUB layout, split it, decode every image and check every box; "
                                   "write RUN/split.csv, RUN/gt_coco.json (COCO instances, category 16 'bird') and "
                                   "RUN/eda/report.md.")
    p.add_argument("--cub", required=True, help="CUB root: the folder holding images.txt and images/")
    p.add_argument("--out", required=True, help="run directory to create or update")
    p.add_argument("--split", default="song", help="song (classes 1-100 train / 101-200 test, Song et al. 2016), "
                   "official (train_test_split.txt), or classes:A-B/C-D (e.g. classes:1-10/11-20 for a subset)")
    p.add_argument("--skip-bad", action="store_true", help="drop undecodable images and empty boxes instead of "
                   "stopping; they are listed in RUN/bad_images.txt")
    p.add_argument("--no-eda", action="store_true", help="skip the EDA report")
    _workers(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("eda", help="(re)write the EDA report of a prepared run",
                       description="Plots and a summary table of the split, image sizes and GT boxes → RUN/eda/.")
    p.add_argument("--run", required=True)
    p.set_defaults(func=cmd_eda)

    p = sub.add_parser("download-cub", help="download and verify the official CUB_200_2011.tgz",
                       description="Download CUB_200_2011.tgz (resuming a partial download), check its md5, extract. "
                                   "Prints the CUB root to pass to `cbir prepare --cub`.")
    p.add_argument("--out", required=True, help="folder for the archive and the extracted data")
    p.add_argument("--url", help="mirror URL of the archive (default: CaltechDATA)")
    p.add_argument("--md5", help="expected md5 of the archive at --url")
    p.set_defaults(func=cmd_download)

    for register in _stage_parsers():
        register(sub)
    return parser


def _stage_parsers():
    """Subcommands of the later stages, each defined beside its own flags."""
    return []


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        args.func(args)
    except CbirError as e:
        print(f"cbir {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cbir {args.command}: interrupted; finished work is kept, run the same command to resume",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
