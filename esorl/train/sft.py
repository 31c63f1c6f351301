"""``esorl sft``: prompt-conditional fine-tuning of an Eso-LM on prompt/completion pairs.

The released checkpoints are unconditional, so RL needs a model that has learned to continue
a prompt first (as d1 does before RL). Each row is ``[BOS]? prompt completion EOS`` (pad
mode); the prompt is clean context at step 0 for both terms of the hybrid objective (docs/ESOLM.md
§4/§5/§7): never masked, never scored, first in the array left to right, and the loss is
normalised by the number of completion tokens (:func:`esorl.objective.hybrid_loss` with
``prompt_mask``). Prompts are encoded exactly as the RL policy encodes them
(:meth:`esorl.policy.EsoPolicy.encode_prompts`: the tokenizer's BOS, then the prompt), so an
SFT model sees at RL time the context it was fine-tuned on.

The training loop is the pretraining one (:class:`esorl.train.pretrain.PretrainLoop` on
:class:`esorl.train.loop.TrainLoop`:
accelerate, DDP / DeepSpeed, checkpoints and exact ``--resume``, EMA, evaluation NELBO on the
held-out completions, ``metrics.jsonl``, wandb, export of ``<output_dir>/model``)::

    esorl sft --config recipes/sft/synthetic_prompt_cpu.yaml [key=value ...] [--resume]
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m esorl.cli sft --config recipes/sft/gsm8k_owt.yaml
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_config
from ..data.pairs import SFTDataConfig, prepare_pair_data
from .pretrain import PretrainArgs, PretrainConfig, run_pretrain


@dataclass
class SFTModelArgs:
    """The model to fine-tune.

    init_from: a ``save_pretrained`` directory (required): ``<pretrain run>/model`` or a
        released checkpoint converted with ``esorl convert-official``. Its architecture and
        dropout are used as saved.
    pretrain_recipe: if ``init_from`` does not exist yet, run this pretraining recipe first
        (with ``training.output_dir`` set to ``init_from``'s parent); empty = require the model.
    pretrain_overrides: ``key=value`` overrides for that pretraining run.
    """

    init_from: str = ""
    pretrain_recipe: str = ""
    pretrain_overrides: list[str] = field(default_factory=list)

    def validate(self):
        if not self.init_from:
            raise ValueError("model.init_from is required for SFT: a save_pretrained directory (e.g. runs/pretrain_synthetic_cpu/model "
                             "or the output of `esorl convert-official`)")


@dataclass
class SFTArgs(PretrainArgs):
    __doc__ = PretrainArgs.__doc__
    output_dir: str = "runs/sft"


@dataclass
class SFTConfig(PretrainConfig):
    """An SFT recipe: the model to start from, prompt/completion data, the hybrid objective
    on completion tokens (prompt clean at step 0), ``training`` (the loop:
    ``transformers.TrainingArguments`` names), ``lora`` (train adapters only; the exported
    model has them merged), ``logging`` (wandb). The pretraining recipe's sections, with
    SFT's model and data."""

    model: SFTModelArgs = field(default_factory=SFTModelArgs)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    training: SFTArgs = field(default_factory=SFTArgs)


def prepare_sft_data(cfg: SFTConfig, model_dir: str | None = None):
    """The recipe's tokenizer and tensors (:func:`esorl.data.pairs.prepare_pair_data`)."""
    return prepare_pair_data(cfg.data, model_dir or cfg.model.init_from, cfg.training.seed)


def ensure_model(args: SFTModelArgs) -> Path:
    """The starting model directory; runs ``pretrain_recipe`` first if it does not exist yet."""
    from .pretrain import ensure_pretrained

    return ensure_pretrained(args, "model")


def run_sft(cfg: SFTConfig, resume: str | bool = False, overwrite: bool = False) -> dict:
    """Fine-tune; returns ``{"output_dir", "model_dir", "metrics"}``. Writes
    ``<training.output_dir>/{metrics.jsonl, config.yaml, checkpoints/, model/}`` like pretraining.
    ``train/loss`` and ``val/nelbo`` are per completion token (the prompt is never scored)."""
    model_dir = ensure_model(cfg.model)
    if str(model_dir) != cfg.model.init_from:
        cfg.model.init_from = str(model_dir)
    return run_pretrain(cfg, resume, data_fn=lambda: prepare_sft_data(cfg, str(model_dir)), name="sft", overwrite=overwrite)


def main(argv=None):
    from ..config import parse_recipe_args, recipe_argparser

    a = parse_recipe_args(recipe_argparser("esorl sft", __doc__.split("\n")[0], "training.learning_rate=1e-4"), argv)
    cfg = load_config(SFTConfig, a.config, a.overrides)
    res = run_sft(cfg, a.resume, a.overwrite)
    print(f"[esorl] model written to {res['model_dir']}")
