"""Evaluation pictures: PR curves, 2-D maps of the test embeddings, and qualitative top-10 grids."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from ..datasets import RunDataset, short_name  # noqa: E402
from ..images import load_rgb  # noqa: E402
from .ranking import Gallery, image_sims  # noqa: E402

log = logging.getLogger(__name__)


def _save(fig, path: Path, **kwargs) -> Path:
    """Into the staged artifact folder: the artifact appears with all its pictures or not at all."""
    if not kwargs:
        fig.tight_layout()
    fig.savefig(path, dpi=100, format="png", **kwargs)
    plt.close(fig)
    return path


def pr_curves(curves: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colours = {}
    for name, (recall, precision) in curves.items():
        mode = name.split(" (")[0]
        colour = colours.setdefault(mode, plt.get_cmap("tab10")(len(colours) % 10))
        ax.plot(recall, precision, label=name, lw=1.8, color=colour, ls="--" if "none" in name else "-")
    ax.set(xlabel="recall (micro-averaged over queries)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title="Precision-recall of leave-one-out retrieval (test split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


MAPS = ("pca", "tsne", "umap")


def map_methods(names: tuple[str, ...], n_points: int, seed: int = 0) -> dict:
    """2-D projections by name (`--maps`): PCA, t-SNE, and UMAP from umap-learn (the `metric` extra; its numba
    compilation costs ~20 s per process, hence not a default)."""
    methods = {}
    for name in names:
        if name == "pca":
            methods["PCA"] = PCA(2, random_state=seed)
        elif name == "tsne":
            # t-SNE needs perplexity below the number of points (a small test split: a few photos of a folder)
            methods["t-SNE"] = TSNE(2, init="pca", perplexity=max(1, min(30, max(5, n_points // 10), n_points - 1)),
                                    random_state=seed)
        else:
            import umap

            methods["UMAP"] = umap.UMAP(n_neighbors=min(15, max(2, n_points - 1)), random_state=seed)
    return methods


def embedding_map(name: str, gallery, path: Path, class_names: dict[int, str], maps: tuple[str, ...] = ("pca", "tsne"),
                  seed: int = 0) -> Path:
    """The test query vectors in 2-D by each of `maps`, coloured by class (named)."""
    methods = map_methods(maps, len(gallery.query), seed)
    classes = np.unique(gallery.labels)
    cmap = plt.get_cmap("tab20" if len(classes) <= 20 else "gist_ncar")
    colour = {c: cmap(i % 20 / 19 if len(classes) <= 20 else i / len(classes)) for i, c in enumerate(classes)}
    fig, axes = plt.subplots(1, len(methods), figsize=(5.2 * len(methods) + 1.6, 4.8))
    for ax, (title, method) in zip(np.atleast_1d(axes), methods.items()):
        xy = method.fit_transform(gallery.query)
        ax.scatter(xy[:, 0], xy[:, 1], c=[colour[c] for c in gallery.labels], s=9, alpha=0.85)
        ax.set(title=f"{title} — {name}", xticks=[], yticks=[])
    if len(classes) <= 20:
        handles = [plt.Line2D([], [], marker="o", ls="", color=colour[c], label=short_name(class_names.get(c, str(c))))
                   for c in classes]
        fig.legend(handles=handles, title="class", loc="center right", fontsize=8)
        fig.subplots_adjust(right=0.88)
    fig.suptitle(f"Test embeddings ({len(gallery.query)} images, {len(classes)} classes)")
    return _save(fig, path, bbox_inches="tight")


def fixed_queries(labels: np.ndarray, n: int = 4) -> list[int]:
    """The first image of n evenly spaced classes: the same queries on every run of the same data."""
    classes = np.unique(labels)
    picks = classes[np.linspace(0, len(classes) - 1, min(n, len(classes))).round().astype(int)]
    return [int(np.flatnonzero(labels == c)[0]) for c in picks]


def _show(ax, image, box, colour: str, title: str, border: str | None = None):
    ax.imshow(image)
    if box is not None:
        ax.add_patch(plt.Rectangle(box[:2], box[2], box[3], fill=False, color="yellow", lw=1.6))
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(border or colour)
        spine.set_linewidth(4)


def qualitative_grid(data: RunDataset, name: str, gallery: Gallery, path: Path, k: int = 10) -> Path:
    """Fixed queries with their top-k: green border = same class, red = other; boxes = matched instance."""
    split = data.images.set_index("image_id")
    queries = fixed_queries(gallery.labels)
    sims = image_sims(gallery.query[queries], gallery)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.75 * (k + 1), 1.9 * len(queries)))
    for row, (qi, s) in enumerate(zip(queries, sims)):
        s[qi] = -np.inf
        top = np.argsort(-s, kind="stable")[:k]
        img_of = lambda i: load_rgb(data.image_path(split.loc[gallery.image_ids[i]].path))  # noqa: E731
        qbox = gallery.boxes[gallery.starts[qi]] if gallery.boxes is not None else None
        _show(axes[row, 0], img_of(qi), qbox, "blue", f"QUERY #{gallery.image_ids[qi]}\n"
              f"{split.loc[gallery.image_ids[qi]].class_name.split('.', 1)[-1][:22]}")
        for col, gi in enumerate(top, 1):
            box = None
            if gallery.boxes is not None:
                end = gallery.starts[gi + 1] if gi + 1 < len(gallery.starts) else len(gallery.instances)
                best = gallery.starts[gi] + int(np.argmax(gallery.instances[gallery.starts[gi]:end] @ gallery.query[qi]))
                box = gallery.boxes[best]
            same = gallery.labels[gi] == gallery.labels[qi]
            _show(axes[row, col], img_of(gi), box, "green" if same else "red",
                  f"{col}. {s[gi]:.2f}\n{split.loc[gallery.image_ids[gi]].class_name.split('.', 1)[-1][:22]}")
    fig.suptitle(f"{name}: fixed queries (blue) and their top {k} — green = same class, red = other; "
                 f"yellow = matched box", fontsize=10)
    return _save(fig, path)


def write_plots(data: RunDataset, result, folder: Path, maps: tuple[str, ...] = ("pca", "tsne")) -> list[Path]:
    """PR curves of every computed row, and per embeddings set its 2-D maps and top-10 grid."""
    out = [pr_curves(result.curves, folder / "pr_curves.png")]
    names = dict(zip(data.images.class_id, data.images.class_name))
    seen = set()
    for key, gallery in result.galleries.items():
        name = key.split(" (")[0]
        if name in seen:
            continue
        seen.add(name)
        slug = name.replace("+", "_")
        out.append(embedding_map(key, gallery, folder / f"embedding_map_{slug}.png", names, maps))
        out.append(qualitative_grid(data, key, gallery, folder / f"grid_{slug}.png"))
    return out
