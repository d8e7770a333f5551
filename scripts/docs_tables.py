"""Every results table in README.md and docs/ is copied from a report the tool wrote, never typed.

A table is framed by two comments naming its source:

    <!-- table: runs/sample/reports/retrieval/comparison.md #2 where embeddings=det rerank=none|aqe -->
    | ... the table, as the tool wrote it ... |
    <!-- end table -->

`SOURCE` is a report in a run (`runs/...`) or a benchmark result (`benchmarks/results/...`); `#N` picks the
N-th table of that file (default 1); `where COLUMN=V1|V2` keeps the rows whose cell is one of the values
(repeatable: all must hold), the header and the source's own column widths unchanged. A table that holds no
results (a list of commands, the meaning of each metric) is framed as `<!-- table: by hand: WHY -->`; a
results table that no report holds yet is framed as `<!-- table: not from a report: WHY -->`, and the check
lists it every time, so it cannot pass for a copied one.

Runs are not in the repository, so each run report a table was copied from is kept beside the benchmark
results, at `benchmarks/results/runs/...` (a few KB each): the check compares every table with that copy,
and anyone can see which report a number came from.

    python scripts/docs_tables.py            # refresh: copy each run's report in, then rewrite every table
    python scripts/docs_tables.py --check    # exit 1 naming every table that differs from its source

`make docs-tables` is the first; the test suite runs the second on the kept copies.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SNAPSHOTS = Path("benchmarks/results")  # run reports are kept under SNAPSHOTS / "runs/..."
OPEN = re.compile(r"^<!-- table: (.+?) -->\s*$")
CLOSE = "<!-- end table -->"
NOT_COPIED = ("by hand:", "not from a report:")  # not results; results no report holds


@dataclass
class Block:
    """One framed table of a Markdown file: the marker's line, the table's lines [start, end), its spec."""

    file: Path
    marker: int
    start: int
    end: int
    spec: str

    @property
    def not_copied(self) -> bool:
        return self.spec.startswith(NOT_COPIED)

    @property
    def kind(self) -> str:
        return next(k for k in NOT_COPIED if self.spec.startswith(k))

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.marker + 1}"


@dataclass(frozen=True)
class Source:
    path: str  # as written in the marker: runs/... or benchmarks/results/...
    table: int
    rows: tuple[tuple[str, frozenset[str]], ...]

    @classmethod
    def parse(cls, spec: str) -> Source:
        words = spec.split()
        table, rows = 1, []
        rest = iter(words[1:])
        for word in rest:
            if word.startswith("#") and word[1:].isdigit():
                table = int(word[1:])
            elif word == "where":
                continue
            elif "=" in word:
                column, _, values = word.partition("=")
                rows.append((column, frozenset(values.split("|"))))
            else:
                raise ValueError(f"{spec!r}: cannot read {word!r} (give SOURCE [#N] [where COLUMN=V1|V2 ...])")
        return cls(words[0], table, tuple(rows))

    @property
    def kept(self) -> Path:
        """The copy the check reads: a benchmark result itself, or the kept copy of a run's report."""
        return ROOT / (SNAPSHOTS / self.path if self.path.startswith("runs/") else Path(self.path))


def markdown_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def table_spans(lines: list[str]) -> list[tuple[int, int]]:
    """[start, end) of each run of table lines outside code fences."""
    spans, start, fenced = [], None, False
    for i, line in enumerate([*lines, ""]):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        is_row = not fenced and line.lstrip().startswith("|")
        if is_row and start is None:
            start = i
        elif not is_row and start is not None:
            spans.append((start, i))
            start = None
    return spans


