"""Verifiable tasks and evaluation: rewards give 1 on the library's reference answers and 0
on wrong or degenerate ones for every task and rendering; splits are disjoint and
reproducible from the seed; pass@k matches the closed form; `esorl eval` runs a 2×2 grid;
a GRPO recipe takes a task by name."""

import json
import math
from itertools import combinations
from pathlib import Path

import pytest

from esorl.tasks import RENDERINGS, TASKS, load_task, pass_at_k, task_rewards

from conftest import SHARED

GSM8K = SHARED / "data" / "gsm8k"
PROCEDURAL = [t for t in TASKS if t != "gsm8k"]
DEGENERATE = ["", " ", "\n", "<eos>", "<pad>", "日本語 ✓ café", "9" * 5000]


def _task(name, split="train", rendering="compact", size=40):
    if name == "gsm8k":
        if not GSM8K.is_dir():
            pytest.skip("GSM8K data not found at ../shared/data/gsm8k")
        return load_task(name, split, size=size, rendering=rendering, source=str(GSM8K))
    return load_task(name, split, size=size, seed=3, rendering=rendering, test_size=60)


@pytest.mark.parametrize("rendering", RENDERINGS)
@pytest.mark.parametrize("name", TASKS)
def test_rewards_accept_references_and_reject_wrong_answers(name, rendering):
    ds = _task(name, rendering=rendering)
    (correct, fmt), _ = task_rewards(name, rendering, format_weight=0.1)
    cols = {"entry": ds["entry"], "answer": ds["answer"]}
    refs = [a if name != "gsm8k" else f"#### {a}" for a in ds["answer"]]
    assert correct(ds["prompt"], refs, **cols) == [1.0] * len(ds)
    assert fmt(ds["prompt"], refs) == [1.0] * len(ds)
    # another row's answer is wrong (where the two differ), degenerate text always is
    shifted = refs[1:] + refs[:1]
    got = correct(ds["prompt"], shifted, **cols)
    assert all(g == 0.0 for g, a, b in zip(got, refs, shifted) if a != b) and any(a != b for a, b in zip(refs, shifted))
    for bad in DEGENERATE:
        assert correct(ds["prompt"][:3], [bad] * 3, **{k: v[:3] for k, v in cols.items()}) == [0.0] * 3, repr(bad[:20])
    # TRL's conversational completions are accepted too
    assert correct(ds["prompt"][:1], [[{"role": "assistant", "content": refs[0]}]], **{k: v[:1] for k, v in cols.items()}) == [1.0]


@pytest.mark.parametrize("name", PROCEDURAL)
def test_splits_are_disjoint_and_reproducible(name):
    tr, te = _task(name, "train", size=200), _task(name, "test")
    key = lambda ds: {json.loads(e)["question"] for e in ds["entry"]}  # noqa: E731
    assert not key(tr) & key(te) and len(tr) == 200 and len(te) == 60
    assert _task(name, "train", size=200)["prompt"] == tr["prompt"]  # same seed, same questions
    assert load_task(name, "train", size=200, seed=4, test_size=60)["prompt"] != tr["prompt"]
    nat = _task(name, "train", rendering="natural", size=200)
    assert nat["entry"] == tr["entry"]  # the renderings share the questions


def test_pass_at_k_closed_form():
    for n, c in [(5, 0), (5, 2), (8, 3), (10, 10), (1, 1)]:
        for k in range(1, n + 1):
            # by enumeration: the share of k-subsets with at least one correct sample
            subsets = list(combinations(range(n), k))
            exact = sum(any(i < c for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_esorl_eval_runs_a_2x2_grid(tmp_path):
    from esorl.evaluation import main as eval_main

    from rl_fixtures import make_tiny_policy

    pol = make_tiny_policy(tmp_path)
    eval_main(["--model", str(pol), "--task", "basic_arithmetic", "--num-prompts", "4", "--num-generations", "3", "--sampling-alpha0", "1.0,0.5",
               "--diffusion-steps", "2,4", "--max-completion-length", "4", "--out", str(tmp_path / "ev"), "--device", "cpu"])
    res = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert len(res["grid"]) == 4 and {(r["alpha0"], r["steps"]) for r in res["grid"]} == {(1.0, 2), (1.0, 4), (0.5, 2), (0.5, 4)}
    for r in res["grid"]:
        ks = [r["pass_at_k"][str(k)] for k in (1, 2, 3)]
        assert ks == sorted(ks) and r["pass_at_k"]["1"] == pytest.approx(r["accuracy"]) and r["nfe"] >= 1 and r["tokens_per_s"] > 0
    assert (tmp_path / "ev" / "accuracy_vs_nfe.png").stat().st_size > 1000 and "pass@3" in (tmp_path / "ev" / "eval.md").read_text()


def test_grpo_recipe_takes_a_task_by_name(tmp_path):
    from esorl.config import load_config
    from esorl.rl.grpo import GRPORecipe, build_grpo_trainer
    from esorl.train.common import read_metrics

    from rl_fixtures import make_tiny_policy, recipe_dict

    d = recipe_dict(make_tiny_policy(tmp_path), tmp_path / "run", tmp_path / "cache", max_steps=2)
    d["prompts"] = {"task": "basic_arithmetic", "task_size": 50, "eval_prompts": 8}
    d["rewards"] = [{"name": "task", "kwargs": {"format_weight": 0.1}}]
    d["grpo"].update(eval_strategy="steps", eval_steps=2, num_generations_eval=1)
    tr = build_grpo_trainer(load_config(GRPORecipe, None, [], base=d))
    assert tr.reward_func_names == ["basic_arithmetic_correct", "basic_arithmetic_format"] and tr.reward_weights.tolist() == pytest.approx([1.0, 0.1])
    tr.train()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert any("rewards/basic_arithmetic_correct/mean" in r for r in recs) and any("eval_reward" in r for r in recs)
    with pytest.raises(ValueError, match="prompts.task: unknown task 'sudoku'"):
        load_config(GRPORecipe, None, ["prompts.task=sudoku"], base=d)


def test_rl_seed_does_not_move_the_task_split():
    """Regression: the task's train/test split was drawn with the RL run's seed, so runs with
    different seeds saw different held-out questions (and could meet questions a previous
    stage trained on). The split follows ``prompts.task_seed``; the run's seed only shuffles."""
    from esorl.rl.common import PromptArgs, load_prompts

    p = PromptArgs(task="basic_arithmetic", task_size=50, eval_prompts=20)
    ev = [{r["prompt"] for r in load_prompts(p, p.eval_split, 20, seed=s)} for s in (0, 1)]
    tr = [{r["prompt"] for r in load_prompts(p, p.split, 0, seed=s)} for s in (0, 1)]
    assert ev[0] == ev[1] and tr[0] == tr[1] and not (ev[0] & tr[0])
    p2 = PromptArgs(task="basic_arithmetic", task_size=50, eval_prompts=20, task_seed=5)
    assert {r["prompt"] for r in load_prompts(p2, p2.eval_split, 20, seed=0)} != ev[0]
