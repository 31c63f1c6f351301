"""Pieces the RL recipes share: where the policy comes from, prompts, reward functions."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch


# log-ratios are clamped to ±this before exp in GRPO and PPO (see EsoGRPOTrainer._get_per_token_logps_and_entropies)
LOG_RATIO_CLAMP = 20.0


@dataclass
class PolicyArgs:
    """The starting policy.

    init_from: a ``save_pretrained`` directory (esorl pretraining writes ``<run>/model``, the
        EMA weights; ``esorl convert-official`` writes one for the released checkpoints).
    pretrain_recipe: if ``init_from`` does not exist yet, run this pretraining recipe first
        (with ``training.output_dir`` set to ``init_from``'s parent) – the CPU recipes chain
        pretraining → RL this way; leave empty to require an existing model.
    pretrain_overrides: ``key=value`` overrides for that pretraining run.
    tokenizer: tokenizer directory or hub name (default: ``init_from``).
    """

    init_from: str = "runs/pretrain_synthetic_cpu/model"
    pretrain_recipe: str = ""
    pretrain_overrides: list[str] = field(default_factory=list)
    tokenizer: str = ""


@dataclass
class PromptArgs:
    """Prompts (and the extra columns reward functions receive).

    source: ``synthetic`` | local file/dir | hub dataset. split / eval_split: splits.
    prompt_field: a prompt column (e.g. GSM8K ``question``); empty = take the first
        ``prompt_words`` words of the text column (sentence continuation, e.g. SST-2).
    text_field: the text column when ``prompt_field`` is empty.
    prompt_template: format string applied to the prompt (``{prompt}``).
    columns: extra columns passed to reward functions (e.g. ``[answer]``).
    max_prompts / eval_prompts: how many training / held-out prompts to use (0 = all).
    eval_offset: skip this many held-out prompts first (the held-out prompts are rows
        ``[eval_offset, eval_offset + eval_prompts)`` of the held-out split): a study's sweep
        validates on the block after the one its evaluation reports on. For a task, keep
        ``eval_offset + eval_prompts`` within the pretraining/SFT stage's ``data.task_test_size``
        (the questions it kept out of training).
    min_words: skip texts shorter than this when cutting prompts.
    synthetic_size / cache_dir: size of the embedded corpus (``source: synthetic``) and where
        generated corpora and reward models are cached.
    task: a verifiable task by name (``countdown``, ``mini_sudoku``, ``basic_arithmetic``,
        ``gsm8k``; :mod:`esorl.tasks`): prompts come from it (``split`` → its train split,
        ``eval_split`` → its test split) and the rows carry ``answer``/``entry`` for the
        ``task`` reward. For ``gsm8k``, ``source`` is a local directory or the hub name.
    task_rendering: ``compact`` (small models) or ``natural`` (the library's question).
    task_size: training questions drawn (procedural tasks; 0 = all for GSM8K).
    task_seed: the seed of the task's train/test split (keep it equal to the SFT/pretraining
        stage's ``data.task_seed``: their held-out questions are then disjoint from every
        training question, whatever the RL run's seed).
    """

    source: str = "synthetic"
    split: str = "train"
    eval_split: str = "dev"
    prompt_field: str = ""
    text_field: str = "text"
    prompt_words: int = 3
    prompt_template: str = "{prompt}"
    columns: list[str] = field(default_factory=list)
    max_prompts: int = 0
    eval_prompts: int = 64
    eval_offset: int = 0
    min_words: int = 5
    synthetic_size: int = 20000
    cache_dir: str = ".esorl_cache"
    task: str = ""
    task_rendering: str = "compact"
    task_size: int = 1000
    task_seed: int = 0

    def validate(self):
        if self.eval_offset < 0 or self.eval_prompts < 0 or self.max_prompts < 0:
            raise ValueError(f"prompts.eval_offset / eval_prompts / max_prompts must be >= 0, got {self.eval_offset}, {self.eval_prompts}, {self.max_prompts}")
        if self.task:
            from esorl.tasks import RENDERINGS, TASKS

            if self.task not in TASKS:
                raise ValueError(f"prompts.task: unknown task {self.task!r}; choose from {', '.join(TASKS)}")
            if self.task_rendering not in RENDERINGS:
                raise ValueError(f"prompts.task_rendering must be one of {RENDERINGS}, got {self.task_rendering!r}")

    def reward_columns(self) -> list[str]:
        """The row columns reward functions receive (a task's ``answer`` and ``entry`` too)."""
        return list(dict.fromkeys(list(self.columns) + (["answer", "entry"] if self.task else [])))


@dataclass
class RewardSpec:
    """One reward function and its weight.

    name: ``task`` (the correctness of ``prompts.task``; kwargs ``format_weight`` adds its
        format reward), ``sentiment`` (the learned SST-2-style classifier, trained on first use with
        ``reward_models.train_sentiment``; kwargs: ``model_dir``, ``train``, ``dev``,
        ``label``), ``hf_classifier`` (any HF sequence classifier; kwargs:
        ``model_name_or_path``, ``label``, ``kind``), ``keyword`` (kwargs ``positive``,
        ``negative``), ``length`` (``target_words``), ``format`` (``pattern``), ``gsm8k``,
        or ``module:function`` for your own callable.
    """

    name: str = "sentiment"
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)

    def validate(self):
        if self.name not in BUILTIN_REWARDS and ":" not in self.name:
            raise ValueError(f"rewards: unknown reward {self.name!r}: use one of {', '.join(BUILTIN_REWARDS)}, "
                             "module:function (a module importable from the working directory) or path/to/file.py:function")


BUILTIN_REWARDS = ("task", "sentiment", "hf_classifier", "keyword", "length", "format", "gsm8k")


def resolve_callable(spec: str):
    """``module:attr`` (importable, the working directory included, as ``python -m`` would)
    or ``path/to/file.py:attr``. Raises ``ImportError`` / ``AttributeError`` naming it."""
    import importlib
    import importlib.util
    import os
    import sys

    mod_name, _, attr = spec.rpartition(":")
    if not mod_name or not attr:
        raise ValueError(f"{spec!r}: expected module:function or path/to/file.py:function")
    if mod_name.endswith(".py") or "/" in mod_name or os.sep in mod_name:
        path = Path(mod_name)
        if not path.is_file():
            raise FileNotFoundError(f"reward {spec!r}: no such file {path}")
        import hashlib

        # the same name in every process (ranks, pickling), unlike hash()
        uniq = "esorl_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
        mod = sys.modules.get(uniq)
        if mod is None:
            s = importlib.util.spec_from_file_location(uniq, path)
            mod = importlib.util.module_from_spec(s)
            sys.modules[uniq] = mod
            try:
                s.loader.exec_module(mod)
            except BaseException:
                del sys.modules[uniq]  # a half-executed module is not kept
                raise
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # the console script does not put the working directory on sys.path
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(f"reward {spec!r}: cannot import {mod_name!r} from {os.getcwd()} ({e}); "
                                      f"pass a file path instead (path/to/{mod_name.replace('.', '/')}.py:{attr})") from None
    if not hasattr(mod, attr):
        raise AttributeError(f"reward {spec!r}: {mod_name} has no attribute {attr!r}")
    return getattr(mod, attr)


def load_prompts(args: PromptArgs, split: str, limit: int, seed: int = 0) -> list[dict]:
    """Rows ``{"prompt": str, <columns>...}``."""
    from esorl.data import load_prompt_completion_dataset, load_text_dataset
    from esorl.data.corpus import DataConfig, resolve_source

    if args.task:
        from esorl.tasks import load_task

        tsplit = "train" if split == args.split else "test"
        off = args.eval_offset if tsplit == "test" else 0
        # the task's split seed is its own setting, not the run's seed: runs with different
        # seeds must see the same held-out questions, disjoint from the training questions a
        # pretraining/SFT stage used with the same task_seed
        ds = load_task(args.task, tsplit, size=args.task_size if tsplit == "train" else off + (limit or 200), seed=args.task_seed,
                       rendering=args.task_rendering, test_size=max(off + limit, 200), source="" if args.source == "synthetic" else args.source)
        rows = [{"prompt": args.prompt_template.format(prompt=r["prompt"]), "answer": r["answer"], "entry": r["entry"],
                 **{c: r[c] for c in args.columns if c in r}, SOURCE_ROW: i} for i, r in enumerate(ds)]
        if not rows:
            raise ValueError(f"prompts: task {args.task!r} split {tsplit!r} is empty")
        if tsplit == "train":  # the held-out questions stay the task's first ones, whatever the run's seed
            random.Random(seed).shuffle(rows)
        else:
            rows = rows[off:]
        return rows[:limit] if limit else rows
    src = resolve_source(DataConfig(source=args.source, synthetic_size=args.synthetic_size, cache_dir=args.cache_dir)) if args.source == "synthetic" else args.source
    rows: list[dict] = []
    # each row remembers where it came from (SOURCE_ROW), so that a problem found later
    # (a prompt too long for the context) names the file and row
    if args.prompt_field:
        ds = load_prompt_completion_dataset(src, split=split, prompt_field=args.prompt_field, completion_field=None)
        for i, r in enumerate(ds):
            rows.append({"prompt": args.prompt_template.format(prompt=r["prompt"]), **{c: r[c] for c in args.columns}, SOURCE_ROW: i})
    else:
        ds = load_text_dataset(src, split=split, text_field=args.text_field)
        for i, r in enumerate(ds):
            words = r["text"].split()
            if len(words) < args.min_words:
                continue
            row = {"prompt": args.prompt_template.format(prompt=" ".join(words[: args.prompt_words])), SOURCE_ROW: i}
            for c in args.columns:
                row[c] = r[c]
            rows.append(row)
    if not rows:
        raise ValueError(f"prompts: no usable rows in {args.source!r} split {split!r}")
    random.Random(seed).shuffle(rows)
    if split != args.split and args.eval_offset:
        rows = rows[args.eval_offset:]
    return rows[:limit] if limit else rows


# key of a prompt row's index in its source split (never passed to reward functions)
SOURCE_ROW = "_source_row"


def check_prompt_lengths(rows: list[dict], tokenizer, max_prompt_tokens: int, where: str, limit_desc: str) -> None:
    """Raise ``ValueError`` before any training if a prompt does not fit, naming the source,
    the row (its index in the source split), its length and the limit. Lengths count the
    BOS token the policy prepends (:meth:`esorl.policy.EsoPolicy.encode_prompts`)."""
    if not rows:
        return
    enc = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
    extra = 1 if tokenizer.bos_token_id is not None else 0
    empty = [r.get(SOURCE_ROW, i) for i, (r, e) in enumerate(zip(rows, enc)) if len(e) + extra == 0]
    if empty:
        raise ValueError(f"{where}: {len(empty)} empty prompt(s) (rows {', '.join(map(str, empty[:10]))}) and the tokenizer has no BOS "
                         "token, so their first step would have no context; drop those rows or use a tokenizer with BOS")
    bad = [(r.get(SOURCE_ROW, i), len(e) + extra) for i, (r, e) in enumerate(zip(rows, enc)) if len(e) + extra > max_prompt_tokens]
    if bad:
        row, n = max(bad, key=lambda x: x[1])
        rows_txt = ", ".join(str(b[0]) for b in sorted(bad)[:10]) + (" ..." if len(bad) > 10 else "")
        raise ValueError(
            f"{where}: {len(bad)} prompt(s) do not fit (rows {rows_txt}); the longest, row {row}, has {n} tokens but {limit_desc} "
            f"leaves room for {max_prompt_tokens}. Shorten or drop those rows, or lower the completion length.")


def build_reward(spec: RewardSpec, cache_dir: str = ".esorl_cache"):
    """A TRL-style reward callable from a spec."""
    import reward_models as rm

    kw = dict(spec.kwargs)
    if spec.name == "sentiment":
        from reward_models.train_sentiment import train_sentiment_model

        model_dir = kw.pop("model_dir", str(Path(cache_dir) / "reward_sentiment"))
        train, dev = kw.pop("train", None), kw.pop("dev", None)
        label = kw.pop("label", 1)
        if not (Path(model_dir) / "config.json").exists() or train:
            targs = {k: v for k, v in (("train_path", train), ("dev_path", dev)) if v}
            metrics = train_sentiment_model(out_dir=model_dir, **targs, **kw)
            print(f"[esorl] sentiment reward model {model_dir}: dev accuracy {metrics.get('dev_accuracy', float('nan')):.3f}")
        f = rm.SequenceClassifierReward(model_dir, label=label, local_files_only=True)
        return f
    if spec.name == "hf_classifier":
        return rm.SequenceClassifierReward(**kw)
    if spec.name == "keyword":
        return rm.keyword_reward(**kw)
    if spec.name == "length":
        return rm.length_reward(**kw)
    if spec.name == "format":
        return rm.format_reward(**kw)
    if spec.name == "gsm8k":
        return rm.gsm8k_answer_reward
    if ":" in spec.name:
        obj = resolve_callable(spec.name)
        return obj(**kw) if kw else obj
    spec.validate()  # unknown name: raises


def build_rewards(specs: list[RewardSpec], cache_dir: str, prompts: PromptArgs | None = None):
    """Reward callables and weights; a ``task`` spec expands to the task's correctness (and
    its format reward with ``kwargs.format_weight``)."""
    if not specs:
        raise ValueError("rewards: at least one reward function is needed")
    funcs, weights = [], []
    for s in specs:
        if s.name == "task":
            if prompts is None or not prompts.task:
                raise ValueError("rewards: 'task' needs prompts.task (the task whose answers it checks)")
            from esorl.tasks import task_rewards

            f, w = task_rewards(prompts.task, prompts.task_rendering, float(s.kwargs.get("format_weight", 0.0)))
            funcs += f
            weights += [s.weight * x for x in w]
        else:
            funcs.append(build_reward(s, cache_dir))
            weights.append(s.weight)
    return funcs, weights


def score_rewards(funcs, weights, prompts: list[str], completions: list[str], columns: dict) -> tuple[torch.Tensor, dict]:
    """``(B,)`` weighted total and per-function values; errors name the function and sample."""
    from reward_models import call_reward, reward_name

    columns = {k: v for k, v in columns.items() if k != SOURCE_ROW}
    per = {}
    total = torch.zeros(len(prompts), dtype=torch.float64)
    for f, w in zip(funcs, weights):
        vals = call_reward(f, prompts, completions, **columns)
        t = torch.tensor([float("nan") if v is None else v for v in vals], dtype=torch.float64)
        per[reward_name(f)] = t
        total += w * torch.nan_to_num(t, nan=0.0)  # None = "not applicable" (TRL's nansum)
    return total, per


def check_policy_source(args: PolicyArgs) -> None:
    """Fail before any work if the policy can neither be loaded nor built
    (:func:`esorl.train.pretrain.check_model_source`)."""
    from esorl.train.pretrain import check_model_source

    check_model_source(args, "policy")


def ensure_policy(args: PolicyArgs) -> Path:
    """The policy directory; runs ``pretrain_recipe`` first if it does not exist yet
    (:func:`esorl.train.pretrain.ensure_pretrained`)."""
    from esorl.train.pretrain import ensure_pretrained

    return ensure_pretrained(args, "policy")


def load_tokenizer_for(args: PolicyArgs, model_dir: Path):
    from esorl.data import load_tokenizer

    return load_tokenizer(args.tokenizer or str(model_dir))


def peak_memory_mb(device) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_reference(ref, accelerator):
    """A frozen reference model on the accelerator's device. Under DeepSpeed ZeRO-3 it gets
    its own inference engine (parameters partitioned like the policy's, as TRL's
    ``prepare_deepspeed``); otherwise it is a plain module. It is *not* registered with the
    accelerator (``accelerate.prepare_model`` would add it to the models ``save_state``
    checkpoints, and under DeepSpeed ``save_state`` then fails on a module that is no engine)."""
    import copy

    from ..distributed import zero_stage

    if zero_stage(accelerator) != 3:
        return ref.to(accelerator.device)
    import deepspeed

    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    d = ref.config.hidden_size
    zo = cfg.setdefault("zero_optimization", {})
    zo.update({"reduce_bucket_size": d * d, "stage3_param_persistence_threshold": 10 * d, "stage3_prefetch_bucket_size": int(0.9 * d * d)})
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=ref, config=cfg)
    engine.eval()
    return engine
