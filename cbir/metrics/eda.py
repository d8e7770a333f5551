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
    """Sample images with every GT box drawn (labelled with its category when there are several kinds)."""
    sample = data.images.sample(min(n, len(data.images)), random_state=seed)
    several = df.category_id.nunique() > 1
    cols = 4
    rows = -(-len(sample) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 2.9))
    for ax in np.ravel(axes):
        ax.axis("off")
    boxes = df.groupby("image_id")
    for ax, r in zip(np.ravel(axes), sample.itertuples()):
        ax.imshow(load_rgb(data.image_path(r.path)))
        for b in (boxes.get_group(r.image_id).itertuples() if r.image_id in boxes.groups else []):
            ax.add_patch(plt.Rectangle((b.x, b.y), b.w, b.h, fill=False, color="lime", lw=1.5 if several else 2))
            if several:
                ax.text(b.x, b.y, b.category, fontsize=5, color="black", backgroundcolor="lime", va="bottom")
        ax.set_title(f"{r.class_name.split('.', 1)[-1][:24]}\n#{r.image_id} ({r.split})", fontsize=8)
    return _save(fig, path)


def plot_objects(images: pd.DataFrame, df: pd.DataFrame, path: Path, top: int = 30) -> str:
    """Multi-object datasets: objects per image, and the categories by how many images hold them."""
    per_image = df.groupby("image_id").size().reindex(images.image_id, fill_value=0)
    holding = df.drop_duplicates(["image_id", "category"]).category.value_counts().head(top)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 2]})
    axes[0].hist(per_image, bins=np.arange(per_image.max() + 2) - 0.5, color="tab:blue")
    axes[0].set(xlabel="GT objects in the image", ylabel="images", title="Objects per image")
    axes[1].bar(holding.index, holding.to_numpy(), color="tab:orange")
    axes[1].set(ylabel="images holding it", title=f"The {len(holding)} most frequent categories")
    axes[1].tick_params(axis="x", labelrotation=90, labelsize=7)
    return _save(fig, path)


def category_table(images: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """Per category: boxes, images holding it, and COCO's size buckets (small < 32², large ≥ 96² px)."""
    area = df.w * df.h
    table = df.assign(small=area < 32 ** 2, medium=(area >= 32 ** 2) & (area < 96 ** 2), large=area >= 96 ** 2) \
        .groupby("category").agg(boxes=("image_id", "size"), images=("image_id", "nunique"), small=("small", "sum"),
                                 medium=("medium", "sum"), large=("large", "sum"))
    return table.sort_values(["images", "boxes"], ascending=False).reset_index()


def summary(images: pd.DataFrame, boxes: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name in ("all", "train", "test"):
        part = images if name == "all" else images[images.split == name]
        box = boxes if name == "all" else boxes[boxes.split == name]
        if part.empty:  # a photo folder without labels is all gallery (train): no test row
            continue
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
            if df.category_id.nunique() > 1 or df.image_id.duplicated().any():
                plots["Objects per image and category frequencies"] = plot_objects(data.images, df,
                                                                                   out / "objects.png")
                per_image = df.groupby("image_id").size().reindex(data.images.image_id, fill_value=0)
                lines += [f"Objects per image: median {per_image.median():g}, max {per_image.max()}; "
                          f"{int((per_image == 0).sum())} images without objects; "
                          f"{int((df.groupby('image_id').category_id.nunique() >= 2).sum())} with two or more "
                          "categories. Class of an image (`class_id`): the category of its largest object.", "",
                          "## Categories (boxes, images holding them, size buckets by box area: small < 32², large ≥ 96² px)", "",
                          category_table(data.images, df).to_markdown(index=False), ""]
            for title, png in plots.items():
                lines += [f"## {title}", "", f"![{title}]({png})", ""]
            staged.file(layout.REPORT).write_text("\n".join(lines))
            staged.summary.update(plots=list(plots.values()))
        return art.link / layout.REPORT
