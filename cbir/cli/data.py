"""Data commands: `prepare` (a dataset → RUN/dataset and its EDA), `eda` and `download-cub`."""

from __future__ import annotations

from pathlib import Path

from .. import CbirError
from .flags import DEFAULT_WORKERS, dataset_args, force_arg, md5, or_default, path, run_arg, url, workers_arg


def prepare_config(a, run: Path):
    from ..datasets.prepare import PrepareConfig

    if a.coco is None and (a.images or a.captions):
        raise CbirError("--images and --captions go with --coco")
    dataset = "coco" if a.coco else "photos" if a.photos else "cub"
    return PrepareConfig(run=run, root=a.coco or a.photos or a.cub, dataset=dataset, images=a.images,
                         captions=a.captions, class_labels=a.class_labels, boxes=a.boxes, strict=a.strict,
                         split=a.split, skip_bad=a.skip_bad, max_pixels=a.max_pixels,
                         workers=or_default(a.workers, DEFAULT_WORKERS), force=getattr(a, "force", False))


def dataset_line(run: Path, s: dict) -> str:
    """The prepared dataset in one line (a photo folder: what the scan skipped and merged)."""
    if s["dataset"] == "photos":
        split = f"{s['train']} train, {s['test']} test, {s['classes']} classes" if s["labelled"] else "no labels"
        return (f"{run}/dataset: {s['images']} photos ({split}), {s['instances']} known boxes; {s['skipped']} files "
                f"skipped (listed in {run}/dataset/skipped.csv), {s['duplicates']} duplicate paths, "
                f"{s['hidden_or_system']} hidden or system files passed over")
    return (f"{run}/dataset: {s['images']} images ({s['train']} train, {s['test']} test), {s['classes']} classes, "
            f"{s['instances']} GT boxes; {s['bad_images']} bad, {s['clipped_boxes']} boxes clipped"
            + (f"; {s['crowd_skipped']} crowd regions left out, {s['images_without_objects']} images without objects"
               if "crowd_skipped" in s else ""))


def cmd_prepare(a):
    from ..datasets.prepare import prepare
    from ..metrics.eda import eda

    result = prepare(prepare_config(a, a.out))
    s = result.dataset.meta["summary"]
    print(dataset_line(a.out, s))
    if not a.no_eda:
        print(f"EDA report: {eda(a.out)}")


def add_prepare(sub):
    p = sub.add_parser("prepare", help="read CUB, COCO or a folder of photos, split it, check every image → "
                       "RUN/dataset (+ EDA)",
                       description="Read the official CUB layout (--cub), a COCO instances file (--coco) or any "
                                   "folder of photos (--photos; rescans hash only changed files), split "
                                   "it, decode every image and check every record and box; write RUN/dataset "
                                   "(images.parquet, instances.parquet, gt_coco.json: COCO instances — CUB: category "
                                   "16 'bird' —, captions.parquet with --captions) and RUN/eda/report.md. Redone only "
                                   "when its inputs change.")
    dataset_args(p)
    p.add_argument("--out", required=True, type=path, help="run directory to create or update")
    p.add_argument("--no-eda", action="store_true", help="skip the EDA report")
    force_arg(p, "the preparation")
    workers_arg(p)
    p.set_defaults(func=cmd_prepare)


def cmd_eda(a):
    from ..metrics.eda import eda

    print(f"EDA report: {eda(a.run, a.force)}")


def add_eda(sub):
    p = sub.add_parser("eda", help="(re)write the EDA report of a prepared run",
                       description="Plots and a summary table of the split, image sizes and GT boxes → RUN/eda/.")
    run_arg(p)
    force_arg(p, "the report")
    p.set_defaults(func=cmd_eda)


def cmd_download(a):
    from ..datasets.download import CUB_MD5, CUB_URL, download_cub

    print(download_cub(Path(a.out), a.url or CUB_URL, a.md5 or CUB_MD5))


def add_download(sub):
    p = sub.add_parser("download-cub", help="download and verify the official CUB_200_2011.tgz",
                       description="Download CUB_200_2011.tgz (resuming a partial download), check its md5, extract. "
                                   "Prints the CUB root to pass to `cbir prepare --cub`.")
    p.add_argument("--out", type=path, required=True, help="folder for the archive and the extracted data")
    p.add_argument("--url", type=url, help="mirror URL of the archive (default: CaltechDATA)")
    p.add_argument("--md5", type=md5, help="expected md5 of the archive at --url")
    p.set_defaults(func=cmd_download)
