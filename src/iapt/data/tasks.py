"""Built-in benchmark tasks, taken from the BIG-bench 1.0.0 source distribution on PyPI.

``fetch_tasks()`` (CLI: ``iapt data fetch``) downloads ``bigbench-1.0.0.tar.gz`` (358 MB) once,
streams through it and keeps only the four task files (~40 MB), each checked against a pinned
SHA-256 and written atomically under ``<cache>/data/bigbench-1.0.0/``, where ``<cache>`` is
``$IAPT_CACHE``, else ``$XDG_CACHE_HOME/iapt``, else ``~/.cache/iapt``. After that nothing touches
the network. (``pip download`` cannot fetch this sdist: pip rejects its ``bleurt @ file://``
dependency while preparing metadata, so the archive is read directly; set ``IAPT_BIGBENCH_SDIST``
to a local copy of the archive, or to a mirror URL, on machines without access to PyPI.)

Splits are fixed and identical on every machine: whole groups (a review, a Wikipedia page for
VitaminC, an article for SQuAD, a meaning representation for E2E) are ordered by the SHA-256 of
``SPLIT_SEED`` + group key and dealt out to test until it holds >= 10% of the examples, then to dev
until it holds >= 10%, and the rest to train. Related rows never straddle two splits. Within a
split, rows are ordered by the same kind of hash, so ``load(split, limit=n)`` is a fixed random
sample.

Prompts put the passage first and the question/instruction last, because over-long prompts are
truncated from the left (see :mod:`iapt.data.collate`): what gets cut is the start of the
passage, never the question.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import metrics as metric_fns
from .examples import DataError, Example

BIGBENCH_VERSION = "1.0.0"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
    "bigbench-1.0.0.tar.gz"
)
SDIST_ENV = "IAPT_BIGBENCH_SDIST"
SPLITS = ("train", "dev", "test")
SPLIT_SEED = "iapt-split-v1"
DEV_FRACTION = 0.1
TEST_FRACTION = 0.1

# SHA-256 of each extracted task file, so every machine trains and tests on identical data.
FILE_SHA256 = {
    "multiemo/all_text_en/task.json": "cf46f411f08564313750696d5bf060d35a012decbdc02d43dfb349804a673bb9",
    "vitaminc_fact_verification/task.json": "10f83da50374701fc7ce69162a7a167b14e1a86351201aa8bf14b56fa0a3214f",
    "squad_shifts/squaddev_v1.1.json": "45089eff3cf52004b1dca6814cde5c57082fdb09872f18c79a5d944d45be523a",
    "gem/e2e_nlg/task.json": "9e80fbbf1bca5d4c8cdc6d264c0137efda5bcd2ecb2f5a47ea6552cc93531329",
}

Groups = dict[str, list[tuple[str, Example]]]  # group key -> [(row key, example)]


class TaskNotFetched(DataError):
    """The task's data file is not in the cache yet."""


def cache_dir() -> Path:
    """Where task files live: ``$IAPT_CACHE/data``, ``$XDG_CACHE_HOME/iapt/data`` or ``~/.cache/iapt/data``."""
    if os.environ.get("IAPT_CACHE"):
        root = Path(os.environ["IAPT_CACHE"])
    elif os.environ.get("XDG_CACHE_HOME"):
        root = Path(os.environ["XDG_CACHE_HOME"]) / "iapt"
    else:
        root = Path.home() / ".cache" / "iapt"
    return root.expanduser() / "data"


def _stable_hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join((SPLIT_SEED, *parts)).encode("utf-8")).hexdigest()


def split_groups(groups: Groups) -> dict[str, list[Example]]:
    """Deal whole groups to test/dev/train in stable hash order (see the module docstring)."""
    total = sum(len(rows) for rows in groups.values())
    targets = {"test": TEST_FRACTION * total, "dev": DEV_FRACTION * total}
    assigned: dict[str, list[tuple[str, Example]]] = {s: [] for s in SPLITS}
    for key in sorted(groups, key=_stable_hash):
        split = next((name for name, target in targets.items() if len(assigned[name]) < target), "train")
        assigned[split].extend(groups[key])
    return {s: [ex for _, ex in sorted(rows, key=lambda r: _stable_hash(r[0]))] for s, rows in assigned.items()}


