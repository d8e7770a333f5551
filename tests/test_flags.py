"""Every flag of every command, given a value that is not a value, stops before any work: exit 2, one line
on stderr naming the flag, nothing written. The walk reads the parser itself, so a new flag without a
bad-value rule here fails `test_every_flag_has_a_rule`.

The stage functions are replaced by a tripwire: a value the checks let through reaches one and the case
fails with "reached work", instead of running (or serving) for real."""

from __future__ import annotations

import argparse
import importlib

import pytest
from conftest import MINI, MINI_SPLIT, MOBILENET

from cbir.cli import build_parser, main

EMPTY = ""
# extra bad values per flag (besides the empty value every flag gets, and the type and range cases every
# number gets from its own bounds)
MALFORMED = {
    "--split": ["nope", "classes:1-x/3", "random:abc"],
    "--splits": ["train,nope", ","], "--gallery": ["valid"],
    "--modes": ["full,xyz", ","], "--maps": ["pca,nope"],
    "--min-size": ["-5", "big", "10"], "--gpu": ["gpu0", "-1"],
    "--name": ["a/b", ".hidden", "x" * 65], "--index": ["a/b"], "--embeddings": ["a/b", ",,"],
    "--served": ["a/b"], "--models": ["a/b", ","], "--categories": ["a/b", ","],
    "--remove": ["a,b", "1,,2"], "--filter": ["split ==", "colour == 'red'", "(split == 'test'"],
    "--url": ["ftp://x/y", "not a url"], "--md5": ["abc", "g" * 32], "--auth": ["nocolon", ":pass", "user:"],
    "--detector": ["onnx:"], "--store": ["mongo://x"], "--device": ["gpu"], "--pca": ["-3", "many", ","],
    "--whiten": ["2", "x"], "--factory": ["a/b", "IVF,"], "--rerank": ["nope"], "--attributes": ["x", "7-x", "7-3", "0"],
    "--index-mode": ["xyz"], "--class-labels": ["no-such-labels.csv"],
    "--query-id": ["-1", "x"], "--server": ["ftp://x/y", "not a url", "http://"],
    "--memory-budget": ["4X", "-1G", "0", "G"],
    "--engine": ["ray:", "ray:host", "ray:host:0", "spark", "local:1.2.3.4:5"],
}
# flags whose empty value is the documented default ("no extra names")
EMPTY_ALLOWED = {"--served"}
PLAIN_TEXT = {"--weights", "--detector-weights", "--trunk-weights", "--labels", "--detections", "--backbone",
              "--text", "--host", "--head", "--category", "--cub", "--coco", "--images",
              "--captions", "--out", "--run", "--add", "--image", "--train-embedder", "--photos", "--boxes",
              "--key", "--keys", "--cors", "--openapi"}


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def value_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.nargs != 0
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def bad_values(action: argparse.Action) -> list[str]:
    """The values this flag must refuse: empty, its malformed spellings, and for numbers a wrong type,
    below its floor, above its ceiling, and NaN for floats."""
    flag = action.option_strings[0]
    values = [] if flag in EMPTY_ALLOWED else [EMPTY]
    values += MALFORMED.get(flag, [])
    if action.choices is not None:
        values.append("not-a-choice")
    low, high = getattr(action.type, "low", None), getattr(action.type, "high", None)
    if hasattr(action.type, "low"):
        values.append("abc")
        if low is not None:
            values.append(str(low - 1))
        if high is not None:
            values.append(str(high * 10 + 1))
        if isinstance(low, float) or isinstance(high, float):
            values.append("nan")
    return values


def test_every_flag_has_a_rule():
    """A flag that takes a value either refuses typed or malformed values (a number type, choices, a rule
    above) or is plain text whose only wrong value is an empty one (then listed in PLAIN_TEXT)."""
    loose = sorted({a.option_strings[0] for p in commands().values() for a in value_flags(p)
                    if not (hasattr(a.type, "low") or a.choices is not None or a.option_strings[0] in MALFORMED
                            or a.option_strings[0] in PLAIN_TEXT)})
    assert not loose, f"flags with no bad-value rule in tests/test_flags.py: {loose}"


