"""A verifiable task as training data: the pairs' solutions are what the task's reward
accepts, the pretraining corpus holds the train split only (never a test question), the
word tokenizer keeps numbers, operators and sudoku rows whole, SFT pairs carry the test
split as ``dev``, bad task fields fail before any work naming the field, and a task
pretrain → SFT chain runs end to end."""

import json

import pytest

from esorl.config import ConfigError, load_config
from esorl.tasks import RENDERINGS, TASKS, load_task, task_rewards
from esorl.tasks.training import task_pairs, write_task_corpus, write_task_pairs
from esorl.data.corpus import DataConfig, prepare_data, resolve_source
from esorl.train.pretrain import PretrainConfig, run_pretrain
from esorl.train.sft import SFTConfig, prepare_sft_data

from conftest import SHARED

PROCEDURAL = [t for t in TASKS if t != "gsm8k"]
GSM8K = SHARED / "data" / "gsm8k"


def _pretrain_cfg(tmp_path, task="basic_arithmetic", **over):
    base = {
        "model": {"hidden_size": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16},
        "data": {"task": task, "task_size": 120, "task_test_size": 30, "eval_split": "", "eval_fraction": 0.1, "max_length": 24,
                 "add_bos": True, "cache_dir": str(tmp_path / "cache")},
        "objective": {"alpha0": 0.25, "batch_split": 0.5},
        "training": {"learning_rate": 3e-3, "warmup_steps": 2,
                     "max_steps": 3, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "per_device_eval_batch_size": 8, "eval_steps": 0, "eval_batches": 1, "save_steps": 0,
                  "output_dir": str(tmp_path / "pre"), "bf16": False, "attention_backend": "sdpa", "logging_steps": 1},
        "logging": {"wandb_mode": "disabled"},
    }
    return load_config(PretrainConfig, None, [f"{k}={v}" for k, v in over.items()], base=base)


@pytest.mark.parametrize("rendering", RENDERINGS)
@pytest.mark.parametrize("name", PROCEDURAL)
def test_reference_solutions_get_full_reward(name, rendering):
    pairs = task_pairs(name, "train", size=40, seed=3, rendering=rendering, test_size=20)
    ds = load_task(name, "train", size=40, seed=3, rendering=rendering, test_size=20)
    assert [p for p, _ in pairs] == ds["prompt"]
    (correct,), _ = task_rewards(name, rendering)
    assert correct(ds["prompt"], [s for _, s in pairs], entry=ds["entry"], answer=ds["answer"]) == [1.0] * 40
    # and as the pretraining corpus writes them: the completion after "prompt " is the solution
    assert all(s and "\n" not in s for _, s in pairs if rendering == "compact")


@pytest.mark.parametrize("rendering", RENDERINGS)
def test_gsm8k_solutions_get_full_reward(rendering):
    if not GSM8K.is_dir():
        pytest.skip("GSM8K data not found at ../shared/data/gsm8k")
    pairs = task_pairs("gsm8k", "train", size=10, rendering=rendering, source=str(GSM8K))
    ds = load_task("gsm8k", "train", size=10, rendering=rendering, source=str(GSM8K))
    (correct,), _ = task_rewards("gsm8k", rendering)
    assert correct(ds["prompt"], [s for _, s in pairs], answer=ds["answer"]) == [1.0] * 10
    if rendering == "natural":
        assert all("####" in s for _, s in pairs)


@pytest.mark.parametrize("name", ["basic_arithmetic", "mini_sudoku"])
def test_corpus_is_the_train_split_and_tokenizes_whole(tmp_path, name):
    cfg = _pretrain_cfg(tmp_path, name)
    src = resolve_source(cfg.data)
    lines = [json.loads(x)["text"] for x in (tmp_path / "cache").glob("task-text-*/train.jsonl").__next__().read_text().splitlines()]
    rule = "-ast" if name == "basic_arithmetic" else ""  # the cache names a split rule other than exact text
    assert src.endswith(f"task-text-{name}-compact-n120-s0-t30{rule}") and len(lines) == 120
    train = load_task(name, "train", size=120, seed=0, test_size=30)
    assert lines == [f"{p} {a}" for p, a in zip(train["prompt"], train["answer"])]
    test_prompts = set(load_task(name, "test", seed=0, test_size=30)["prompt"])
    assert not any(line.rsplit(" =", 1)[0] + " =" in test_prompts for line in lines)  # no test question in the corpus
    if rule:  # nor one up to redundant brackets
        from esorl.tasks.procedural import canonical_expression

        held = {canonical_expression(p[: -len(" =")]) for p in test_prompts}
        assert not any(canonical_expression(line.rsplit(" =", 1)[0]) in held for line in lines)
    tok, data = prepare_data(cfg.data, cfg.training.seed)
    # word-level: every whitespace word is one token, none unknown, and the text round-trips
    for line in lines:
        ids = tok(line, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(line.split()) and tok.unk_token_id not in ids and tok.decode(ids) == line
    assert data["train"]["input_ids"].shape[1] == 24 and len(data["train"]["input_ids"]) + len(data["eval"]["input_ids"]) == 120
    assert (data["train"]["input_ids"][:, 0] == tok.bos_token_id).all()
    # another task, size or seed is another corpus and another tokenizer (never a stale cache)
    other = _pretrain_cfg(tmp_path, name, **{"data.task_seed": 1})
    assert resolve_source(other.data) != src


def test_sft_pairs_train_and_dev_from_the_test_split(tmp_path):
    pre = _pretrain_cfg(tmp_path)
    tok, _ = prepare_data(pre.data)
    tok_dir = next((tmp_path / "cache").glob("tokenizer-word-*"))
    cfg = load_config(SFTConfig, None, [], base={
        "model": {"init_from": str(tmp_path / "absent")},
        "data": {"task": "basic_arithmetic", "task_size": 120, "task_test_size": 30, "max_length": 24, "tokenizer": str(tok_dir),
                 "cache_dir": str(tmp_path / "cache")}})
    _, data = prepare_sft_data(cfg, str(tmp_path / "absent"))
    d = write_task_pairs(tmp_path / "cache", "basic_arithmetic", size=120, test_size=30)
    train = [json.loads(x) for x in (d / "train.jsonl").read_text().splitlines()]
    dev = [json.loads(x) for x in (d / "dev.jsonl").read_text().splitlines()]
    test = load_task("basic_arithmetic", "test", seed=0, test_size=30)
    assert len(train) == 120 and [r["prompt"] for r in dev] == test["prompt"] and [r["completion"] for r in dev] == test["answer"]
    assert len(data["train"]["input_ids"]) == 120 and len(data["eval"]["input_ids"]) == 30
    # row = BOS prompt completion EOS; the prompt mask covers BOS + prompt
    row, pm, v = data["eval"]["input_ids"][0], data["eval"]["prompt_mask"][0], data["eval"]["valid"][0]
    n_prompt = len(dev[0]["prompt"].split()) + 1
    assert pm.sum() == n_prompt and row[0] == tok.bos_token_id and row[int(v.sum()) - 1] == tok.eos_token_id
    assert tok.decode(row[n_prompt : int(v.sum()) - 1].tolist()) == dev[0]["completion"]


def test_bad_task_fields_fail_before_any_work(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="data.task: unknown task 'sudoku'"):
        _pretrain_cfg(tmp_path, "sudoku")
    with pytest.raises(ConfigError, match="data.task_rendering"):
        _pretrain_cfg(tmp_path, **{"data.task_rendering": "terse"})
    with pytest.raises(ConfigError, match="data.task_size"):
        _pretrain_cfg(tmp_path, **{"data.task_size": 0})
    with pytest.raises(ConfigError, match="data.eval_split"):
        _pretrain_cfg(tmp_path, **{"data.eval_split": "dev"})
    with pytest.raises(ConfigError, match="data.source"):
        _pretrain_cfg(tmp_path, **{"data.source": "some/dir"})
    with pytest.raises(ConfigError, match="data.task: unknown task 'arith'"):
        load_config(SFTConfig, None, ["model.init_from=x", "data.task=arith", f"data.cache_dir={cache}"])
    with pytest.raises(ConfigError, match="data.task_test_size"):
        load_config(SFTConfig, None, ["model.init_from=x", "data.task=countdown", "data.task_test_size=0"])
    assert not cache.exists()
    DataConfig().validate()  # no task: nothing changes for other corpora


def test_task_pretrain_then_sft_end_to_end(tmp_path):
    from esorl import EsoLMModel
    from esorl.cli import main as cli

    res = run_pretrain(_pretrain_cfg(tmp_path, "mini_sudoku", **{"data.max_length": 16}))
    model = res["model_dir"]
    assert EsoLMModel.from_pretrained(model).config.max_seq_len == 16
    import yaml

    recipe = {"model": {"init_from": str(model)},
              "data": {"task": "mini_sudoku", "task_size": 120, "task_test_size": 30, "max_length": 16, "cache_dir": str(tmp_path / "cache")},
              "training": {"max_steps": 2, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "per_device_eval_batch_size": 8, "eval_steps": 0, "eval_batches": 1, "save_steps": 0,
                        "output_dir": str(tmp_path / "sft"), "bf16": False, "attention_backend": "sdpa", "logging_steps": 1},
              "logging": {"wandb_mode": "disabled"}}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert cli(["sft", "--config", str(path)]) == 0
    assert (tmp_path / "sft" / "model" / "tokenizer.json").exists()


@pytest.mark.parametrize("task", ["basic_arithmetic", "basic_arithmetic_1d", "mini_sudoku"])
def test_task_cpu_recipes_load_and_agree(task):
    """The CPU recipes of a task chain: SFT (where there is one) reads the pretraining
    questions and context, GRPO takes the same task and rendering and fits its completions in
    that context."""
    from pathlib import Path

    from esorl.rl.grpo import GRPORecipe

    pre = load_config(PretrainConfig, f"recipes/pretrain/{task}_cpu.yaml")
    rl = load_config(GRPORecipe, f"recipes/rl/grpo_{task}_cpu.yaml")
    assert pre.data.task == rl.prompts.task == task and pre.data.task_rendering == rl.prompts.task_rendering == "compact"
    assert rl.args().max_completion_length < pre.data.max_length and rl.prompts.eval_prompts <= pre.data.task_test_size
    assert rl.rewards[0].name == "task" and rl.args().eval_strategy == "steps" and rl.prompts.task_seed == pre.data.task_seed
    if Path(f"recipes/sft/{task}_cpu.yaml").exists():
        sft = load_config(SFTConfig, f"recipes/sft/{task}_cpu.yaml")
        assert (sft.data.task, sft.data.task_rendering, sft.data.max_length) == (task, "compact", pre.data.max_length)
        assert (pre.data.task_size, pre.data.task_seed, pre.data.task_test_size) == (sft.data.task_size, sft.data.task_seed, sft.data.task_test_size)
        assert rl.policy.init_from == sft.training.output_dir + "/model"
    else:
        assert rl.policy.init_from == pre.training.output_dir + "/model" and rl.policy.pretrain_recipe == f"recipes/pretrain/{task}_cpu.yaml"


def test_caches_are_keyed_by_the_split_rule(tmp_path):
    """A tokenizer, a tokenized corpus or shards built on another train/test split rule are
    never reused (a run once silently trained on the old split's cached tokens): the arithmetic
    tasks' keys carry their rule, the exact-text tasks' keys are unchanged."""
    from esorl.data import corpus as data_prep
    from esorl.data.corpus import DataConfig, _config_key, _task_key

    a = DataConfig(task="basic_arithmetic_1d", cache_dir=str(tmp_path))
    m = DataConfig(task="mini_sudoku", cache_dir=str(tmp_path))
    assert _task_key(a)["task"][-1] == "ast" and _config_key(a)["split_rule"] == "ast"
    assert _task_key(m) == {"task": ["mini_sudoku", "compact", m.task_size, m.task_seed, m.task_test_size]} and "split_rule" not in _config_key(m)
    import esorl.tasks.procedural as proc

    old = dict(proc.SPLIT_RULES)
    try:
        k_ast = data_prep._key(_config_key(a))
        proc.SPLIT_RULES.pop("basic_arithmetic_1d")
        assert data_prep._key(_config_key(a)) != k_ast
    finally:
        proc.SPLIT_RULES.clear()
        proc.SPLIT_RULES.update(old)
