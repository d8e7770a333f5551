"""Where a benchmark's results go: `benchmarks/results/STEM.json` (every number) and `STEM.md` (the tables the
docs copy with `make docs-tables`), and the same Markdown on stdout."""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).parent / "results"


def write_report(stem: str, result: dict, parts: list[str]) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (OUT / f"{stem}.md").write_text("\n".join(parts))
    print("\n".join(parts))
