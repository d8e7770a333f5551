"""The front page and the docs: every link resolves, the site builds with warnings as errors, and every
results table equals the report it names (scripts/docs_tables.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import docs_tables  # noqa: E402

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def pages() -> list[Path]:
    return docs_tables.markdown_files(ROOT)


def slug(heading: str) -> str:
    """Python-Markdown's toc slug (what MkDocs anchors and GitHub's, for these headings, agree on)."""
    text = re.sub(r"[`*]", "", heading).strip().lower()  # markup, not text (an underscore is text)
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text).strip("-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8")))


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 350, f"README.md has {len(lines)} lines; the depth belongs in docs/"
    text = "\n".join(lines)
    for command in ("make demo", "make test", "cbir ui", "docs/ui.jpg"):
        assert command in text
    linked = {Path(t.split("#")[0]).name for t in links(ROOT / "README.md") if t.startswith("docs/")}
    unlinked = {p.name for p in (ROOT / "docs").glob("*.md")} - linked - {"index.md"}
    assert not unlinked, f"docs pages the front page does not link: {sorted(unlinked)}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_the_link_check_catches_a_broken_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Run state (`cbir status`)\n\n[ok](#run-state-cbir-status) [bad](#nope)\n")
    targets = links(tmp_path / "a.md")
    assert [t[1:] in anchors(tmp_path / "a.md") for t in targets] == [True, False]


def test_docs_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "site" / "architecture" / "index.html").is_file()


def test_every_table_is_copied_from_its_source(capsys):
    wrong, hand = docs_tables.problems(pages())
    assert not wrong, "\n".join(wrong)
    with capsys.disabled():  # say which tables are not copied, so nobody takes them for copied numbers
        print(f"\n{len(hand)} table(s) not copied from a report:\n  " + "\n  ".join(hand))


def test_a_stale_table_is_caught_and_rewritten(tmp_path, monkeypatch):
    """Change one number in a copied table: the check names it, and the rewrite restores the source's."""
    report = tmp_path / "benchmarks" / "results" / "runs" / "r" / "reports" / "x.md"
    report.parent.mkdir(parents=True)
    report.write_text("# x\n\n| a | b |\n|:--|--:|\n| det | 0.925 |\n| gt | 0.923 |\n")
    page = tmp_path / "README.md"
    (tmp_path / "docs").mkdir()
    fresh = "<!-- table: runs/r/reports/x.md where a=det -->\n| a | b |\n|:--|--:|\n| det | 0.925 |\n<!-- end table -->\n"
    page.write_text(fresh.replace("0.925", "0.952"))
    monkeypatch.setattr(docs_tables, "ROOT", tmp_path)
    wrong, _ = docs_tables.problems([page])
    assert len(wrong) == 1 and "README.md:1" in wrong[0]
    assert docs_tables.rewrite([page]) == ["README.md"] and page.read_text() == fresh
    assert docs_tables.problems([page]) == ([], [])
    page.write_text(fresh + "\n| loose | table |\n|---|---|\n")
    assert "no source marker" in docs_tables.problems([page])[0][0]
