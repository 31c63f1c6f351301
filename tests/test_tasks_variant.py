"""basic_arithmetic_1d, a task variant (reasoning-gym's basic_arithmetic under smaller
settings): its questions are the small space it promises (two 1-digit terms, + and -,
answers -18..18, each one word), its train and test splits never share a question, and
the library's checker accepts the right answer and rejects a wrong one in both renderings."""

import json

import pytest

from esorl.tasks import TASKS, load_task, task_rewards
from esorl.tasks import procedural as proc

NAME = "basic_arithmetic_1d"


def test_variant_is_registered_on_its_base():
    assert NAME in TASKS and proc.library_name(NAME) == "basic_arithmetic" and proc.library_name("mini_sudoku") == "mini_sudoku"
    assert proc.CONFIGS[NAME]["max_digits"] == 1 and proc.CONFIGS[NAME]["max_terms"] == 2
    assert proc.CONFIGS["basic_arithmetic"]["max_digits"] == 2  # the original task keeps its settings


def test_variant_questions_are_small():
    ds = load_task(NAME, "train", size=300, seed=0, test_size=100)
    for prompt, answer in zip(ds["prompt"], ds["answer"]):
        assert prompt.endswith(" =") and not {"*", "/"} & set(prompt.split())
        assert -18 <= int(answer) <= 18 and answer == answer.strip() and " " not in answer
        assert sum(w.lstrip("-(").isdigit() for w in prompt.split()) == 2  # two terms
    assert all(json.loads(e)["metadata"]["source_dataset"] == "basic_arithmetic" for e in ds["entry"])


@pytest.mark.parametrize("seed", [0, 1])
def test_variant_splits_never_overlap(seed):
    tr = load_task(NAME, "train", size=3000, seed=seed, test_size=1000)
    te = load_task(NAME, "test", seed=seed, test_size=1000)
    assert len(tr) == 3000 and len(te) == 1000
    assert not set(tr["prompt"]) & set(te["prompt"])
    assert not {json.loads(e)["question"] for e in tr["entry"]} & {json.loads(e)["question"] for e in te["entry"]}


@pytest.mark.parametrize("rendering", ["compact", "natural"])
def test_variant_checker_accepts_right_and_rejects_wrong(rendering):
    ds = load_task(NAME, "test", seed=0, rendering=rendering, test_size=50)
    (correct, fmt), _ = task_rewards(NAME, rendering, format_weight=0.1)
    assert correct.__name__ == f"{NAME}_correct"
    right = list(ds["answer"])
    wrong = [str(int(a) + 1) for a in right]
    assert correct(ds["prompt"], right, entry=ds["entry"]) == [1.0] * 50
    assert correct(ds["prompt"], wrong, entry=ds["entry"]) == [0.0] * 50
    assert correct(ds["prompt"][:2], ["", "abc"], entry=ds["entry"][:2]) == [0.0, 0.0]
    assert fmt(ds["prompt"], right) == [1.0] * 50