# --- parsers: raw task file -> groups -------------------------------------------------------------


def _bigbench_examples(data: Any, source: str) -> list[dict[str, Any]]:
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise DataError(f"{source}: expected a BIG-bench task.json with an 'examples' list")
    return data["examples"]


def _gold_label(row: dict[str, Any], source: str) -> str:
    scores = row.get("target_scores") or {}
    gold = [label for label, score in scores.items() if score == 1]
    if len(gold) != 1:
        raise DataError(f"{source}: expected exactly one target_scores entry equal to 1, got {scores}")
    return gold[0]


def _parse_sentiment(data: Any, source: str) -> Groups:
    groups: Groups = {}
    for row in _bigbench_examples(data, source):
        text = row["input"].strip()
        label = _gold_label(row, source)
        prompt = (
            f"Review: {text}\n\n"
            "Is the sentiment of this review positive, negative, neutral or ambivalent? Answer with one word."
        )
        groups[text] = [(text, Example(prompt=prompt, response=label, label=label))]
    return groups


def _parse_nli(data: Any, source: str) -> Groups:
    groups: Groups = {}
    for row in _bigbench_examples(data, source):
        evidence, sep, claim = row["input"].rpartition("\nClaim: ")
        if not sep:
            raise DataError(f"{source}: VitaminC input without a 'Claim:' line: {row['input'][:80]!r}")
        label = _gold_label(row, source)
        prompt = (
            f"Passage: {evidence.strip()}\nClaim: {claim.strip()}\n\n"
            "Based only on the passage, is the claim True, False, or Neither? "
            "Answer Neither if the passage does not settle it."
        )
        page = evidence.split(":", 1)[0]  # the Wikipedia page: its contrastive rows stay together
        groups.setdefault(page, []).append(
            (row["input"], Example(prompt=prompt, response=label, label=label, meta={"page": page}))
        )
    return groups


def _parse_squad(data: Any, source: str) -> Groups:
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{source}: expected SQuAD v1.1 JSON with a 'data' list of articles")
    groups: Groups = {}
    for article in data["data"]:
        title = article["title"]
        rows = groups.setdefault(title, [])
        for paragraph in article["paragraphs"]:
            context = paragraph["context"].strip()
            for qa in paragraph["qas"]:
                answers = list(dict.fromkeys(a["text"].strip() for a in qa["answers"] if a["text"].strip()))
                if not answers:
                    continue
                prompt = (
                    f"Title: {title.replace('_', ' ')}\nPassage: {context}\n\n"
                    f"Question: {qa['question'].strip()}\n"
                    "Answer with a short span copied from the passage."
                )
                example = Example(
                    prompt=prompt,
                    response=answers[0],
                    references=tuple(answers),
                    meta={"article": title, "id": qa["id"]},
                )
                rows.append((qa["id"], example))
    return groups


def _parse_e2e(data: Any, source: str) -> Groups:
    references: dict[str, list[str]] = {}
    for row in _bigbench_examples(data, source):
        targets = row["target"] if isinstance(row["target"], list) else [row["target"]]
        references.setdefault(row["input"].strip(), []).extend(t.strip() for t in targets)
    groups: Groups = {}
    for mr, refs in references.items():
        prompt = f"Attributes: {mr}\n\nDescribe this restaurant in one or two sentences, mentioning every attribute."
        groups[mr] = [(mr, Example(prompt=prompt, response=refs[0], references=tuple(refs), meta={"mr": mr}))]
    return groups


def _one_row_per_reference(examples: list[Example]) -> list[Example]:
    """E2E training: learn from every human reference, not only the first."""
    return [
        Example(prompt=ex.prompt, response=ref, references=ex.references, meta=ex.meta)
        for ex in examples
        for ref in ex.references
    ]


