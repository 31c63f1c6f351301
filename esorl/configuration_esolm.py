"""`EsoLMConfig`: the architecture of an Eso-LM (B) backbone (spec §9) at any size."""

from __future__ import annotations

from transformers import PretrainedConfig


class EsoLMConfig(PretrainedConfig):
    """Configuration of :class:`esorl.modeling_esolm.EsoLMModel`.

    Args:
        vocab_size: number of ids the model embeds and predicts, *including* ``MASK``
            (GPT-2: 50258 = 50257 + MASK).
        mask_token_id: id of ``MASK`` (its logit is set to ``-inf`` before any softmax).
        hidden_size, n_layers, n_heads: transformer width, depth, heads.
        cond_dim: width of the adaLN conditioning vector (128 for Eso-LM (B) small).
        mlp_ratio: MLP hidden = ``mlp_ratio * hidden_size``.
        max_seq_len: the model's context in *positions* (rotary angles come from original
            positions, so a layout of ``P + 2N`` tokens only needs ``P + N <= max_seq_len``).
        rotary_base: rotary base (10000).
        dropout: residual-branch dropout in training (the reference uses 0.1).
        layer_norm_eps: LayerNorm epsilon (1e-5).
        frequency_embedding_size: size of the sinusoidal embedding of σ (256).
        pad_token_id / eos_token_id / bos_token_id: tokenizer ids the toolkit needs; a
            pad id equal to ``mask_token_id`` (the released GPT-2 checkpoints) is allowed
            but the toolkit never *feeds* pad ids to the model (pads are masked out).
    """

    model_type = "esolm"

    def __init__(
        self,
        vocab_size: int = 50258,
        mask_token_id: int = 50257,
        hidden_size: int = 768,
        n_layers: int = 12,
        n_heads: int = 12,
        cond_dim: int = 128,
        mlp_ratio: int = 4,
        max_seq_len: int = 1024,
        rotary_base: float = 10000.0,
        dropout: float = 0.1,
        layer_norm_eps: float = 1e-5,
        frequency_embedding_size: int = 256,
        pad_token_id: int | None = None,
        eos_token_id: int | None = None,
        bos_token_id: int | None = None,
        **kwargs,
    ):
        if hidden_size % n_heads != 0:
            raise ValueError(f"EsoLMConfig: hidden_size={hidden_size} must be divisible by n_heads={n_heads}")
        if (hidden_size // n_heads) % 2 != 0:
            raise ValueError(f"EsoLMConfig: head_dim={hidden_size // n_heads} must be even for rotary embeddings")
        if not 0 <= mask_token_id < vocab_size:
            raise ValueError(f"EsoLMConfig: mask_token_id={mask_token_id} must be in [0, vocab_size={vocab_size})")
        self.vocab_size = vocab_size
        self.mask_token_id = mask_token_id
        self.hidden_size = hidden_size
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.cond_dim = cond_dim
        self.mlp_ratio = mlp_ratio
        self.max_seq_len = max_seq_len
        self.rotary_base = rotary_base
        self.dropout = dropout
        self.layer_norm_eps = layer_norm_eps
        self.frequency_embedding_size = frequency_embedding_size
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=bos_token_id, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads
