import os
import re
import subprocess
import sys
import tomllib

import pandas as pd
import pytest

from cbir.cli import build_parser, main
from conftest import MINI, MINI_SPLIT, MOBILENET, REPO

COMMANDS = ["prepare", "eda", "detect", "embed", "index", "search", "evaluate", "evaluate-objects", "compare-methods", "train-embedder", "train-detector", "train-text", "evaluate-text", "ui", "run", "download-cub", "status", "sync", "serve"]


def test_every_command_has_useful_help(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert len(text) > 300 and "--" in text, name
    with pytest.raises(SystemExit) as e:
        main(["index", "--run", "r", "--pca", "abc"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cbir index: error: argument --pca:") and "usage" not in err


def test_every_flag_with_a_default_shows_it_in_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.default not in (None, False, "==SUPPRESS==") and action.help:
                assert "default" in command._get_formatter()._expand_help(action), (name, action.option_strings)


def test_python_dash_m_cbir_is_the_cbir_command():
    out = subprocess.run([sys.executable, "-m", "cbir", "--version"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.startswith("cbir ")


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cbir.cli", "prepare", "--cub", str(tmp_path), "--out",
                          str(tmp_path / "r")], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "images.txt: missing" in out.stderr


def _runtime_names(requirements):
    return {re.split(r"[<>=\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_environment_yml_names_the_same_runtime_packages():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = _runtime_names(project["dependencies"])
    conda = {"pytorch": "torch", "faiss-gpu": "faiss-cpu", "faiss-cpu": "faiss-cpu", "python": None, "pip": None,
             "pytorch-cuda": None}
    names = set()
    text = (REPO / "environment.yml").read_text()
    for line in text[text.index("dependencies:"):].splitlines():
        m = re.match(r"\s+- ([A-Za-z0-9_.\-]+)", line)
        if m and not line.strip().endswith(":"):
            name = m.group(1).lower()
            names.add(conda.get(name, name))
    names.discard(None)
    assert names == runtime


def test_run_end_to_end_on_the_mini_sample_then_resumes_as_noop(tmp_path):
    run = tmp_path / "run"
    args = ["run", "--cub", str(MINI), "--out", str(run), "--split", MINI_SPLIT, "--detections",
            str(MINI / "external_detections.json"), "--backbone", "mobilenet_v2", "--weights", str(MOBILENET),
            "--workers", "0", "--pca", "8"]
    assert main(args) == 0
    metrics = pd.read_csv(run / "reports" / "retrieval" / "metrics.csv")
    assert set(metrics.embeddings) == {"full", "gt", "det", "full+det"}
    assert set(metrics.reduction) == {"refit", "served:det"}
    for path in ("dataset/images.parquet", "dataset/gt_coco.json", "eda/report.md", "detections/detections.json",
                 "reports/detection/detection.md", "embeddings/det/vectors.npy", "index/det/index.faiss",
                 "reports/retrieval/comparison.md", "reports/retrieval/pr_curves.png", "manifest.json"):
        assert (run / path).exists(), path
    version = (run / "embeddings" / "det").resolve()
    assert main(args) == 0
    assert (run / "embeddings" / "det").resolve() == version  # fresh: not redone


def test_run_without_weights_offline_stops_with_the_how_to(tmp_path):
    env = {**os.environ, "CBIR_WEIGHTS_DIR": str(tmp_path / "none"), "TORCH_HOME": str(tmp_path / "hub"),
           "CBIR_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "cbir.cli", "run", "--cub", str(MINI), "--out", str(tmp_path / "r"),
                          "--split", MINI_SPLIT, "--workers", "0"], capture_output=True, text=True, env=env)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert "fasterrcnn_resnet50_fpn_coco" in last and "CBIR_WEIGHTS_DIR" in last and "Traceback" not in out.stderr
    assert (tmp_path / "r" / "dataset" / "images.parquet").exists()  # the work done before the stop is kept
