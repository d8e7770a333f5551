"""Every JSON file the tool writes, and `search --json`, parses with a strict reader: no NaN, no Infinity
(browsers, Go, jq and `json.loads(..., parse_constant=...)` refuse them); a value that was not computed is
null."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import copy_run

from cbir.artifacts import to_json, write_json
from cbir.cli import main


def strict(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    doc = {"nan": float("nan"), "inf": np.float32("inf"), "list": [1.5, -np.inf], "array": np.array([np.nan, 2.0]),
           "int": np.int64(3), "nested": {"x": (np.float64("nan"),)}}
    write_json(tmp_path / "a.json", doc)
    assert strict((tmp_path / "a.json").read_text()) == {"nan": None, "inf": None, "list": [1.5, None],
                                                         "array": [None, 2.0], "int": 3, "nested": {"x": [None]}}
    assert strict(to_json(float("nan"))) is None


@pytest.fixture(scope="module")
def reported_run(mini_run, tmp_path_factory):
    """The mini run through the stages whose reports hold not-computed cells: evaluate (blank metrics of
    approximate rows), compare-methods (recall of exact rows), a trained head (epoch 0 has no loss)."""
    run = copy_run(mini_run, tmp_path_factory.mktemp("strict") / "run")
    for argv in (["index", "--run", run, "--embeddings", "det", "--pca", "8"],
                 ["evaluate", "--run", run, "--embeddings", "full,det", "--index", "HNSW32", "--no-plots"],
                 ["compare-methods", "--run", run, "--embeddings", "det"],
                 ["detect", "--run", run, "--evaluate-only"]):
        assert main([str(a) for a in argv]) == 0, argv
    return run


def test_every_json_the_stages_write_is_strict(reported_run):
    files = sorted(p for p in reported_run.rglob("*.json") if p.is_file())
    assert any(p.name == "methods.json" for p in files) and any(p.name == "metrics.json" for p in files)
    bad = []
    for path in files:
        try:
            strict(path.read_text())
        except ValueError as e:
            bad.append(f"{path.relative_to(reported_run)}: {e}")
    assert not bad, bad
    methods = strict((reported_run / "reports" / "methods" / "methods.json").read_text())
    assert any(row["recall@10 vs exact"] is None for row in methods), "exact rows have no recall to report"


def test_search_json_is_strict(reported_run):
    out = subprocess.run([sys.executable, "-m", "cbir.cli", "search", "--run", str(reported_run), "--index", "det",
                          "--query-id", "1", "--k", "3", "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    doc = strict(out.stdout)
    assert doc["images"] and all(isinstance(r["similarity"], float) for r in doc["images"])
