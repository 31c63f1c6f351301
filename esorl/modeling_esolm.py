"""The Eso-LM (B) backbone (docs/ESOLM.md §9) as a Hugging Face ``PreTrainedModel``.

One file a reader can hold in their head: a DiT-style transformer with adaLN gates whose
conditioning is a constant (time conditioning is off in Eso-LM (B)), rotary embeddings taken
from each token's *original position*, and attention under any mask built by
:mod:`esorl.attention`. The model knows nothing about schedules or RL: it maps
``(ids, positions, mask[, cache])`` to logits.

Training can recompute each block in the backward pass instead of keeping its activations
(gradient checkpointing, the ``transformers`` API: ``model.gradient_checkpointing_enable()``).

Parameter names follow the reference implementation (``vocab_embed.embedding``,
``blocks.{i}.attn_qkv.weight``, ...), so converting a released checkpoint is a key rename.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GenerationConfig, PreTrainedModel

from .attention import attend
from .configuration_esolm import EsoLMConfig


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # LayerNorm and softmax-adjacent maths run in float32 at least (as the reference does);
    # float64 stays float64 so tests can run the whole model in double precision.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, computed in float32 (reference ``LayerNorm``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            # one fused kernel; it normalises and applies the weight in float32 for bf16/fp16
            # inputs and rounds once, which is the reference's float32 LayerNorm
            return F.layer_norm(x, (x.shape[-1],), self.weight, None, self.eps)
        y = F.layer_norm(x.to(_compute_dtype(x)), (x.shape[-1],), eps=self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x · (1 + scale) + shift`` (adaLN), in one fused multiply-add."""
    return torch.addcmul(shift, x, 1 + scale)


