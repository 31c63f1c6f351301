"""Tokenizers: train small word-level / byte-level BPE tokenizers, load local or hub ones.

Every tokenizer this module returns is a :class:`transformers.PreTrainedTokenizerFast`
with a MASK token (Eso-LMs need one) and a PAD token that is *not* the MASK token.

Tokenizers we train put the special tokens at fixed ids::

    0 <pad>   1 <bos>   2 <eos>   3 <unk>   4 <mask>

Nothing is added automatically when encoding (no post-processor template): the data
pipeline (:func:`esorl.data.tokenize_and_pack`) places BOS/EOS itself, so the same code
path works for our tokenizers and for hub ones such as GPT-2.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "train_tokenizer",
    "load_tokenizer",
    "mask_token_id",
    "tokenizer_ids",
]

#: Special tokens of the tokenizers we train, in id order 0..4.
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<mask>")
PAD, BOS, EOS, UNK, MASK = SPECIAL_TOKENS

#: Mask token added to hub tokenizers that lack one (GPT-2: id 50257, vocab 50258).
HUB_MASK_TOKEN = "[MASK]"


def train_tokenizer(
    texts: Iterable[str],
    out_dir,
    kind: str = "word",
    vocab_size: int = 4096,
    min_frequency: int = 1,
) -> PreTrainedTokenizerFast:
    """Train a tokenizer on ``texts``, save it to ``out_dir`` and return it.

    ``kind``:

    * ``"word"`` – one token per whitespace-separated word (``WordLevel`` model with a
      ``WhitespaceSplit`` pre-tokenizer, case kept). Punctuation is split off only where the
      text already has spaces, so pre-tokenized text such as SST-2 (``"it 's not bad ,"``)
      keeps tokens like ``'s`` / ``n't`` whole and ``decode(encode(s)) == s`` exactly for
      single-space-separated text with in-vocabulary words. There is no decoder: the
      ``tokenizers`` library then joins tokens with single spaces, which is what we want.
    * ``"bpe"`` – byte-level BPE (GPT-2 style ``ByteLevel`` pre-tokenizer and decoder), so
      any text round-trips exactly and there are no unknown tokens.

    The ``vocab_size`` includes the 5 special tokens; words below ``min_frequency`` map to
    ``<unk>`` (word-level) or are never merged (BPE).
    """
    if kind not in ("word", "bpe"):
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'word' or 'bpe'")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")

    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            show_progress=False,
        )
    else:
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(SPECIAL_TOKENS) + len(alphabet):
            raise ValueError(
                f"a byte-level BPE vocab needs at least {len(SPECIAL_TOKENS) + len(alphabet)} entries "
                f"(5 special tokens + 256 bytes), got vocab_size={vocab_size}"
            )
        tok = Tokenizer(models.BPE(unk_token=None))  # byte-level: nothing is ever unknown
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=alphabet,  # all 256 bytes, even those absent from `texts`
            show_progress=False,
        )
    tok.train_from_iterator(texts, trainer=trainer)

    vocab = tok.get_vocab()
    for i, t in enumerate(SPECIAL_TOKENS):  # the trainer puts them first; make sure
        if vocab.get(t) != i:
            raise RuntimeError(f"special token {t!r} got id {vocab.get(t)}, expected {i}")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        mask_token=MASK,
        # "it 's" must not be "cleaned up" into "it's" on decode (round trip).
        clean_up_tokenization_spaces=False,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\", "..\\")) or Path(spec).expanduser().exists()


def _ensure_mask_and_pad(tok):
    """Give ``tok`` a MASK token (new ``[MASK]`` special token if missing) and a PAD token
    (EOS if missing), and check PAD != MASK, since padding positions must never look like
    masked positions to the model."""
    if tok.mask_token is None:
        # A *new* token: reusing an existing one (e.g. EOS) would make masked and real
        # tokens indistinguishable. For GPT-2 this becomes id 50257 (len(tok) == 50258).
        tok.add_special_tokens({"mask_token": HUB_MASK_TOKEN})
    if tok.pad_token is None:
        if tok.eos_token is not None:
            tok.pad_token = tok.eos_token
        else:
            tok.add_special_tokens({"pad_token": PAD})
    if tok.pad_token_id == tok.mask_token_id:
        raise ValueError(
            f"tokenizer pad token {tok.pad_token!r} has the same id ({tok.pad_token_id}) as the mask token; "
            "padding must be distinguishable from masking"
        )
    return tok


def load_tokenizer(spec: str) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local directory (saved by :func:`train_tokenizer` or
    ``save_pretrained``) or, failing that, from the Hugging Face hub (e.g. ``"gpt2"``).

    A tokenizer without a mask token gets ``[MASK]`` added as a new special token (GPT-2:
    mask id 50257, ``len(tok) == 50258``); one without a pad token gets ``pad = eos``.

    Raises ``FileNotFoundError`` naming ``spec`` when it is path-like but missing, or when
    it is neither a local tokenizer directory nor loadable from the hub (e.g. offline), and
    ``ValueError`` for a local path that is not a directory.
    """
    spec = str(spec)
    local = Path(spec).expanduser()
    if local.is_dir():
        try:
            tok = AutoTokenizer.from_pretrained(str(local), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - a dir holding only tokenizer.json still loads below
            try:
                tok = PreTrainedTokenizerFast.from_pretrained(str(local), local_files_only=True)
            except Exception as e2:  # noqa: BLE001
                raise ValueError(
                    f"directory {spec!r} does not hold a loadable tokenizer "
                    f"(AutoTokenizer: {e}; PreTrainedTokenizerFast: {e2})"
                ) from e2
    elif local.exists():
        raise ValueError(f"tokenizer spec {spec!r} is a file; pass the directory that holds tokenizer.json")
    elif _looks_like_path(spec):
        raise FileNotFoundError(f"tokenizer directory {spec!r} does not exist")
    else:
        try:
            tok = AutoTokenizer.from_pretrained(spec)
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated repo, ...
            raise FileNotFoundError(
                f"could not load tokenizer {spec!r}: it is not a local directory and loading it "
                f"from the Hugging Face hub failed ({type(e).__name__}: {e})"
            ) from e
    return _ensure_mask_and_pad(tok)


def mask_token_id(tok) -> int:
    """The MASK id of ``tok``; ``ValueError`` if it has none (use :func:`load_tokenizer`)."""
    if tok.mask_token_id is None:
        raise ValueError("tokenizer has no mask token; load it with esorl.data.load_tokenizer to add one")
    return int(tok.mask_token_id)


def tokenizer_ids(tok) -> dict:
    """``{pad, bos, eos, mask, vocab_size}`` of ``tok``; ids may be ``None`` when absent
    (e.g. no BOS). ``vocab_size`` is ``len(tok)``, i.e. it counts added tokens such as
    GPT-2's ``[MASK]`` – size the embedding with it."""

    def _id(x):
        return None if x is None else int(x)

    return dict(
        pad=_id(tok.pad_token_id),
        bos=_id(tok.bos_token_id),
        eos=_id(tok.eos_token_id),
        mask=_id(tok.mask_token_id),
        vocab_size=len(tok),
    )
