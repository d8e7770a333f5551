"""Exploratory report of a prepared run: what the split, images and boxes look like, as Markdown + PNGs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .artifacts import atomic_path, record  # noqa: E402
from .data import cub_root, load_rgb, load_split  # noqa: E402


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
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


def plot_samples(df: pd.DataFrame, root: Path, path: Path, n: int = 12, seed: int = 0) -> str:
    sample = df.sample(min(n, len(df)), random_state=seed)
    cols = 4
    rows = -(-len(sample) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3.2, rows * 2.9))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, r in zip(np.ravel(axes), sample.itertuples()):
        ax.imshow(load_rgb(root / "images" / r.path))
        ax.add_patch(plt.Rectangle((r.x, r.y), r.w, r.h, fill=False, color="lime", lw=2))
        ax.set_title(f"{r.class_name.split('.', 1)[-1][:24]}\n#{r.image_id} ({r.split})", fontsize=8)
    return _save(fig, path)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for name, part in [("all", df)] + [(s, df[df.split == s]) for s in ("train", "test")]:
        rows.append({"split": name, "images": len(part), "classes": part.class_id.nunique(),
                     "greyscale": int((part["mode"] == "L").sum()) if "mode" in part else 0,
                     "median width": int(part.width.median()), "median height": int(part.height.median()),
                     "min side": int(np.minimum(part.width, part.height).min()),
                     "median box area %": round(float((part.w * part.h / (part.width * part.height)).median() * 100), 1)})
    return pd.DataFrame(rows)


def eda(run: Path) -> Path:
    """Write RUN/eda/report.md with its plots; returns the report path."""
    run = Path(run)
    df, root, out = load_split(run), cub_root(run), run / "eda"
    out.mkdir(parents=True, exist_ok=True)
    plots = {"Images per class": plot_class_counts(df, out / "class_counts.png"),
             "Image sizes": plot_sizes(df, out / "image_sizes.png"),
             "Boxes: relative area and aspect ratio": plot_boxes(df, out / "boxes.png"),
             "Where the birds are": plot_centres(df, out / "box_centres.png"),
             "Samples with their GT boxes": plot_samples(df, root, out / "samples.png")}
    lines = ["# EDA", "", f"Run `{run}`, CUB root `{root}`.", "", summary(df).to_markdown(index=False), ""]
    for title, png in plots.items():
        lines += [f"## {title}", "", f"![{title}]({png})", ""]
    report = out / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(lines))
    record(run, "eda/report.md", source="split.csv", plots=list(plots.values()))
    return report