class Rotary(nn.Module):
    """Rotate-half rotary embedding over the whole head dim; angles = original position × inv_freq."""

    def __init__(self, head_dim: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=True)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """``cos`` and *signed* ``sin`` of shape ``(B, 1, L, D)`` for integer positions
        ``(B, L)``: ``sin`` carries rotate-half's sign, ``[-sin θ | sin θ]``."""
        ang_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        ang = positions.to(ang_dtype)[..., None] * self.inv_freq.to(ang_dtype)
        cos, sin = ang.cos(), ang.sin()
        return torch.cat([cos, cos], dim=-1)[:, None].to(dtype), torch.cat([-sin, sin], dim=-1)[:, None].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary: ``x·cos + [-x2 | x1]·sin`` = ``x·cos + [x2 | x1]·[-sin | sin]``
    (three kernels: swap halves, multiply, multiply-add; any leading dims)."""
    swapped = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return torch.addcmul(x * cos, swapped, sin_signed)


class Block(nn.Module):
    """adaLN-gated pre-norm block; attention sees whatever the mask allows (docs/ESOLM.md §4)."""

    # set by ``PreTrainedModel.gradient_checkpointing_enable`` (with ``_gradient_checkpointing_func``);
    # :meth:`EsoLMModel.forward` decides when it applies
    gradient_checkpointing = False

    def __init__(self, config: EsoLMConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.norm1 = LayerNorm(d, config.layer_norm_eps)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.norm2 = LayerNorm(d, config.layer_norm_eps)
        self.mlp = nn.Sequential(nn.Linear(d, config.mlp_ratio * d), nn.GELU(approximate="tanh"), nn.Linear(config.mlp_ratio * d, d))
        self.adaLN_modulation = nn.Linear(config.cond_dim, 6 * d)
        self.dropout = config.dropout

    def attention(self, h, cos, sin, mask, cache, layer: int):
        B, L, _ = h.shape
        # qkv rows are laid out (three, head, head_dim) as in the reference.
        qkv = self.attn_qkv(h).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        v = qkv[2]
        # rotary on q and k together, in the angles' precision, then back to v's dtype (under
        # bf16 autocast q/k would otherwise stay float32 while v is bf16)
        q, k = apply_rotary(qkv[:2], cos, sin).to(v.dtype).unbind(0)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        out = attend(q, k, v, mask)
        return self.attn_out(out.transpose(1, 2).reshape(B, L, -1))

    def forward(self, x, c, cos, sin, mask, cache, layer):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        a = self.attention(h, cos, sin, mask, cache, layer)
        x = torch.addcmul(x, gate_msa, F.dropout(a, self.dropout, self.training))  # x + gate · a
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return torch.addcmul(x, gate_mlp, F.dropout(self.mlp(h), self.dropout, self.training))


class EmbeddingLayer(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, dim))

    def forward(self, ids):
        # F.embedding: its backward is a dense scatter-add, far faster than indexing's
        return F.embedding(ids, self.embedding)


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of σ → MLP; Eso-LM (B) always evaluates it at σ = 0."""

    def __init__(self, cond_dim: int, freq_size: int):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(nn.Linear(freq_size, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        half = self.freq_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class FinalLayer(nn.Module):
    def __init__(self, config: EsoLMConfig):
        super().__init__()
        self.norm_final = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.linear = nn.Linear(config.hidden_size, config.vocab_size)
        self.adaLN_modulation = nn.Linear(config.cond_dim, 2 * config.hidden_size)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class EsoLMModel(PreTrainedModel):
    """Eso-LM (B) backbone. ``forward(input_ids, positions, mask, ...) -> logits``.

    Inputs are in *array order*; ``positions`` gives each slot's original position (rotary),
    and ``mask`` (from :func:`esorl.attention.build_mask`) says who sees whom. The model never
    assumes array order equals position order.
    """

    config_class = EsoLMConfig
    base_model_prefix = "esolm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]

    def __init__(self, config: EsoLMConfig):
        super().__init__(config)
        # ``transformers`` only gives models that can ``generate()`` a generation config, but
        # trainers (TRL) read its special ids; the model's own sampler is esorl.sampling
        self.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
        )
        self.vocab_embed = EmbeddingLayer(config.vocab_size, config.hidden_size)
        self.sigma_map = TimestepEmbedder(config.cond_dim, config.frequency_embedding_size)
        self.rotary_emb = Rotary(config.head_dim, config.rotary_base)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layers)])
        self.output_layer = FinalLayer(config)
        self.post_init()
        # transformers 5 defers `_init_weights` to loading time; a model built from a config
        # must start from the reference init, so apply it here (a no-op on the meta device).
        with torch.no_grad():
            self.apply(self._init_weights)

    def _init_weights(self, module):
        # Reference DiT init: adaLN and output projections start at zero (each block starts as
        # the identity, logits start uniform); embeddings kaiming-uniform; other Linears default.
        if isinstance(module, EmbeddingLayer):
            nn.init.kaiming_uniform_(module.embedding, a=math.sqrt(5))
        elif isinstance(module, (Block, FinalLayer)):
            nn.init.zeros_(module.adaLN_modulation.weight)
            nn.init.zeros_(module.adaLN_modulation.bias)
            if isinstance(module, FinalLayer):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
        elif isinstance(module, Rotary):
            c = self.config
            module.inv_freq.copy_(1.0 / (c.rotary_base ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32) / c.head_dim)))
        elif isinstance(module, LayerNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):
        return self.vocab_embed

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, every_n_layers: int = 1):
        """Called by ``gradient_checkpointing_enable`` / ``_disable`` (``transformers``): sets
        each :class:`Block`'s flag and checkpoint function (``torch.utils.checkpoint`` with the
        caller's kwargs, e.g. ``use_reentrant``). ``every_n_layers``: checkpoint blocks 0, n,
        2n, ... only (the base class counts only its own layer type, so it is applied here)."""
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        for i, block in enumerate(self.blocks):
            block.gradient_checkpointing = enable and i % every_n_layers == 0

    def conditioning(self, batch_size: int = 1) -> torch.Tensor:
        """The adaLN input ``c = SiLU(MLP(sinusoid(σ = 0)))``: a constant ``(1, cond_dim)``."""
        sigma = torch.zeros(1, device=self.vocab_embed.embedding.device)
        return F.silu(self.sigma_map(sigma))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask=None,
        cache=None,
        logits_slice: slice | torch.Tensor | None = None,
        return_hidden: bool = False,
        raw_logits: bool = False,
    ):
        """Logits ``(B, L', vocab)`` of the array ``input_ids`` ``(B, L)``.

        Args:
            positions: ``(B, L)`` original positions (rotary).
            mask: dense bool ``(B, 1, L, Lk)`` or flex BlockMask, from :mod:`esorl.attention`
                (or an additive float mask of that shape: the static sampler's), or
                ``attention.CAUSAL`` / ``attention.FULL``. Required: ``None`` raises
                ``ValueError`` (an unmasked forward must be asked for as ``FULL``).
            cache: a KV cache of the samplers (:mod:`esorl.kv_cache`): anything with
                ``append(layer, k, v) -> (keys, values)`` to attend over (an ``EsoKVCache``
                appends the window after its cached slots, a ``StaticKVCache`` writes it to
                ``cache.slots``).
            logits_slice: compute the LM head only on these slots (saves ``L × vocab``
                memory, e.g. only the query copies of layout (a)): a slice or index tensor
                (logits ``(B, L', vocab)``), or a ``(B, L)`` bool mask (logits ``(M, vocab)``
                of the ``M`` selected slots in row-major order, e.g. the masked tokens of a
                training layout).
            return_hidden: also return the final hidden states ``(B, L, d)`` (value heads).
            raw_logits: keep the MASK logit; by default it is ``-inf`` (docs/ESOLM.md §1).

        With gradient checkpointing enabled, a block's activations are recomputed in the
        backward pass when the model is in training mode, gradients are on and no ``cache`` is
        given (a sampler's forward writes its cache and keeps no graph: it runs as is).
        Dropout is replayed exactly (``torch.utils.checkpoint`` restores the RNG state).
        """
        if mask is None:
            raise ValueError("EsoLMModel.forward: mask is required (the attention rule is what makes an Eso-LM): pass one from "
                             "esorl.attention.build_mask, attention.CAUSAL, or attention.FULL to ask for unmasked attention")
        if positions.shape != input_ids.shape:
            raise ValueError(f"EsoLMModel.forward: positions {tuple(positions.shape)} must have the shape of input_ids {tuple(input_ids.shape)}")
        # (checked on CPU only: on CUDA the check would synchronise every decoding step;
        # samplers and estimators validate lengths before they start)
        if not positions.is_cuda and positions.numel() and positions.max() >= self.config.max_seq_len:
            raise ValueError(f"position {int(positions.max())} exceeds the model's context max_seq_len={self.config.max_seq_len}")
        x = self.vocab_embed(input_ids)
        c = self.conditioning().to(x.dtype)
        cos, sin = self.rotary_emb(positions, x.dtype)
        # recompute whenever a backward will follow: also in eval mode, where RL's loss passes
        # run (dropout off, so that the policy scored equals the policy that sampled)
        recompute = cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute and block.gradient_checkpointing:
                # positional tensors (reentrant checkpointing only passes gradients to those);
                # non-tensor masks (CAUSAL / FULL, BlockMask, PrefixCausalMask) pass through as is
                x = block._gradient_checkpointing_func(block.forward, x, c, cos, sin, mask, None, i)
            else:
                x = block(x, c, cos, sin, mask, cache, i)
        hidden = x
        flat = isinstance(logits_slice, torch.Tensor) and logits_slice.dtype == torch.bool
        if flat:
            x = x[logits_slice][None]  # only the selected slots, flattened: (1, M, d)
        elif logits_slice is not None:
            x = x[:, logits_slice]
        logits = self.output_layer(x, c)
        if not raw_logits:
            # in place: the head's backward needs its input and weight, not its output
            logits[..., self.config.mask_token_id] = float("-inf")
        if flat:
            logits = logits[0]
        return (logits, hidden) if return_hidden else logits


