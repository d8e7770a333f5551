"""The `embed` command: one vector per image, box or instance → RUN/embeddings/NAME."""

from __future__ import annotations

from pathlib import Path

from .flags import (
    bounded,
    device_arg,
    embedding_args,
    engine_args,
    engine_config,
    force_arg,
    name,
    run_arg,
    text,
    workers_arg,
)


def embed_config(a, run: Path, mode: str, name: str | None = None):
    from ..encoders.stage import EmbedConfig

    return EmbedConfig(run=run, mode=mode, backbone=a.backbone, weights=a.weights, pool=a.pool,
                       crop_margin=a.crop_margin, crop_resize=a.crop_resize, size=getattr(a, "size", None),
                       roi=getattr(a, "roi", False), batch_size=a.batch_size, workers=a.workers, device=a.device,
                       bf16=getattr(a, "bf16", False), name=name, engine=engine_config(a),
                       force=getattr(a, "force", False))


def cmd_embed(a):
    from ..encoders.stage import embed

    if a.head:
        from ..encoders.stage import load_embeddings
        from ..training.stage import apply_model

        model = Path(a.head).name  # a model's name or its folder RUN/models/NAME
        name = apply_model(a.run, model, a.embeddings, a.name, a.device, a.force, engine_config(a))
        vectors, _, info = load_embeddings(a.run, name)
        print(f"{a.run}/embeddings/{name}: {vectors.shape[0]} x {vectors.shape[1]} through {model} "
              f"({info['spec']['backbone']})")
        return
    vectors, table, info = embed(embed_config(a, a.run, a.mode, a.name))
    print(f"{a.run}/embeddings/{a.name or a.mode}: {vectors.shape[0]} x {vectors.shape[1]} "
          f"({table.source.value_counts().to_dict()}), backbone {info['spec']['backbone']} "
          f"[{info['spec']['weights_fingerprint']}]")


def add_embed(sub):
    p = sub.add_parser("embed", help="one vector per image, GT box or detected instance → RUN/embeddings/NAME",
                       description="Embed whole images (full), ground-truth boxes (gt, the oracle) or every "
                                   "detected instance (det) with a CNN trunk → RUN/embeddings/NAME/vectors.npy "
                                   "(float32 [N, D]) + rows.parquet (one row per vector). Resumable; redone only when "
                                   "its inputs change (or --force).")
    run_arg(p)
    p.add_argument("--mode", default="full", choices=("full", "gt", "det"), help="full | gt | det (default full)")
    embedding_args(p)
    p.add_argument("--size", type=bounded(int, 32, 2048), help="input side in pixels (default: the weights' own)")
    p.add_argument("--roi", action="store_true", help="gt/det: one trunk pass per image, every box RoI-pooled "
                   "from the feature map (torchvision.ops.roi_align) instead of re-embedding each crop")
    device_arg(p)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU or CUDA)")
    p.add_argument("--name", type=name, help="output name under embeddings/ (default: the mode; with --head SET@MODEL)")
    p.add_argument("--head", type=text, metavar="MODEL", help="instead: put a stored set through a model trained by "
                   "`cbir train-embedder` (RUN/models/MODEL or its name) → embeddings/SET@..., e.g. a head trained on "
                   "gt boxes for the det set")
    p.add_argument("--embeddings", type=name, metavar="SET",
                   help="with --head: the set to transform (default: the model's own)")
    force_arg(p, "the embedding")
    workers_arg(p)
    engine_args(p)
    p.set_defaults(func=cmd_embed)
