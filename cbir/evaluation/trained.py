"""The trained-embeddings table of the retrieval report: each set a `train-embedder` model wrote (or that
`embed --head` made through one) beside the frozen set it came from, on the same test split and metrics,
with the model's card (loss, miner, mode, time, the epoch validation chose). A trained set that scores
below its source says so: off-the-shelf is the bar every trained model is held to."""

from __future__ import annotations

import pandas as pd

from ..artifacts import Artifact, read_json
from ..layout import RunLayout

COMPARED = ["R@1", "R@2", "R@4", "R@8", "P@5", "mAP", "MAP@R", "NMI"]


def trained_origin(layout: RunLayout, name: str) -> tuple[str, str] | None:
    """(model, source set) of a trained set — the head it was put through (its upstream), or the fine-tuned
    trunk whose card names it; None for frozen sets and text bridges (their own report is `evaluate-text`)."""
    upstream = (Artifact(layout, layout.embeddings(name)).meta() or {}).get("upstream", {})
    model = next((k.split("/", 1)[1] for k in upstream if k.startswith("models/")), None)
    source = next((k.split("/", 1)[1] for k in upstream if k.startswith("embeddings/")), None)
    if model and source:
        folder = Artifact(layout, layout.model(model))
        return (model, source) if folder.exists() and (folder.folder() / "head.pt").is_file() else None
    for artifact in (n for n in layout.artifact_names() if n.startswith("models/")):
        folder = Artifact(layout, artifact).folder()
        card = read_json(folder / "card.json") if (folder / "backbone.pth").is_file() else {}
        if card.get("name") == name:
            return artifact.split("/", 1)[1], card["embeddings"]
    return None


def _plain_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per set: refit, exact, no re-ranking, PCA auto when scored (else the first PCA setting)."""
    rows = metrics[(metrics.reduction == "refit") & (metrics["index"] == "exact") & (metrics.rerank == "none")]
    rows = rows.assign(auto=rows.pca != "auto").sort_values(["embeddings", "auto"], kind="stable")
    return rows.drop_duplicates("embeddings").set_index("embeddings")


def training_table(layout: RunLayout, metrics: pd.DataFrame) -> pd.DataFrame:
    """Trained set vs its source: the card's settings, the test metrics of both and the differences."""
    plain = _plain_rows(metrics)
    out = []
    for name in plain.index:
        origin = trained_origin(layout, name)
        if origin is None or origin[1] not in plain.index:
            continue
        model, source = origin
        card = read_json(Artifact(layout, layout.model(model)).folder() / "card.json")
        trained, frozen = plain.loc[name], plain.loc[source]
        row = {"embeddings": name, "source": source, "mode": card.get("mode", "head"), "loss": card["loss"],
               "miner": card["miner"], "seconds": card["seconds"], "best epoch": card["best_epoch"],
               "validation MAP@R": f"{card['baseline']['MAP@R']:.3f} → {card['best']['MAP@R']:.3f}",
               "refit": "yes" if card.get("refit") else "no",
               "pca": trained.pca}
        for metric in COMPARED:
            row[metric] = trained[metric]
            row[f"Δ{metric}"] = trained[metric] - frozen[metric]
        row["verdict"] = _verdict(row["ΔR@1"], row["ΔMAP@R"], card["best_epoch"])
        out.append(row)
    return pd.DataFrame(out)


def _verdict(d_r1: float, d_map: float, best_epoch: int) -> str:
    if best_epoch == 0:
        return "unchanged (validation kept epoch 0)"
    if d_r1 >= 0 and d_map >= 0:
        return "better"
    if d_r1 <= 0 and d_map <= 0:
        return "worse: keep the source set"
    return "mixed"


def training_markdown(table: pd.DataFrame) -> str:
    shown = table[["embeddings", "source", "mode", "loss", "miner", "seconds", "best epoch", "validation MAP@R",
                   "refit", "R@1", "ΔR@1", "MAP@R", "ΔMAP@R", "mAP", "ΔmAP", "NMI", "verdict"]].copy()
    for c in ("R@1", "MAP@R", "mAP", "NMI"):
        shown[c] = shown[c].map(lambda v: f"{v:.3f}")
    for c in ("ΔR@1", "ΔMAP@R", "ΔmAP"):
        shown[c] = shown[c].map(lambda v: f"{100 * v:+.1f}")
    return "\n".join([
        "## Trained embeddings against their source", "",
        "Each set trained by `cbir train-embedder` (or put through a trained model with `cbir embed --head`) "
        "beside the frozen set it came from, on the same test split (PCA fitted on the train split, exact search, "
        "no re-ranking). "
        "Δ columns: trained minus source, in points. `validation MAP@R`: epoch 0 (no training) → the epoch "
        "validation chose, on the held-out part of the train split; `refit`: the model kept was then trained again "
        "from its start on the whole train split for that many epochs; `seconds`: training time, refit included.", "",
        shown.to_markdown(index=False), ""])
