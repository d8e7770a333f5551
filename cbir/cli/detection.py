"""Detection commands: `detect` (boxes → RUN/detections) and `train-detector` (a Faster R-CNN → RUN/models)."""

from __future__ import annotations

from pathlib import Path

from .flags import (
    DEFAULT_WORKERS,
    bounded,
    box_args,
    csv_list,
    device_arg,
    engine_args,
    engine_config,
    force_arg,
    name,
    or_default,
    path,
    run_arg,
    splits,
    text,
    workers_arg,
)


def detect_config(a, run: Path):
    from ..detection.stage import DetectConfig

    return DetectConfig(run=run, detector=a.detector, weights=a.detector_weights, labels=a.labels,
                        splits=csv_list(getattr(a, "splits", "train,test")), score=a.score,
                        max_per_image=getattr(a, "max_per_image", 10), min_size=a.min_size,
                        batch_size=getattr(a, "detect_batch_size", 4), workers=or_default(a.workers, DEFAULT_WORKERS),
                        fallback=a.fallback,
                        categories=csv_list(a.categories), detections=a.detections, device=a.device,
                        skip_bad=a.skip_bad, engine=engine_config(a), force=getattr(a, "force", False))


def cmd_detect(a):
    from ..detection.report import write_detection_report
    from ..detection.stage import detect

    if not a.evaluate_only:
        m = detect(detect_config(a, a.run)).meta
        print(f"{a.run}/detections: {m['instances']} instances on {m['images']} images "
              f"({m['sources']}), fallback rate {m['fallback_rate']:.1%}")
    if a.evaluate or a.evaluate_only:
        q = write_detection_report(a.run, a.force)
        print(f"{a.run}/reports/detection: AP {q['AP']:.3f}, AP50 {q['AP50']:.3f}, "
              f"top box IoU>=0.5 {q['top_box_iou50_rate']:.1%}, median IoU {q['median_top_box_iou']:.3f}")


def add_detect(sub):
    p = sub.add_parser("detect", help="find the objects: a detector or imported boxes → RUN/detections",
                       description="Run a detector over the run's images (or import another detector's COCO results "
                                   "with --detections) → RUN/detections/detections.json (COCO results: every kept box, "
                                   "with its source). Resumable; redone only when its inputs change (or --force).")
    run_arg(p)
    box_args(p)
    p.add_argument("--splits", type=splits, default="train,test",
                   help="comma-separated splits to detect on (default train,test)")
    p.add_argument("--max-per-image", type=bounded(int, 1, 1000), default=10,
                   help="keep at most this many boxes per image")
    p.add_argument("--batch-size", dest="detect_batch_size", type=bounded(int, 1, 256), default=4,
                   help="images per batch (default 4)")
    device_arg(p)
    force_arg(p, "the detection")
    p.add_argument("--skip-bad", action="store_true", help="--detections: drop unusable entries (malformed, "
                   "non-finite, empty boxes, scores outside [0, 1], unknown images, duplicates) instead of stopping; "
                   "they are listed in RUN/detections/bad_detections.txt")
    p.add_argument("--evaluate", action="store_true", help="also score the boxes against the GT → reports/detection")
    p.add_argument("--evaluate-only", action="store_true", help="only write the quality report of existing detections")
    workers_arg(p)
    engine_args(p)
    p.set_defaults(func=cmd_detect)


def cmd_train_detector(a):
    from ..detection.training import TrainDetectorConfig, train_detector

    card = train_detector(TrainDetectorConfig(
        run=a.run, coco=a.coco, images=a.images, trunk=a.trunk, trunk_weights=a.trunk_weights,
        detector_weights=a.detector_weights, trainable_layers=a.trainable_layers, min_size=a.min_size,
        max_size=a.max_size, epochs=a.epochs, batch_size=a.batch_size, optimizer=a.optimizer, lr=a.lr,
        warmup=a.warmup, validation=a.validation, max_images=a.max_images, workers=a.workers, device=a.device,
        seed=a.seed, name=a.name, force=a.force))
    v, data = card["validation"], card["data"]
    print(f"{a.run}/models/{card['name']}: {card['architecture']}, {card['trainable_layers']} trunk stage(s) trained, "
          f"{card['epochs']} epochs on {data['train_images']} photos at {card['input_size']['eval_short_side']} px, "
          f"{card['seconds'] / 60:.1f} min on {card['device']}; validation ({data['validation_images']} held-out photos) "
          f"AP {v['AP']:.3f}, AP50 {v['AP50']:.3f}, top-box hit {v['top_box_hit']:.1%}")
    print(f"use it: `cbir detect --run {a.run} --detector {a.run}/models/{card['name']} --force`, then embed, index "
          f"and `cbir ui` (the page boxes new photos with it)")


