"""Configs: every field of every recipe config is documented; bad input fails naming it."""

import dataclasses
import inspect
import typing

import pytest

from esorl.cli import CONFIG_CLASSES, _load
from esorl.config import ConfigError, _inherited_help, load_config


def _sections(cls, seen=None):
    seen = seen if seen is not None else set()
    if cls in seen:
        return
    seen.add(cls)
    yield cls
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is list and typing.get_args(tp) else tp
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            yield from _sections(inner, seen)


@pytest.mark.parametrize("kind", sorted(CONFIG_CLASSES))
def test_every_field_is_documented(kind):
    missing = []
    for cls in _sections(_load(CONFIG_CLASSES[kind])):
        doc = " ".join(inspect.getdoc(c) or "" for c in cls.__mro__ if dataclasses.is_dataclass(c))
        for f in dataclasses.fields(cls):
            is_section = dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name])
            if not is_section and f.name not in doc and not (f.metadata.get("help") or _inherited_help(cls, f.name)):
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, missing


def test_unknown_and_ill_typed_fields_are_named():
    cls = _load(CONFIG_CLASSES["grpo"])
    with pytest.raises(ConfigError, match="grpo.learning_rat"):
        load_config(cls, None, ["grpo.learning_rat=1e-3"])
    with pytest.raises(ConfigError, match="grpo.max_steps"):
        load_config(cls, None, ["grpo.max_steps=many"])
    with pytest.raises(ConfigError, match="loss_type"):
        load_config(cls, None, ["grpo.loss_type=nope"])


@pytest.mark.parametrize("kind", ["pretrain", "sft", "grpo", "ppo", "compare"])
def test_every_old_name_fails_before_any_work_naming_the_new_one(kind, tmp_path):
    """A recipe written for an earlier esorl (before the one vocabulary) fails at load time,
    naming every renamed field it uses and what it is called now, all in one message."""
    cls = _load(CONFIG_CLASSES[kind])
    assert cls.RENAMED, kind
    for old, new in cls.RENAMED.items():
        said = f"{old} was removed" if new.startswith("removed") else f"{old} was renamed to {new.split()[0]}"
        with pytest.raises(ConfigError, match=said):
            load_config(cls, None, [f"{old}=1"])
    olds = list(cls.RENAMED)[:3]
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [f"{o}=1" for o in olds])
    assert all(o in str(e.value) for o in olds) and str(e.value).count(" was ") == len(olds)
    # nothing was written or built: no run directory appears
    assert not any(tmp_path.iterdir())


def test_training_arguments_use_transformers_names_and_schedule():
    """pretraining/SFT (training), PPO (ppo) and GRPO (grpo = trl.GRPOConfig) share the
    TrainingArguments names; the schedule is transformers' own (the factor its LambdaLR applies)."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    from esorl.rl.ppo import EsoPPOConfig
    from esorl.train.arguments import TrainingArgs, lr_factor
    from esorl.train.pretrain import PretrainArgs

    hf = {f.name for f in dataclasses.fields(TrainingArguments)}
    ours = {f.name for f in dataclasses.fields(TrainingArgs)} - {"attention_backend"}
    assert ours <= hf, ours - hf
    for cls in (PretrainArgs, EsoPPOConfig):
        assert ours <= {f.name for f in dataclasses.fields(cls)}
    for name, kw in (("linear", {}), ("cosine", {}), ("constant_with_warmup", {}), ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
                     ("warmup_stable_decay", {"num_decay_steps": 3})):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=2.0)
        sch = get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=10, scheduler_specific_kwargs=kw or None)
        for u in range(10):  # the LR transformers' Trainer uses for update u
            assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * lr_factor(u, name, 3, 10, kw)), (name, u)
            opt.step()
            sch.step()
    with pytest.raises(ConfigError, match="lr_scheduler_type"):
        load_config(_load(CONFIG_CLASSES["pretrain"]), None, ["training.lr_scheduler_type=cosine_with_min_lr"])  # needs min_lr_rate
    with pytest.raises(ConfigError, match="constant has no warm-up"):
        load_config(_load(CONFIG_CLASSES["ppo"]), None, ["ppo.warmup_steps=3"])
    with pytest.raises(ConfigError, match="lr_scheduler_type must be one of"):
        load_config(_load(CONFIG_CLASSES["ppo"]), None, ["ppo.lr_scheduler_type=reduce_lr_on_plateau"])
