"""Exploratory report of a prepared run: what the split, images and boxes look like, as Markdown + PNGs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..artifacts import Artifact, commit, is_fresh, writing  # noqa: E402
from ..datasets import RunDataset, load_dataset  # noqa: E402
from ..images import load_rgb  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path.name


def plot_class_counts(df: pd.DataFrame, path: Path) -> str:
    counts = df.groupby(["class_id", "split"]).size().unstack(fill_value=0)
    fig, ax = plt.subplots(figsize=(max(6, min(18, len(counts) * 0.09 + 4)), 3.6))
    for split, color in (("train", "tab:blue"), ("test", "tab:orange")):
        if split in counts:
            ax.bar(counts.index, counts[split], color=color, label=split, width=0.85)
    ax.set(xlabel="class id", ylabel="images", title="Images per class (colour = split)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_sizes(df: pd.DataFrame, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, col in zip(axes, ("width", "height")):
        ax.hist(df[col], bins=40, color="tab:blue")
        ax.set(xlabel=f"{col} (px)", ylabel="images", title=f"Image {col}")
    return _save(fig, path)


def plot_boxes(df: pd.DataFrame, path: Path) -> str:
    area = df.w * df.h / (df.width * df.height)
    aspect = df.w / df.h
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    axes[0].hist(area, bins=40, range=(0, 1), color="tab:green")
    axes[0].set(xlabel="box area / image area", ylabel="images", title="GT box relative area")
    axes[1].hist(np.log2(aspect), bins=40, color="tab:purple")
    axes[1].set(xlabel="log2(box width / height)", ylabel="images", title="GT box aspect ratio")
    return _save(fig, path)


def plot_centres(df: pd.DataFrame, path: Path) -> str:
    cx, cy = (df.x + df.w / 2) / df.width, (df.y + df.h / 2) / df.height
    fig, ax = plt.subplots(figsize=(4.6, 4))
    h = ax.hist2d(cx, cy, bins=20, range=[[0, 1], [0, 1]], cmap="viridis")
    ax.invert_yaxis()
    ax.set(xlabel="centre x / width", ylabel="centre y / height", title="GT box centres")
    fig.colorbar(h[3], ax=ax, label="images")
    return _save(fig, path)


def plot_samples(df: pd.DataFrame, data: RunDataset, path: Path, n: int = 12, seed: int = 0) -> str:
    sample = df.sample(min(n, len(df)), random_state=seed)
    cols = 4
    rows = -(-len(sample) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 2.9))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, r in zip(np.ravel(axes), sample.itertuples()):
        ax.imshow(load_rgb(data.image_path(r.path)))
        ax.add_patch(plt.Rectangle((r.x, r.y), r.w, r.h, fill=False, color="lime", lw=2))
        ax.set_title(f"{r.class_name.split('.', 1)[-1][:24]}\n#{r.image_id} ({r.split})", fontsize=8)
    return _save(fig, path)


def summary(images: pd.DataFrame, boxes: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name in ("all", "train", "test"):
        part = images if name == "all" else images[images.split == name]
        box = boxes if name == "all" else boxes[boxes.split == name]
        rows.append({"split": name, "images": len(part), "classes": part.class_id.nunique(), "boxes": len(box),
                     "greyscale": int((part["mode"] == "L").sum()),
                     "median width": int(part.width.median()), "median height": int(part.height.median()),
                     "min side": int(np.minimum(part.width, part.height).min()),
                     "median box area %": round(float((box.w * box.h / (box.width * box.height)).median() * 100), 1)})
    return pd.DataFrame(rows)


def eda(run: Path, force: bool = False) -> Path:
    """Write the `eda` artifact (report.md with its plots) of a prepared run; returns the report path."""
    with writing(run) as layout:
        data = load_dataset(layout)
        art = Artifact(layout, layout.eda)
        inputs = {"dataset": data.fingerprint}
        if is_fresh(art, inputs, force):
            return art.link / layout.REPORT
        # one row per GT box, with its image's size, class and split (CUB: one per image)
        df = data.instances.merge(data.images, on="image_id")
        with commit(art, inputs, {"dataset": data.fingerprint}) as staged:
            out = staged.folder
            plots = {"Images per class": plot_class_counts(data.images, out / "class_counts.png"),
                     "Image sizes": plot_sizes(data.images, out / "image_sizes.png"),
                     "Boxes: relative area and aspect ratio": plot_boxes(df, out / "boxes.png"),
                     "Where the objects are": plot_centres(df, out / "box_centres.png"),
                     "Samples with their GT boxes": plot_samples(df, data, out / "samples.png")}
            lines = ["# EDA", "", f"Run `{layout.root}`, images `{data.image_dir}`.", "",
                     summary(data.images, df).to_markdown(index=False), ""]
            for title, png in plots.items():
                lines += [f"## {title}", "", f"![{title}]({png})", ""]
            staged.file(layout.REPORT).write_text("\n".join(lines))
            staged.summary.update(plots=list(plots.values()))
        return art.link / layout.REPORT