def blocks(path: Path, lines: list[str]) -> list[Block]:
    """The framed tables of a file; a marker without its end, or an end without a marker, is an error."""
    found, open_at = [], None
    for i, line in enumerate(lines):
        m = OPEN.match(line.strip())
        if m:
            if open_at is not None:
                raise ValueError(f"{path}:{open_at + 1}: table marker not closed before line {i + 1}")
            open_at, spec = i, m.group(1).strip()
        elif line.strip() == CLOSE:
            if open_at is None:
                raise ValueError(f"{path}:{i + 1}: {CLOSE} without a table marker")
            found.append(Block(path, open_at, open_at + 1, i, spec))
            open_at = None
    if open_at is not None:
        raise ValueError(f"{path}:{open_at + 1}: table marker not closed")
    return found


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def source_table(source: Source) -> list[str]:
    """The rows of the source's table as the tool wrote them, filtered by the marker's `where`."""
    path = source.kept
    if not path.is_file():
        hint = f" (run the command that writes {source.path}, then `make docs-tables`)" if source.path.startswith(
            "runs/") else ""
        raise FileNotFoundError(f"{path.relative_to(ROOT)}: source of a table is missing{hint}")
    lines = path.read_text(encoding="utf-8").splitlines()
    spans = table_spans(lines)
    if source.table > len(spans):
        raise ValueError(f"{source.path} has {len(spans)} table(s), not #{source.table}")
    start, end = spans[source.table - 1]
    table = [line.rstrip() for line in lines[start:end]]
    if not source.rows:
        return table
    header = cells(table[0])
    for column, _ in source.rows:
        if column not in header:
            raise ValueError(f"{source.path} #{source.table} has no column {column!r} (columns: {', '.join(header)})")
    keep = [all(cells(row)[header.index(c)] in values for c, values in source.rows) for row in table[2:]]
    return table[:2] + [row for row, k in zip(table[2:], keep) if k]


def refresh_copies(all_blocks: list[Block]) -> list[str]:
    """Copy each run report a table names from the run (where it is here) to its kept copy."""
    copied = []
    for block in all_blocks:
        if block.not_copied:
            continue
        source = Source.parse(block.spec)
        run_report = ROOT / source.path
        if source.path.startswith("runs/") and run_report.is_file():
            source.kept.parent.mkdir(parents=True, exist_ok=True)
            if not source.kept.is_file() or source.kept.read_bytes() != run_report.read_bytes():
                shutil.copyfile(run_report, source.kept)
                copied.append(source.path)
    return sorted(set(copied))


def problems(files: list[Path]) -> tuple[list[str], list[str]]:
    """(every table that differs from its source or has none, the tables framed as not copied)."""
    wrong, hand = [], []
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        try:
            framed = blocks(path, lines)
        except ValueError as e:
            wrong.append(str(e))
            continue
        inside = {i for b in framed for i in range(b.marker, b.end + 1)}
        for start, _ in table_spans(lines):
            if start not in inside:
                wrong.append(f"{path.relative_to(ROOT)}:{start + 1}: a table with no source marker")
        for b in framed:
            if b.not_copied:
                why = b.spec[len(b.kind):].strip()
                (hand if why else wrong).append(f"{b.where}: {b.kind} {why or 'says not why'}")
                continue
            try:
                want = source_table(Source.parse(b.spec))
            except (OSError, ValueError) as e:
                wrong.append(f"{b.where}: {e}")
                continue
            if [line.rstrip() for line in lines[b.start:b.end]] != want:
                wrong.append(f"{b.where}: differs from {b.spec} (run `make docs-tables`)")
    return wrong, hand


def rewrite(files: list[Path]) -> list[str]:
    """Put each source's table between its markers (a table whose source is missing is left as it is, and
    the check names it); the files changed."""
    changed = []
    for path in files:
        lines = path.read_text(encoding="utf-8").splitlines()
        out, at = [], 0
        for b in blocks(path, lines):
            out += lines[at:b.start]
            try:
                out += lines[b.start:b.end] if b.not_copied else source_table(Source.parse(b.spec))
            except OSError:
                out += lines[b.start:b.end]
            at = b.end
        out += lines[at:]
        if out != lines:
            path.write_text("\n".join(out) + "\n", encoding="utf-8")
            changed.append(str(path.relative_to(ROOT)))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check; exit 1 naming each stale table")
    args = parser.parse_args(argv)
    files = markdown_files()
    if not args.check:
        try:
            copied = refresh_copies([b for f in files for b in blocks(f, f.read_text(encoding="utf-8").splitlines())])
            changed = rewrite(files)
        except (OSError, ValueError) as e:
            print(f"docs-tables: error: {e}", file=sys.stderr)
            return 1
        print(f"reports copied from runs: {', '.join(copied) or 'none'}")
        print(f"files rewritten: {', '.join(changed) or 'none (every table already matched its source)'}")
    wrong, hand = problems(files)
    for line in wrong:
        print(f"docs-tables: {line}", file=sys.stderr)
    print(f"{len(hand)} table(s) not copied from a report:", *hand, sep="\n  ")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