class ReachedWork(Exception):
    pass


@pytest.fixture
def tripwire(monkeypatch):
    """Every stage function the commands call, replaced by one that fails the case."""
    def trip(*args, **kwargs):
        raise ReachedWork("reached work")

    targets = ["cbir.datasets.prepare.prepare", "cbir.metrics.eda.eda", "cbir.datasets.download.download_cub",
                   "cbir.status.run_status", "cbir.detection.stage.detect", "cbir.detection.report.write_detection_report",
                   "cbir.detection.training.train_detector", "cbir.encoders.stage.embed", "cbir.training.stage.apply_model",
                   "cbir.retrieval.index.build_index", "cbir.retrieval.ingest.add_photos",
                   "cbir.retrieval.ingest.remove_images", "cbir.retrieval.query.Querier",
                   "cbir.evaluation.retrieval.evaluate", "cbir.evaluation.objects.evaluate_objects",
                   "cbir.evaluation.methods.compare_methods", "cbir.evaluation.text.evaluate_text",
                   "cbir.training.stage.train_embedder", "cbir.training.bridge.train_text", "cbir.pipeline.run_all",
                   "cbir.pipeline.sync",
                   "cbir.ui.app.serve", "cbir.service.app.serve", "cbir.service.client.ServiceClient"]
    for target in targets:  # every module imported before any is patched: none may bind a tripwire for good
        importlib.import_module(target.rsplit(".", 1)[0])
    for target in targets:
        monkeypatch.setattr(target, trip)


def base_argv(command: str, run, tmp) -> list[str]:
    """A call of `command` that is valid but for the flag under test."""
    out = str(tmp / "new-run")
    cub = ["--cub", str(MINI), "--split", MINI_SPLIT]
    return {
        "prepare": [*cub, "--out", out],
        "run": [*cub, "--out", out, "--detections", str(MINI / "external_detections.json"), "--backbone",
                "mobilenet_v2", "--weights", str(MOBILENET), "--modes", "full,det"],
        "download-cub": ["--out", out],
        "search": ["--run", str(run), "--index", "det", "--query-id", "1"],
        "index": ["--run", str(run), "--embeddings", "det"],
    }.get(command, ["--run", str(run)])


def with_value(argv: list[str], flag: str, value: str) -> list[str]:
    """`argv` with `flag` set to `value` (replacing its value there, and a group partner it excludes)."""
    partners = {"--cub": "--coco", "--coco": "--cub", "--photos": "--cub", "--image": "--query-id",
                "--query-id": "--image"}
    out, skip = [], 0
    for i, word in enumerate(argv):
        if skip:
            skip -= 1
            continue
        if word in (flag, partners.get(flag)):
            skip = 1
            continue
        out.append(word)
    return [*out, flag, value]


CASES = [(command, action.option_strings[0], value) for command, parser in commands().items()
         for action in value_flags(parser) for value in bad_values(action)]


def snapshot(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.lstat().st_size for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize(("command", "flag", "value"), CASES, ids=[f"{c} {f} {v!r}" for c, f, v in CASES])
def test_a_bad_flag_value_stops_before_any_work(command, flag, value, mini_run, tmp_path, capsys, tripwire):
    before = snapshot(mini_run)
    argv = [command, *with_value(base_argv(command, mini_run, tmp_path), flag, value)]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    except ReachedWork:
        pytest.fail(f"`cbir {' '.join(argv)}` accepted {flag} {value!r} and started work")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, f"exit {code}: {err}"
    assert len(err) == 1 and flag in err[0], f"want one line naming {flag}, got {err}"
    assert "Traceback" not in err[0]
    assert not (tmp_path / "new-run").exists(), "a refused call created its output folder"
    assert snapshot(mini_run) == before, "a refused call changed the run"


def test_the_walk_covers_every_command():
    covered = {c for c, _, _ in CASES}
    assert covered == set(commands()), f"commands with no bad-value case: {set(commands()) - covered}"
    assert len(CASES) > 300
