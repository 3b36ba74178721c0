"""Built-in tasks on synthetic files in the real BIG-bench layouts (no download): splits, errors, fetch."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from iapt.data import TASKS, DataError, Example, TaskNotFetched, cache_dir, fetch_tasks, get_task, list_tasks
from iapt.data import tasks as tasks_module
from iapt.data.tasks import split_groups

from .conftest import synthetic_task_files


def all_splits(name: str) -> dict[str, list[Example]]:
    return {s: get_task(name).load(s) for s in ("train", "dev", "test")}


def test_registry() -> None:
    assert list_tasks() == ["e2e", "nli", "sentiment", "squad"]
    for name, task in TASKS.items():
        assert task.name == name and task.description and task.metrics and task.max_new_tokens > 0


def test_unknown_task_lists_known_ones() -> None:
    with pytest.raises(DataError, match=r"unknown task 'mnli'; known tasks: e2e, nli, sentiment, squad"):
        get_task("mnli")


def test_unfetched_task_says_how_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IAPT_CACHE", str(tmp_path))
    with pytest.raises(TaskNotFetched, match=r"iapt data fetch squad"):
        get_task("squad").load("train")


def test_unknown_split(task_cache: Path) -> None:
    with pytest.raises(DataError, match=r"unknown split 'validation'.*train, dev, test"):
        get_task("sentiment").load("validation")


def test_cache_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IAPT_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "iapt" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "iapt" / "data"
    monkeypatch.setenv("IAPT_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine" / "data"


# --- splits --------------------------------------------------------------------------------------


def test_split_assignment_is_pinned() -> None:
    # The split is a function of SHA-256 only; this pins it so that any change is deliberate.
    groups = {f"g{i}": [(f"g{i}", Example(f"p{i}", "r"))] for i in range(20)}
    splits = split_groups(groups)
    assert [e.prompt for e in splits["test"]] == ["p5", "p17"]
    assert [e.prompt for e in splits["dev"]] == ["p8", "p14"]
    assert len(splits["train"]) == 16


def test_split_fills_test_and_dev_to_ten_percent_with_whole_groups() -> None:
    groups = {f"g{i}": [(f"g{i}-{j}", Example(f"p{i}-{j}", "r")) for j in range(1 + i % 7)] for i in range(100)}
    splits = split_groups(groups)
    total = sum(len(v) for v in groups.values())
    assert sum(len(v) for v in splits.values()) == total
    for name in ("dev", "test"):
        assert 0.1 * total <= len(splits[name]) < 0.1 * total + 7  # overshoot by less than one group
        assert (
            len({e.prompt.split("-")[0] for e in splits[name]} & {e.prompt.split("-")[0] for e in splits["train"]}) == 0
        )


@pytest.mark.parametrize("name", ["sentiment", "nli", "squad"])
def test_splits_partition_the_rows(task_cache: Path, name: str) -> None:
    splits = all_splits(name)
    prompts = {s: [e.prompt for e in v] for s, v in splits.items()}
    every = [p for v in prompts.values() for p in v]
    assert len(every) == len(set(every))  # no row twice, no row in two splits
    total = {"sentiment": 200, "nli": sum(1 + p % 5 for p in range(60)), "squad": len(every)}[name]
    assert len(every) == total
    assert all(len(v) > 0 for v in splits.values())
    assert len(splits["train"]) > len(splits["dev"]) and len(splits["train"]) > len(splits["test"])


def test_splits_are_deterministic_within_and_across_processes(task_cache: Path) -> None:
    def digest() -> str:
        rows = {
            n: {s: [json.dumps(e.prompt) for e in get_task(n).load(s)] for s in ("train", "dev", "test")} for n in TASKS
        }
        return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()

    first = digest()
    tasks_module._splits.cache_clear()
    assert digest() == first
    code = (
        "import hashlib, json\nfrom iapt.data import TASKS, get_task\n"
        "splits = ('train', 'dev', 'test')\n"
        "rows = {n: {s: [json.dumps(e.prompt) for e in get_task(n).load(s)] for s in splits} for n in TASKS}\n"
        "print(hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest())"
    )
    # str hashing differs between this process (random seed) and the child; the split must not
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == first


def test_squad_is_split_by_article(task_cache: Path) -> None:
    splits = all_splits("squad")
    articles = {s: {e.meta["article"] for e in v} for s, v in splits.items()}
    assert not articles["train"] & articles["dev"]
    assert not articles["train"] & articles["test"]
    assert not articles["dev"] & articles["test"]
    assert set().union(*articles.values()) == {f"Article_{a}" for a in range(30)}
    ex = splits["train"][0]
    assert ex.references == tuple(dict.fromkeys(ex.references))  # duplicate gold answers removed
    assert len(ex.references) == 2 and ex.response == ex.references[0]
    assert ex.prompt.index("Passage:") < ex.prompt.index("Question:")  # question last: survives left truncation


def test_nli_keeps_a_wikipedia_page_in_one_split(task_cache: Path) -> None:
    pages = {s: {e.meta["page"] for e in v} for s, v in all_splits("nli").items()}
    assert (
        not (pages["train"] & pages["dev"])
        and not (pages["train"] & pages["test"])
        and not (pages["dev"] & pages["test"])
    )
    ex = get_task("nli").load("test")[0]
    assert ex.response in ("True", "False", "Neither") and ex.label == ex.response
    assert "Claim: Claim" in ex.prompt and ex.prompt.rstrip().endswith("does not settle it.")


def test_sentiment_labels(task_cache: Path) -> None:
    for ex in get_task("sentiment").load("train")[:20]:
        n = int(ex.prompt.split("Review number ")[1].split(".")[0])
        assert ex.label == ex.response == ("positive", "negative", "neutral", "ambivalent")[n % 4]


def test_e2e_references_and_expanded_train(task_cache: Path) -> None:
    splits = all_splits("e2e")
    mrs = {s: [e.meta["mr"] for e in v] for s, v in splits.items()}
    assert not set(mrs["train"]) & set(mrs["test"]) and not set(mrs["train"]) & set(mrs["dev"])
    assert len(mrs["test"]) == len(set(mrs["test"]))  # one evaluation row per meaning representation
    for ex in splits["test"]:
        m = int(ex.meta["mr"].split("Place ")[1].split(",")[0])
        assert sorted(ex.references) == [f"Place {m} serves Thai food, version {r}." for r in range(1 + m % 4)]
    # training learns from every reference: one row per (MR, reference)
    train_mrs = set(mrs["train"])
    assert len(splits["train"]) == sum(1 + int(mr.split("Place ")[1].split(",")[0]) % 4 for mr in train_mrs)
    assert {e.response for e in splits["train"]} == {r for e in splits["train"] for r in e.references}
    assert len(train_mrs) + len(mrs["dev"]) + len(mrs["test"]) == 50


def test_limit_is_a_fixed_prefix(task_cache: Path) -> None:
    task = get_task("squad")
    assert task.load("test", limit=3) == task.load("test")[:3]


def test_score_uses_what_each_task_needs(task_cache: Path) -> None:
    sentiment = get_task("sentiment").load("test")[:4]
    preds = [sentiment[0].label, sentiment[1].label + ".", "no idea", sentiment[3].label.upper()]
    assert get_task("sentiment").score(preds, sentiment) == {"accuracy": 75.0}
    squad = get_task("squad").load("test")[:2]
    scores = get_task("squad").score([squad[0].references[-1], "nothing"], squad)
    assert scores == {"exact_match": 50.0, "f1": 50.0}
    e2e = get_task("e2e").load("test")[:2]
    scores = get_task("e2e").score([e.references[-1] for e in e2e], e2e)
    assert scores["bleu"] == pytest.approx(100.0) and scores["rougeL"] == pytest.approx(100.0)


# --- fetching from an archive --------------------------------------------------------------------


def make_sdist(path: Path, files: dict[str, object], extra: dict[str, bytes] | None = None) -> dict[str, str]:
    """A bigbench-1.0.0.tar.gz look-alike; returns the SHA-256 of each task file."""
    hashes = {}
    with tarfile.open(path, "w:gz") as tar:
        members = {f"bigbench/benchmark_tasks/{rel}": json.dumps(data).encode() for rel, data in files.items()}
        members.update(extra or {})
        for name, content in members.items():
            info = tarfile.TarInfo(f"bigbench-1.0.0/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
            if name.startswith("bigbench/benchmark_tasks/"):
                hashes[name.removeprefix("bigbench/benchmark_tasks/")] = hashlib.sha256(content).hexdigest()
    return hashes


def test_fetch_extracts_only_the_task_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IAPT_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    hashes = make_sdist(
        sdist,
        synthetic_task_files(),
        extra={"bigbench/benchmark_tasks/other/task.json": b"{}", "setup.py": b"raise SystemExit"},
    )
    monkeypatch.setattr(tasks_module, "FILE_SHA256", hashes)
    paths = fetch_tasks(["squad", "e2e"], progress=False, source=str(sdist))
    root = tmp_path / "cache" / "data" / "bigbench-1.0.0"
    assert paths == {"squad": root / "squad_shifts/squaddev_v1.1.json", "e2e": root / "gem/e2e_nlg/task.json"}
    written = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written == ["gem/e2e_nlg/task.json", "squad_shifts/squaddev_v1.1.json"]  # no temp files, nothing else
    assert len(get_task("e2e").load("test")) > 0
    # everything present: the source is never opened again, so a missing archive does not matter
    assert fetch_tasks(["squad", "e2e"], progress=False, source=str(tmp_path / "gone.tar.gz")) == paths
    assert set(fetch_tasks(progress=False, source=str(sdist))) == set(TASKS)


def test_fetch_rejects_a_file_that_does_not_match_its_pin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IAPT_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    make_sdist(sdist, synthetic_task_files())  # synthetic content: the real pins do not match
    with pytest.raises(DataError, match="does not match its pinned SHA-256"):
        fetch_tasks(["sentiment"], progress=False, source=str(sdist))
    assert not get_task("sentiment").is_fetched()


def test_fetch_reports_missing_files_and_missing_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IAPT_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / "partial.tar.gz"
    make_sdist(sdist, {"gem/e2e_nlg/task.json": {"examples": []}})
    monkeypatch.setattr(tasks_module, "FILE_SHA256", {})
    with pytest.raises(DataError, match=r"lacks squad_shifts/squaddev_v1.1.json"):
        fetch_tasks(["squad"], progress=False, source=str(sdist))
    with pytest.raises(DataError, match="not found"):
        fetch_tasks(["squad"], progress=False, source=str(tmp_path / "nope.tar.gz"))
    monkeypatch.setenv("IAPT_BIGBENCH_SDIST", str(tmp_path / "nope.tar.gz"))
    with pytest.raises(DataError, match="IAPT_BIGBENCH_SDIST"):
        fetch_tasks(["squad"], progress=False)