# --- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A built-in task: where its data lives, how to split it, how to score generations."""

    name: str
    description: str
    metrics: tuple[str, ...]
    source: str  # the file inside bigbench/benchmark_tasks/
    max_new_tokens: int  # enough for any reference answer
    parse: Callable[[Any, str], Groups] = field(repr=False)
    labels: tuple[str, ...] = ()  # classification tasks: the answer words
    expand_train: Callable[[list[Example]], list[Example]] | None = field(default=None, repr=False)

    def path(self, root: Path | None = None) -> Path:
        return (root or cache_dir()) / f"bigbench-{BIGBENCH_VERSION}" / self.source

    def is_fetched(self, root: Path | None = None) -> bool:
        return self.path(root).is_file()

    def load(self, split: str, *, limit: int | None = None, root: Path | None = None) -> list[Example]:
        """The examples of ``split`` (train/dev/test), optionally only the first ``limit`` of them."""
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r} for task {self.name!r}; choose one of {', '.join(SPLITS)}")
        path = self.path(root)
        if not path.is_file():
            raise TaskNotFetched(
                f"task {self.name!r} is not downloaded yet (expected {path}); run `iapt data fetch {self.name}` "
                "once (or iapt.data.fetch_tasks()); it reads the BIG-bench 1.0.0 archive from PyPI"
            )
        examples = list(_splits(self.name, str(path), path.stat().st_mtime_ns)[split])
        return examples[:limit] if limit is not None else examples

    def score(self, predictions: Sequence[str], examples: Sequence[Example]) -> dict[str, float]:
        """Score generated answers against the examples they answer; every value is a percentage."""
        if self.labels:
            return {
                "accuracy": metric_fns.accuracy(predictions, [ex.label or ex.response for ex in examples], self.labels)
            }
        references = [list(ex.references) for ex in examples]
        if "exact_match" in self.metrics:
            return metric_fns.squad_scores(predictions, references)
        return {"bleu": metric_fns.bleu(predictions, references), "rougeL": metric_fns.rouge_l(predictions, references)}

    def score_each(self, predictions: Sequence[str], examples: Sequence[Example]) -> list[float]:
        """The primary metric of every answer alone (percent), whose mean is ``score``'s: what paired bootstrap
        intervals between methods resample. Accuracy: 0 or 100; squad: F1; e2e: ROUGE-L."""
        if self.labels:
            return [
                100.0 * (metric_fns.match_label(p, self.labels) == (ex.label or ex.response))
                for p, ex in zip(predictions, examples, strict=True)
            ]
        references = [list(ex.references) for ex in examples]
        if "exact_match" in self.metrics:
            return [100.0 * metric_fns.squad_f1(p, refs) for p, refs in zip(predictions, references, strict=True)]
        return metric_fns.rouge_l_each(predictions, references)


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(
            name="sentiment",
            description="MultiEmo (BIG-bench multiemo/all_text_en): 4-way sentiment of English reviews",
            metrics=("accuracy",),
            source="multiemo/all_text_en/task.json",
            max_new_tokens=8,
            parse=_parse_sentiment,
            labels=("positive", "negative", "neutral", "ambivalent"),
        ),
        Task(
            name="nli",
            description="VitaminC fact verification: is a claim True, False or Neither given a Wikipedia passage",
            metrics=("accuracy",),
            source="vitaminc_fact_verification/task.json",
            max_new_tokens=8,
            parse=_parse_nli,
            labels=("True", "False", "Neither"),
        ),
        Task(
            name="squad",
            description="SQuAD v1.1 dev (BIG-bench squad_shifts): extractive QA, split by article",
            metrics=("exact_match", "f1"),
            source="squad_shifts/squaddev_v1.1.json",
            max_new_tokens=32,
            parse=_parse_squad,
        ),
        Task(
            name="e2e",
            description="E2E NLG (BIG-bench gem/e2e_nlg): restaurant attributes to text, multi-reference",
            metrics=("bleu", "rougeL"),
            source="gem/e2e_nlg/task.json",
            max_new_tokens=96,
            parse=_parse_e2e,
            expand_train=_one_row_per_reference,
        ),
    ]
}


def list_tasks() -> list[str]:
    return sorted(TASKS)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None


