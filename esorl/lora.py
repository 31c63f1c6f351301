"""LoRA adapters for the Eso-LM with ``peft``: default targets, a config, and export of the
merged model as a plain Eso-LM directory.

The adapters go on each block's attention projections (``attn_qkv``, ``attn_out``) and MLP
linears (``mlp.0``, ``mlp.2``): the matrices that hold what a fine-tune changes. The adaLN
modulations (a constant conditioning in Eso-LM (B): they act as learned biases), the
embeddings, the σ-embedder and the output head stay frozen by default.

``peft.get_peft_model(model, lora_config())`` returns a plain ``PeftModel`` (``task_type``
None): its ``forward(*args, **kwargs)`` passes everything to the Eso-LM, so
``peft_model(input_ids, positions, mask, logits_slice=...)`` and every esorl estimator work
on it unchanged (``esorl.modeling_esolm.unwrap`` finds the Eso-LM inside). peft's task
types (``CAUSAL_LM``, ...) wrap ``forward`` with a transformers-style signature
(``input_ids, attention_mask, labels, ...``) that the Eso-LM does not have.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import copy
import re
from pathlib import Path

import torch.nn as nn

from .modeling_esolm import EsoLMModel, unwrap

#: the default targets as one regex over module names relative to the :class:`EsoLMModel`
#: (peft full-matches a string ``target_modules`` against each module's name)
DEFAULT_TARGET_REGEX = r"blocks\.\d+\.(attn_qkv|attn_out|mlp\.0|mlp\.2)"


def default_lora_target_modules(model) -> list[str]:
    """Names of the modules LoRA adapts by default: every block's ``attn_qkv``, ``attn_out``,
    ``mlp.0`` and ``mlp.2`` (``nn.Linear``), e.g. ``["blocks.0.attn_qkv", ...]``; not the
    adaLN modulations, embeddings, σ-embedder or output head.

    Names are relative to the :class:`EsoLMModel` (what ``get_peft_model`` is given); wrappers
    (DDP, compile, peft) are looked through. Full names, not suffixes: a suffix ``mlp.0``
    would also match the σ-embedder's ``sigma_map.mlp.0``. Raises ``TypeError`` if no
    Eso-LM is found inside ``model``.
    """
    m = unwrap(model)
    if not isinstance(m, EsoLMModel):
        raise TypeError(f"default_lora_target_modules: expected an EsoLMModel (or a wrapper of one), got {type(model).__name__}")
    # peft turns a targeted Linear into a LoRA layer that is no longer an nn.Linear but keeps
    # the original as ``base_layer``: look at the name, not only the type
    return [n for n, mod in m.named_modules() if re.fullmatch(DEFAULT_TARGET_REGEX, n) and (isinstance(mod, nn.Linear) or hasattr(mod, "base_layer"))]


def lora_config(r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0, target_modules=None):
    """A ``peft.LoraConfig`` for an Eso-LM.

    Args:
        r, lora_alpha: rank and scale (the update is ``(lora_alpha / r) · B A``; B starts at 0,
            so a fresh adapter leaves the model unchanged).
        lora_dropout: dropout on the adapter's input (training mode only).
        target_modules: module names (a list, e.g. :func:`default_lora_target_modules`) or a
            regex; ``None``: :data:`DEFAULT_TARGET_REGEX` (the same modules as
            :func:`default_lora_target_modules`, for any depth).

    ``task_type`` is left ``None``: ``get_peft_model`` then returns a ``PeftModel`` whose
    forward keeps the Eso-LM's signature (see the module docstring). No bias is trained.
    """
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, bias="none", task_type=None,
                      target_modules=DEFAULT_TARGET_REGEX if target_modules is None else target_modules)


def merge_and_export(peft_model, out_dir, in_place: bool = False) -> Path:
    """Merge the active LoRA adapters into the weights (``W + (alpha / r) · B A``) and write a
    plain Eso-LM ``save_pretrained`` directory (``config.json`` + ``model.safetensors``) that
    :meth:`EsoLMModel.from_pretrained` (or the ``Auto`` classes) loads without peft; its
    logits equal the adapted model's up to the rounding of the weights' dtype.

    Args:
        peft_model: a ``peft.PeftModel`` around an :class:`EsoLMModel` (DDP / DeepSpeed
            ``.module`` wrappers are looked through).
        out_dir: the directory to write (created).
        in_place: merge into ``peft_model`` itself (its adapters are gone afterwards, but no
            copy is made); default: merge a deep copy (twice the model's memory for a moment,
            on its device) and leave ``peft_model`` as it was.

    Returns the directory. Raises ``TypeError`` if ``peft_model`` is not a peft model, and
    ``ValueError`` (peft's ``safe_merge``) if a merged weight is not finite.
    """
    from peft import PeftModel

    pm = peft_model
    while not isinstance(pm, PeftModel) and hasattr(pm, "module"):
        pm = pm.module
    if not isinstance(pm, PeftModel):
        raise TypeError(f"merge_and_export: expected a peft.PeftModel, got {type(peft_model).__name__}")
    merged = (pm if in_place else copy.deepcopy(pm)).merge_and_unload(safe_merge=True)
    if not isinstance(merged, EsoLMModel):
        raise TypeError(f"merge_and_export: the peft model wraps a {type(merged).__name__}, not an EsoLMModel")
    out = Path(out_dir)
    merged.save_pretrained(out)
    return out


@dataclass
class LoraArgs:
    """LoRA adapters (peft) instead of full fine-tuning.

    enabled: train LoRA adapters only; the reference policy (``beta > 0``) is the base model
        with the adapters disabled, and the exported model has them merged.
    r / lora_alpha / lora_dropout: the adapters' rank, scale and dropout.
    target_modules: module names to adapt (default: every block's attention and MLP
        projections, :func:`esorl.lora.default_lora_target_modules`).
    """

    enabled: bool = False
    r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)

    def validate(self):
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")

    def apply(self, model):
        """``model`` wrapped by peft with these adapters (only they train), or ``model`` as is
        when not enabled."""
        if not self.enabled:
            return model
        from peft import get_peft_model

        return get_peft_model(model, lora_config(r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                                                 target_modules=self.target_modules or None))
