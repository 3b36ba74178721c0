"""The real BIG-bench files (slow). Counts and split sizes are pinned so a changed split is noticed.

The test fetches into the user cache (as `iapt data fetch` does) what is not there yet: the 358 MB
archive streams from PyPI in about 10 s here, and only the four task files are kept.
"""

from __future__ import annotations

import pytest

from iapt.data import TASKS, fetch_tasks, get_task
from iapt.data import tasks as tasks_module

EXPECTED = {  # name: (rows in the file, {split: size})
    "sentiment": (8215, {"train": 6571, "dev": 822, "test": 822}),
    "nli": (54668, {"train": 43722, "dev": 5479, "test": 5467}),
    "squad": (10565, {"train": 8149, "dev": 1179, "test": 1237}),
    "e2e": (1000, {"train": 834, "dev": 22, "test": 22}),  # 213 MRs; train has one row per reference
}


def check_tasks() -> None:
    for name, (rows, sizes) in EXPECTED.items():
        task = get_task(name)
        splits = {s: task.load(s) for s in sizes}
        assert {s: len(v) for s, v in splits.items()} == sizes
        if name == "squad":
            articles = [{e.meta["article"] for e in v} for v in splits.values()]
            assert sum(map(len, articles)) == len(set().union(*articles)) == 48
        if name == "e2e":
            eval_refs = sum(len(e.references) for s in ("dev", "test") for e in splits[s])
            assert len(splits["train"]) + eval_refs == rows
        else:
            assert sum(len(v) for v in splits.values()) == rows


@pytest.mark.slow
def test_real_files_and_splits() -> None:
    """Fetches what is missing into the user cache once (the 358 MB archive from PyPI), then checks it."""
    missing = [name for name, task in TASKS.items() if not task.is_fetched()]
    if missing:
        fetch_tasks(missing, progress=False)
    tasks_module._splits.cache_clear()
    check_tasks()