def add_train_detector(sub):
    from ..detection.frcnn import TRUNKS
    from ..detection.training import JITTER, RECIPES, VALIDATION_SHARE

    cpu, gpu = RECIPES["cpu"], RECIPES["cuda"]
    p = sub.add_parser("train-detector", help="fine-tune a torchvision Faster R-CNN (FPN over an ImageNet trunk) on "
                       "the run's train boxes or a COCO file → RUN/models/NAME",
                       description="Train a Faster R-CNN on COCO-format boxes: the run's train split (CUB: one "
                                   "category, bird) or --coco INSTANCES.json --images DIR. Flips and scale jitter, "
                                   "orientation-grouped batches, a one-cycle schedule with warm-up, clipped "
                                   "gradients, AMP on CUDA; a held-out share of the photos is scored with COCOeval "
                                   "every epoch. Checkpoints every epoch: rerun the same command to resume after a "
                                   "kill. Defaults by device: CPU {c[size]} px, {c[epochs]} epochs, batch "
                                   "{c[batch_size]}; CUDA {g[size]} px, {g[epochs]} epochs, batch {g[batch_size]}."
                                   .format(c=cpu, g=gpu))
    run_arg(p)
    p.add_argument("--coco", type=path, help="a COCO instances file to train on instead of the run's train split")
    p.add_argument("--images", type=path, help="the image folder of --coco")
    p.add_argument("--trunk", default="mobilenet_v2", choices=TRUNKS)
    p.add_argument("--trunk-weights", type=text, default="DEFAULT",
                   help="ImageNet weights of the trunk: DEFAULT / a torchvision "
                   "weights name (looked up in $CBIR_WEIGHTS_DIR, the torch hub cache, then downloaded), a state_dict "
                   "PATH, or 'none' (random, plumbing only)")
    p.add_argument("--detector-weights", type=text,
                   help="resnet50 only: start from COCO Faster R-CNN weights (DEFAULT or PATH) "
                   "instead of the ImageNet trunk")
    p.add_argument("--trainable-layers", type=bounded(int, 0, 6), help="trunk stages trained, from the top; 0 keeps "
                   f"the ImageNet trunk frozen, so --backbone detector embeddings stay the trunk's (default "
                   f"{cpu['trainable_layers']})")
    p.add_argument("--min-size", type=bounded(int, 32, 4096), help="short side at evaluation; training draws it from "
                   f"{', '.join(f'{f:g}x' for f in JITTER)} of it (default: {cpu['size']} on CPU, {gpu['size']} on "
                   f"CUDA)")
    p.add_argument("--max-size", type=bounded(int, 32, 8192), help="long-side cap (default 2x --min-size)")
    p.add_argument("--epochs", type=bounded(int, 1, 1000),
                   help=f"default {cpu['epochs']} on CPU, {gpu['epochs']} on CUDA")
    p.add_argument("--batch-size", type=bounded(int, 1, 256), help=f"photos per step (default {cpu['batch_size']} on "
                   f"CPU, {gpu['batch_size']} on CUDA)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    p.add_argument("--lr", type=bounded(float, 1e-8, 10.0), help="peak learning rate (default 0.01 per 4 photos for "
                   "SGD, 1e-4 for AdamW)")
    p.add_argument("--warmup", type=bounded(float, 0, 0.99), default=0.1, help="share of the steps spent warming up")
    p.add_argument("--validation", type=bounded(float, 0.01, 0.9), default=VALIDATION_SHARE,
                   help="share of the photos held out and scored every epoch")
    p.add_argument("--max-images", type=bounded(int, 2, 10 ** 9), help="train on at most this many photos (a fixed "
                   "hash-drawn subset)")
    p.add_argument("--workers", type=bounded(int, 0, 64), default=1, help="decoding processes")
    p.add_argument("--seed", type=bounded(int, 0, 2 ** 31), default=0)
    p.add_argument("--name", type=name, help="model name (default detector-TRUNK)")
    force_arg(p, "the training")
    device_arg(p)
    p.set_defaults(func=cmd_train_detector)
