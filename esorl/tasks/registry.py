"""The task registry: name → dataset builder and reward functions."""

from __future__ import annotations

import json
import re
from pathlib import Path

from . import gsm8k as _gsm8k
from . import procedural as _proc

TASKS = ("countdown", "mini_sudoku", "basic_arithmetic", "basic_arithmetic_1d", "gsm8k")
RENDERINGS = ("natural", "compact")
#: what ``source`` means for GSM8K by default: the hub dataset (``openai/gsm8k``, config main)
GSM8K_HUB = "openai/gsm8k"


def _split_seed(seed: int, split: str) -> int:
    return seed * 1_000_003 + {"train": 1, "test": 2}[split]


def load_task(name: str, split: str = "train", size: int = 1000, seed: int = 0, rendering: str = "compact", test_size: int = 200,
              source: str = ""):
    """A ``datasets.Dataset`` with columns ``prompt``, ``answer``, ``entry`` (the library's
    record as JSON), ``task`` and ``rendering``.

    Procedural tasks: ``split`` ``train`` (``size`` rows) or ``test`` (``test_size`` rows),
    drawn with different seeds; a training question that also appears in the test split is
    dropped, so the splits never overlap. "Appears" is the task's split rule
    (:func:`esorl.tasks.procedural.split_key`): the same compact prompt, or for arithmetic
    (``basic_arithmetic``, ``basic_arithmetic_1d``) the same expression up to redundant
    brackets (the same canonical form, :func:`~esorl.tasks.procedural.canonical_expression`). GSM8K: ``source`` is a local directory with
    ``train.jsonl``/``test.jsonl`` or a hub name (default ``openai/gsm8k``); ``size`` caps
    the rows (0 = all). Raises ``ValueError`` for an unknown task, split or rendering."""
    import datasets

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if rendering not in RENDERINGS:
        raise ValueError(f"task rendering must be one of {RENDERINGS}, got {rendering!r}")
    if split not in ("train", "test"):
        raise ValueError(f"task split must be train or test, got {split!r}")
    if name == "gsm8k":
        return _load_gsm8k(split, size, source, rendering)
    test = _proc.generate(name, test_size, _split_seed(seed, "test"))
    if split == "test":
        recs = test
    else:
        held = {_proc.split_key(name, e) for e in test}
        n_gen = size + len(held)
        for _ in range(8):  # small question spaces collide often: draw more until `size` remain
            recs = [e for e in _proc.generate(name, n_gen, _split_seed(seed, "train")) if _proc.split_key(name, e) not in held][:size]
            if len(recs) == size:
                break
            n_gen *= 2
        else:
            raise ValueError(f"task {name}: only {len(recs)} training questions outside the test split (asked for {size})")
    rows = {"prompt": [], "answer": [], "entry": [], "task": [], "rendering": []}
    for e in recs:
        rows["prompt"].append(e["question"] if rendering == "natural" else _proc.compact_prompt(name, e))
        rows["answer"].append(str(e["answer"]) if rendering == "natural" else _proc.compact_answer(name, e))
        rows["entry"].append(json.dumps(e, default=str))
        rows["task"].append(name)
        rows["rendering"].append(rendering)
    return datasets.Dataset.from_dict(rows)


def _load_gsm8k(split: str, size: int, source: str, rendering: str):
    import datasets

    from esorl.data import load_prompt_completion_dataset

    src = source or GSM8K_HUB
    if Path(src).exists():
        ds = load_prompt_completion_dataset(src, split=split, prompt_field="question", completion_field="answer")
    else:
        ds = datasets.load_dataset(src, "main", split=split)
    if size:
        ds = ds.select(range(min(size, len(ds))))
    q, a = ds["question"], ds["answer"]
    template = "Question: {q}\nAnswer:" if rendering == "natural" else "{q} ="
    return datasets.Dataset.from_dict({
        "prompt": [template.format(q=x) for x in q], "answer": [_gsm8k.gold_answer(x) for x in a],
        "entry": [json.dumps({"question": x, "solution": y}) for x, y in zip(q, a)], "task": ["gsm8k"] * len(q), "rendering": [rendering] * len(q)})


class TaskCorrectness:
    """1.0 for a completion the task's checker accepts, 0.0 otherwise (empty or malformed
    completions included). TRL's contract; reads the ``entry`` (procedural) or ``answer``
    (GSM8K) column of each row."""

    def __init__(self, task: str, rendering: str = "compact"):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        self.task, self.rendering = task, rendering
        self.__name__ = f"{task}_correct"

    def __call__(self, prompts, completions, entry=None, answer=None, **kwargs) -> list[float]:
        from reward_models import completion_text

        texts = [completion_text(c) for c in completions]
        if self.task == "gsm8k":
            if answer is None:
                raise KeyError("gsm8k_correct needs the 'answer' column (prompts.columns: [answer])")
            return [_gsm8k.score(t, a) for t, a in zip(texts, answer)]
        if entry is None:
            raise KeyError(f"{self.__name__} needs the 'entry' column of the task dataset (prompts.columns: [entry])")
        return [_proc.score(self.task, t, e, self.rendering) for t, e in zip(texts, entry)]


class TaskFormat:
    """1.0 if the completion has the shape of an answer of the task (its rendering's format),
    else 0.0: a small shaping reward beside :class:`TaskCorrectness`."""

    def __init__(self, task: str, rendering: str = "compact"):
        self.task, self.rendering = task, rendering
        pat = _gsm8k.FORMAT.pattern if task == "gsm8k" else _proc.FORMATS[(task, rendering)]
        self.pattern = re.compile(pat)
        self.__name__ = f"{task}_format"

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        from reward_models import completion_text

        return [1.0 if self.pattern.search(completion_text(c) or "") else 0.0 for c in completions]


def task_rewards(task: str, rendering: str = "compact", format_weight: float = 0.0):
    """``(reward functions, weights)``: correctness (weight 1), and format if ``format_weight``."""
    funcs, weights = [TaskCorrectness(task, rendering)], [1.0]
    if format_weight:
        funcs.append(TaskFormat(task, rendering))
        weights.append(format_weight)
    return funcs, weights
