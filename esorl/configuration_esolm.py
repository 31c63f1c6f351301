"""`EsoLMConfig`: the architecture of an Eso-LM (B) backbone (docs/ESOLM.md §9) at any size."""

from __future__ import annotations

from transformers import PretrainedConfig


def check_model_dir(path, what: str = "--model"):
    """A ``save_pretrained`` directory of an Eso-LM, or an error saying what the path is
    instead: ``FileNotFoundError`` (missing, no ``config.json`` — with a hint at
    ``<run>/model`` — or no weights), ``NotADirectoryError``, ``ValueError`` (another
    ``model_type``). ``what``: the flag or config field, for the message."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {path}: no such directory (esorl runs write their model to <output_dir>/model)")
    if not p.is_dir():
        raise NotADirectoryError(f"{what} {path}: is a file, expected a save_pretrained directory (config.json + model.safetensors)")
    cfg = p / "config.json"
    if not cfg.is_file():
        hint = f"; did you mean {p / 'model'}?" if (p / "model" / "config.json").is_file() else ""
        raise FileNotFoundError(f"{what} {path}: no config.json, so not a model directory{hint}")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path}: config.json is not valid JSON ({e})") from None
    if model_type != "esolm":
        raise ValueError(f"{what} {path}: a {model_type!r} model, not an Eso-LM (model_type 'esolm'); "
                         "convert released Eso-LM checkpoints with `esorl convert-official`")
    if not any(p.glob("*.safetensors")):
        raise FileNotFoundError(f"{what} {path}: config.json but no *.safetensors weights")
    return p


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
    # read by TRL when it rebuilds a reference model (trl.trainer.utils.create_model_from_path)
    auto_map = {}  # never mutated (no remote code); a class attribute, not a config field

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
