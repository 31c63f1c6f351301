"""A task's questions as training data: (prompt, solution) pairs, a text corpus for
pretraining and prompt/completion JSONL for SFT, written into a cache directory.

The solution of a pair is text the task's reward accepts (:class:`~esorl.tasks.registry.TaskCorrectness`
gives it 1.0): the compact answer (``compact``), the library's answer (``natural``
procedural tasks) or the worked solution ending in ``#### <answer>`` (``natural`` GSM8K).

Splits: the text corpus holds the task's *train* split only; the SFT pairs hold ``train``
(the train split) and ``dev`` (the test split, for the held-out completion NELBO; never
trained on). The train split leaves out the first ``test_size`` questions of the test split
(:func:`esorl.tasks.load_task`; for arithmetic, every question with the same expression up to
redundant brackets), so an evaluation on at most ``test_size`` test prompts of
the same seed (``esorl eval --seed``, GRPO's ``eval_prompts`` with ``grpo.seed``) is
held out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..io import write_if_changed
from .procedural import split_rule
from .registry import RENDERINGS, TASKS, load_task


def check_task_fields(where: str, task: str, rendering: str, size: int, test_size: int, source: str = "") -> None:
    """``ValueError`` naming ``<where>.task`` / ``<where>.task_*`` for values no task can take
    (before any work)."""
    if task not in TASKS:
        raise ValueError(f"{where}.task: unknown task {task!r}; choose from {', '.join(TASKS)}")
    if rendering not in RENDERINGS:
        raise ValueError(f"{where}.task_rendering must be one of {RENDERINGS}, got {rendering!r}")
    if task != "gsm8k" and size < 1:
        raise ValueError(f"{where}.task_size must be >= 1 for {task}, got {size}")
    if size < 0:
        raise ValueError(f"{where}.task_size must be >= 0 (0 = all of GSM8K), got {size}")
    if test_size < 1:
        raise ValueError(f"{where}.task_test_size must be >= 1, got {test_size}")
    if task != "gsm8k" and source not in ("", "synthetic"):
        raise ValueError(f"{where}.source {source!r} with {where}.task={task}: procedural tasks are generated, "
                         "only gsm8k reads a source (leave it at its default)")


def solution_text(task: str, row: dict, rendering: str = "compact") -> str:
    """The reference completion of a task row (a row of :func:`load_task`): what the task's
    reward accepts."""
    if task == "gsm8k" and rendering == "natural":
        return json.loads(row["entry"])["solution"].strip()
    return str(row["answer"])


def task_pairs(task: str, split: str = "train", size: int = 1000, seed: int = 0, rendering: str = "compact", test_size: int = 1000,
               source: str = "") -> list[tuple[str, str]]:
    """``(prompt, solution)`` pairs of a task split (see :func:`esorl.tasks.load_task`: the
    procedural train split has ``size`` questions, the test split ``test_size``)."""
    src = "" if source == "synthetic" else source
    if task == "gsm8k" and split == "test":
        size = test_size
    ds = load_task(task, split, size=size, seed=seed, rendering=rendering, test_size=test_size, source=src)
    return [(r["prompt"], solution_text(task, r, rendering)) for r in ds]




def task_cache_dir(cache_dir: str | Path, kind: str, task: str, rendering: str, size: int, seed: int, test_size: int, source: str = "") -> Path:
    """``<cache_dir>/task-<kind>-<task>-<rendering>-n<size>-s<seed>-t<test_size>[-<split rule>][-<hash of source>]``
    (the split rule where it is not the exact-text one, e.g. ``-ast``: a corpus split by
    another rule is another corpus, never a stale cache)."""
    src = "" if source == "synthetic" else source
    rule = split_rule(task)
    tail = ("" if rule == "text" else f"-{rule}") + (f"-{hashlib.sha256(src.encode()).hexdigest()[:8]}" if src else "")
    return Path(cache_dir) / f"task-{kind}-{task}-{rendering}-n{size}-s{seed}-t{test_size}{tail}"


def write_task_corpus(cache_dir: str | Path, task: str, rendering: str = "compact", size: int = 10000, seed: int = 0, test_size: int = 1000,
                      source: str = "") -> Path:
    """A pretraining corpus: ``train.jsonl`` with one ``{"text": prompt + " " + solution}`` per
    question of the task's train split. Generated once (the directory is named by the
    inputs); returns the directory."""
    out = task_cache_dir(cache_dir, "text", task, rendering, size, seed, test_size, source)
    path = out / "train.jsonl"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        pairs = task_pairs(task, "train", size, seed, rendering, test_size, source)
        write_if_changed(path, "".join(json.dumps({"text": f"{p} {s}"}) + "\n" for p, s in pairs))
    return out


def write_task_pairs(cache_dir: str | Path, task: str, rendering: str = "compact", size: int = 10000, seed: int = 0, test_size: int = 1000,
                     source: str = "") -> Path:
    """SFT pairs: ``train.jsonl`` (the train split) and ``dev.jsonl`` (the test split), one
    ``{"prompt", "completion"}`` per question. Generated once; returns the directory."""
    out = task_cache_dir(cache_dir, "pairs", task, rendering, size, seed, test_size, source)
    for name, split in (("train", "train"), ("dev", "test")):
        path = out / f"{name}.jsonl"
        if path.is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        pairs = task_pairs(task, split, size, seed, rendering, test_size, source)
        write_if_changed(path, "".join(json.dumps({"prompt": p, "completion": s}) + "\n" for p, s in pairs))
    return out


__all__ = ["check_task_fields", "solution_text", "task_pairs", "task_cache_dir", "write_task_corpus", "write_task_pairs"]