@functools.lru_cache(maxsize=8)
def _splits(name: str, path: str, mtime_ns: int) -> dict[str, tuple[Example, ...]]:
    task = TASKS[name]
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(
            f"{path}: cannot read task {name!r} ({e}); delete it and run `iapt data fetch {name}`"
        ) from None
    splits = split_groups(task.parse(data, path))
    if task.expand_train:
        splits["train"] = task.expand_train(splits["train"])
    return {split: tuple(examples) for split, examples in splits.items()}


# --- fetching -------------------------------------------------------------------------------------


def fetch_tasks(
    names: Iterable[str] | None = None,
    progress: bool = True,
    *,
    root: Path | None = None,
    source: str | None = None,
) -> dict[str, Path]:
    """Make sure the tasks' files are in the cache, downloading the BIG-bench archive only if needed.

    ``source`` (or ``$IAPT_BIGBENCH_SDIST``) may be a local ``bigbench-1.0.0.tar.gz`` or a URL;
    default: the PyPI file. Returns task name -> data file path.
    """
    tasks = [get_task(n) for n in names] if names is not None else [TASKS[n] for n in list_tasks()]
    root = root or cache_dir()
    missing = {t.source for t in tasks if not t.is_fetched(root)}
    if missing:
        _extract(
            missing, root / f"bigbench-{BIGBENCH_VERSION}", source or os.environ.get(SDIST_ENV) or SDIST_URL, progress
        )
    return {t.name: t.path(root) for t in tasks}


class _CountingReader:
    """File-like wrapper that advances a progress bar as the archive is read."""

    def __init__(self, raw: Any, bar: Any) -> None:
        self.raw, self.bar = raw, bar

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        if self.bar is not None:
            self.bar.update(len(chunk))
        return chunk


def _open_source(source: str) -> tuple[Any, int | None]:
    if "://" not in source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"BIG-bench archive {path} not found (from {SDIST_ENV} or source=)")
        return path.open("rb"), path.stat().st_size
    try:
        response = urllib.request.urlopen(source, timeout=60)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(
            f"could not download {source}: {e}. Download bigbench-{BIGBENCH_VERSION}.tar.gz from PyPI another way "
            f"and set {SDIST_ENV}=/path/to/bigbench-{BIGBENCH_VERSION}.tar.gz"
        ) from None
    length = response.headers.get("Content-Length")
    return response, int(length) if length else None


def _extract(wanted: set[str], dest: Path, source: str, progress: bool) -> None:
    """Stream the archive once, writing each wanted task file atomically; stop when all are found."""
    from tqdm.auto import tqdm

    prefix = "bigbench/benchmark_tasks/"
    raw, total = _open_source(source)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"bigbench-{BIGBENCH_VERSION}.tar.gz") if progress else None
    remaining = set(wanted)
    try:
        # typeshed's fileobj protocol is that of every mode; a stream ("r|gz") only reads
        with (
            raw,
            tarfile.open(
                fileobj=_CountingReader(raw, bar),  # type: ignore[call-overload]
                mode="r|gz",
            ) as archive,
        ):
            for member in archive:
                inner = member.name.split("/", 1)[-1]  # drop the "bigbench-1.0.0/" top folder
                rel = inner[len(prefix) :] if inner.startswith(prefix) else None
                if rel not in remaining or not member.isfile():
                    continue
                content = archive.extractfile(member).read()
                expected = FILE_SHA256.get(rel)
                if expected and hashlib.sha256(content).hexdigest() != expected:
                    raise DataError(
                        f"{rel} in {source} does not match its pinned SHA-256; "
                        f"the archive is not bigbench {BIGBENCH_VERSION}"
                    )
                _write_atomic(dest / rel, content)
                remaining.discard(rel)
                if not remaining:
                    break
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"could not read the BIG-bench archive from {source}: {e}") from None
    finally:
        if bar is not None:
            bar.close()
    if remaining:
        raise DataError(f"{source} lacks {', '.join(sorted(remaining))}; is it bigbench {BIGBENCH_VERSION}?")


def _write_atomic(path: Path, content: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(content)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