def unwrap(model):
    """The :class:`EsoLMModel` inside DDP / DeepSpeed (``.module``), ``torch.compile``
    (``._orig_mod``) and peft (``PeftModel.get_base_model()``) wrappers, in any nesting;
    anything else is returned as is."""
    while not isinstance(model, EsoLMModel):
        if hasattr(model, "module"):
            inner = model.module
        elif hasattr(model, "_orig_mod"):
            inner = model._orig_mod
        elif hasattr(model, "get_base_model"):  # peft: PeftModel -> LoraModel -> the model
            inner = model.get_base_model()
        else:
            break
        if inner is model:
            break
        model = inner
    return model


def model_config(model) -> EsoLMConfig:
    """The :class:`EsoLMConfig` of the Eso-LM inside ``model`` (see :func:`unwrap`)."""
    return unwrap(model).config


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForMaskedLM`` / ``AutoModelForCausalLM``
    resolve ``model_type='esolm'`` (TRL rebuilds a reference model with
    ``AutoModelForCausalLM.from_pretrained(config._name_or_path)``). Idempotent."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    try:
        AutoConfig.register("esolm", EsoLMConfig)
    except ValueError:
        pass  # already registered
    for auto in (AutoModel, AutoModelForMaskedLM, AutoModelForCausalLM):
        try:
            auto.register(EsoLMConfig, EsoLMModel)
        except ValueError:
            pass


register_auto_classes()
