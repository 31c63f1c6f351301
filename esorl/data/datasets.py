"""Loading text / prompt-completion data with 🤗 ``datasets``, and packing it into tensors.

Sources accepted everywhere (``source`` argument):

* a local file: ``.txt`` (one example per non-empty line), ``.tsv`` (``text<TAB>label``
  without header – the SST-2 format of ``shared/data/sst2``; the label is optional),
  ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` (named columns);
* a local directory holding ``{split}.tsv|.jsonl|.json|.txt|.csv|.parquet`` (``dev`` and
  ``validation`` are interchangeable), e.g. ``shared/data/sst2`` + ``split="dev"``;
* anything else is a hub dataset name or a ``datasets`` builder (``"json"`` with
  ``data_files=``), loaded with :func:`datasets.load_dataset` – for users with a network.
"""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import torch

__all__ = [
    "load_text_dataset",
    "load_prompt_completion_dataset",
    "tokenize_and_pack",
    "split_train_eval",
]

_EXTENSIONS = (".tsv", ".jsonl", ".json", ".txt", ".csv", ".parquet")
# Split names that mean the same thing in different datasets (GLUE calls SST-2's dev
# split "validation").
_SPLIT_ALIASES = {
    "dev": ("dev", "validation", "valid", "val"),
    "validation": ("validation", "dev", "valid", "val"),
    "valid": ("valid", "validation", "dev", "val"),
    "val": ("val", "validation", "dev", "valid"),
}
_TOKENIZE_BATCH = 1000


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    """True when ``source`` can only mean a local path (so a missing one is an error rather
    than a hub lookup). Hub names look like ``"owner/name"`` and have no file suffix."""
    return (
        source.startswith(("/", "./", "../", "~", ".\\", "..\\"))
        or Path(source).suffix.lower() in _EXTENSIONS
        or Path(source).expanduser().exists()
    )


def _is_blank_file(path: Path) -> bool:
    """True when the file holds only whitespace (reads up to the first non-blank line)."""
    with open(path, encoding="utf-8") as f:
        return all(not line.strip() for line in f)


def _read_txt(path: Path) -> datasets.Dataset:
    with open(path, encoding="utf-8") as f:
        # Keep inner/leading whitespace (indentation may matter), drop the line ending.
        texts = [line.rstrip("\r\n") for line in f if line.strip()]
    return datasets.Dataset.from_dict({"text": texts})


def _read_tsv(path: Path) -> datasets.Dataset:
    """``text<TAB>label`` lines. Parsed by hand rather than with the csv builder: SST-2 text
    contains quote characters that a CSV parser would treat as field delimiters."""
    texts: list[str] = []
    labels: list[int | None] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            text, sep, last = line.rpartition("\t")
            label = None
            if sep:
                try:
                    label = int(last)
                except ValueError:
                    text = line  # a tab inside unlabelled text
            else:
                text = line
            texts.append(text)
            labels.append(label)
    with_label = [lab is not None for lab in labels]
    if any(with_label) and not all(with_label):
        first = with_label.index(False) if with_label[0] else with_label.index(True)
        raise ValueError(
            f"{path}: some lines have an integer label after the last TAB and some do not "
            f"(first inconsistent line: {_nth_nonblank_lineno(path, first)})"
        )
    columns: dict[str, list] = {"text": texts}
    if texts and all(with_label):
        columns["label"] = labels
    return datasets.Dataset.from_dict(columns)


def _nth_nonblank_lineno(path: Path, n: int) -> int:
    with open(path, encoding="utf-8") as f:
        k = -1
        for lineno, line in enumerate(f, 1):
            if line.strip():
                k += 1
                if k == n:
                    return lineno
    return -1


def _load_file(path: Path, split: str) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix not in _EXTENSIONS:
        raise ValueError(f"unsupported file type {path} (split {split!r}); expected one of {', '.join(_EXTENSIONS)}")
    if path.stat().st_size == 0 or (suffix != ".parquet" and _is_blank_file(path)):
        raise ValueError(f"data file {path} (split {split!r}) is empty")
    if suffix == ".txt":
        ds = _read_txt(path)
    elif suffix == ".tsv":
        ds = _read_tsv(path)
    else:
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[suffix]
        # `split="train"`: a single data file is always the builder's "train" split.
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except ValueError as e:
            if "no data" not in str(e):  # e.g. a CSV with a header line only
                raise
            raise ValueError(f"data file {path} (split {split!r}) is empty: it holds no examples") from e
    if len(ds) == 0:
        raise ValueError(f"data file {path} (split {split!r}) is empty: it holds no examples")
    return ds


def _find_split_file(directory: Path, split: str) -> Path:
    names = _SPLIT_ALIASES.get(split, (split,))
    for name in names:
        for ext in _EXTENSIONS:
            candidate = directory / f"{name}{ext}"
            if candidate.is_file():
                return candidate
    present = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"no file for split {split!r} in directory {directory}: looked for "
        f"{{{','.join(names)}}}{{{','.join(_EXTENSIONS)}}}; the directory holds {present}"
    )


def _load_hub(source: str, split: str, data_files: dict | None) -> datasets.Dataset:
    splits = _SPLIT_ALIASES.get(split, (split,))
    errors = []
    for name in splits:
        try:
            return datasets.load_dataset(source, split=name, data_files=data_files)
        except ValueError as e:  # unknown split: try the alias ("dev" -> "validation")
            if "split" not in str(e).lower():
                errors.append(e)
                break
            errors.append(e)
        except Exception as e:  # noqa: BLE001 - offline, no such dataset, ...
            errors.append(e)
            break
    last = errors[-1]
    raise FileNotFoundError(
        f"{source!r} (split {split!r}) is not a local file or directory, and loading it with "
        f"datasets.load_dataset failed ({type(last).__name__}: {last})"
    ) from last


#: local data the shipped recipes read from ``../shared/data/<name>`` (present on the project's
#: own machines, not in a clone): what it is, its hub name, and the expected local format
KNOWN_DATA = {
    "sst2": ("the SST-2 sentence-level sentiment data (Socher et al. 2013)", "stanfordnlp/sst2",
             "train.tsv / dev.tsv / test.tsv with `text<TAB>label` lines"),
    "gsm8k": ("GSM8K (OpenAI, MIT licence)", "openai/gsm8k",
              "train.jsonl / test.jsonl with question and answer fields (hub config 'main')"),
    "tinyshakespeare": ("the Tiny Shakespeare corpus", "karpathy/tiny_shakespeare", "input.txt"),
}


def _load_raw(source, split: str, data_files: dict | None) -> datasets.Dataset:
    """The dataset behind ``source``/``split`` with its original columns (``.txt`` gives
    ``text``; ``.tsv`` gives ``text`` and, when labelled, ``label``)."""
    source = str(source)
    path = Path(source).expanduser()
    if path.is_file():
        return _load_file(path, split)
    if path.is_dir():
        return _load_file(_find_split_file(path, split), split)
    if _looks_like_path(source):
        hint = KNOWN_DATA.get(path.name)
        raise FileNotFoundError(
            f"data path {source} (split {split!r}) does not exist"
            + (f". This is {hint[0]}, not part of the repository: with a network use the hub name ({hint[1]!r}) as the source, "
               f"or save it locally as {hint[2]} and point the recipe at that directory" if hint else
               ". Point the recipe's source at an existing file or directory, or at a hub dataset name"))
    return _load_hub(source, split, data_files)


def _require_column(ds: datasets.Dataset, column: str, source, split: str) -> None:
    if column not in ds.column_names:
        raise KeyError(
            f"column {column!r} not found in {source} (split {split!r}); available columns: {ds.column_names}"
        )


def _cast_label(ds: datasets.Dataset, source, split: str) -> datasets.Dataset:
    if ds.features["label"] == datasets.Value("int64"):
        return ds
    try:
        return ds.cast_column("label", datasets.Value("int64"))
    except Exception as e:  # noqa: BLE001 - e.g. "positive"/"negative" strings
        raise ValueError(f"labels of {source} (split {split!r}) are not integers: {e}") from e


def load_text_dataset(
    source: str,
    split: str = "train",
    text_field: str = "text",
    label_field: str | None = None,
    data_files: dict | None = None,
) -> datasets.Dataset:
    """A :class:`datasets.Dataset` with a ``text`` column and, if the data has one, an int
    ``label`` column (and no other columns).

    ``text_field`` / ``label_field`` name the source columns (renamed to ``text`` /
    ``label``). With ``label_field=None`` a column literally called ``label`` is kept if
    present. ``data_files`` is passed to :func:`datasets.load_dataset` for hub/builder
    sources.

    Raises ``FileNotFoundError`` (missing path, no file for ``split`` in a directory, hub
    load failure), ``ValueError`` (empty file, non-integer labels) and ``KeyError``
    (missing column; the message lists the available columns).
    """
    ds = _load_raw(source, split, data_files)
    _require_column(ds, text_field, source, split)
    if label_field is not None:
        _require_column(ds, label_field, source, split)
    elif "label" in ds.column_names:
        label_field = "label"

    keep = [text_field] + ([label_field] if label_field is not None else [])
    ds = ds.select_columns(keep)
    rename = {text_field: "text"}
    if label_field is not None:
        rename[label_field] = "label"
    ds = ds.rename_columns({k: v for k, v in rename.items() if k != v})
    if "label" in ds.column_names:
        ds = _cast_label(ds, source, split)
    if len(ds) == 0:
        raise ValueError(f"{source} (split {split!r}) is empty")
    return ds


def load_prompt_completion_dataset(
    source: str,
    split: str = "train",
    prompt_field: str = "prompt",
    completion_field: str | None = "completion",
    data_files: dict | None = None,
) -> datasets.Dataset:
    """A dataset with ``prompt`` (and ``completion``) columns for SFT / RL prompts.

    ``prompt``/``completion`` are *copied* from ``prompt_field``/``completion_field`` and
    all source columns are kept as they are, so e.g. GSM8K loaded with
    ``prompt_field="question", completion_field="answer"`` still has ``answer`` for a
    verifiable reward. ``completion_field=None`` loads prompts only (RL). Same sources and
    errors as :func:`load_text_dataset`.
    """
    ds = _load_raw(source, split, data_files)
    _require_column(ds, prompt_field, source, split)
    if completion_field is not None:
        _require_column(ds, completion_field, source, split)
    for target, field in (("prompt", prompt_field), ("completion", completion_field)):
        if field is None or field == target:
            continue
        if target in ds.column_names:
            ds = ds.remove_columns(target)  # the chosen field wins over a same-named column
        ds = ds.add_column(target, ds[field])
    if len(ds) == 0:
        raise ValueError(f"{source} (split {split!r}) is empty")
    return ds


# ---------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------


def _texts_of(texts) -> list[str]:
    if isinstance(texts, datasets.Dataset):
        if "text" not in texts.column_names:
            raise KeyError(f"dataset has no 'text' column; available columns: {texts.column_names}")
        return texts["text"]
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings or a Dataset, not a single string")
    return list(texts)


def _encode(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids per document, without special tokens, tokenized in batches (fast
    tokenizers parallelise a batch in Rust)."""
    ids: list[list[int]] = []
    for i in range(0, len(texts), _TOKENIZE_BATCH):
        batch = texts[i : i + _TOKENIZE_BATCH]
        enc = tokenizer(
            batch,
            add_special_tokens=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,  # no "sequence longer than model_max_length" warnings: we cut ourselves
        )
        ids.extend(enc["input_ids"])
    return ids


def _special_id(tokenizer, name: str, why: str) -> int:
    value = getattr(tokenizer, f"{name}_token_id")
    if value is None:
        raise ValueError(f"tokenizer has no {name} token, needed {why}")
    return int(value)


def tokenize_and_pack(
    texts,
    tokenizer,
    max_length: int,
    mode: str = "wrap",
    add_eos: bool = True,
    add_bos: bool = False,
    truncate: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenize documents and pack them into fixed-length rows.

    ``texts`` is a list of strings or a :class:`datasets.Dataset` with a ``text`` column.
    Each document becomes ``[BOS]? tokens [EOS]?`` (``add_bos`` / ``add_eos``).

    * ``mode="wrap"``: all documents are concatenated into one stream (EOS separates them
      when ``add_eos``) and cut into ``N = len(stream) // max_length`` full windows; the tail
      is dropped and every position is valid. Empty documents are skipped.
    * ``mode="pad"``: one row per document, in input order (row ``i`` is ``texts[i]``, so
      labels stay aligned), right-padded with the pad id. A document longer than
      ``max_length`` is a ``ValueError`` unless ``truncate=True`` (then it is cut to
      ``max_length`` tokens and its EOS is lost, truthfully: the document did not end there).

    Returns ``{"input_ids": (N, max_length) long, "valid": (N, max_length) bool}`` where ``valid``
    is False exactly on padding. Raises ``ValueError`` when no row can be produced.
    """
    if mode not in ("wrap", "pad"):
        raise ValueError(f"unknown packing mode {mode!r}; expected 'wrap' or 'pad'")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    docs = _texts_of(texts)
    if not docs:
        raise ValueError("tokenize_and_pack got no documents")
    prefix = [_special_id(tokenizer, "bos", "for add_bos=True")] if add_bos else []
    suffix = [_special_id(tokenizer, "eos", "for add_eos=True")] if add_eos else []
    encoded = _encode(docs, tokenizer)

    if mode == "wrap":
        stream: list[int] = []
        for toks in encoded:
            if toks:  # an empty line would only add a stray BOS/EOS to the stream
                stream.extend(prefix)
                stream.extend(toks)
                stream.extend(suffix)
        n_rows = len(stream) // max_length
        if n_rows == 0:
            raise ValueError(
                f"wrap packing produced no rows: the corpus is {len(stream)} tokens long "
                f"({len(docs)} documents, special tokens included), shorter than one window of max_length={max_length}"
            )
        input_ids = torch.tensor(stream[: n_rows * max_length], dtype=torch.long).view(n_rows, max_length)
        return {"input_ids": input_ids, "valid": torch.ones(n_rows, max_length, dtype=torch.bool)}

    pad_id = _special_id(tokenizer, "pad", "for mode='pad'")
    input_ids = torch.full((len(encoded), max_length), pad_id, dtype=torch.long)
    valid = torch.zeros(len(encoded), max_length, dtype=torch.bool)
    for i, toks in enumerate(encoded):
        row = prefix + toks + suffix
        if len(row) > max_length:
            if not truncate:
                raise ValueError(
                    f"document {i} is {len(row)} tokens long (special tokens included), "
                    f"longer than max_length={max_length}; raise max_length or pass truncate=True"
                )
            row = row[:max_length]
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        valid[i, : len(row)] = True
    return {"input_ids": input_ids, "valid": valid}


def split_train_eval(
    tensors: dict[str, torch.Tensor], eval_fraction: float, seed: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split the rows of ``tensors`` (all sharing dim 0, ``N``) into ``(train, eval)``.

    ``round(N * eval_fraction)`` rows (at least 1 when ``eval_fraction > 0``) go to eval.
    The choice depends only on ``N`` and ``seed`` (Python's :class:`random.Random`, stable
    across machines and torch versions); both parts keep the original row order.
    """
    if not tensors:
        raise ValueError("split_train_eval got no tensors")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    sizes = {k: v.shape[0] for k, v in tensors.items()}
    n = next(iter(sizes.values()))
    if any(s != n for s in sizes.values()):
        raise ValueError(f"tensors disagree on the number of rows: {sizes}")
    n_eval = round(n * eval_fraction)
    if eval_fraction > 0:
        n_eval = max(n_eval, 1)
    if n_eval >= n:
        raise ValueError(f"eval_fraction={eval_fraction} of {n} rows leaves no training rows")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    eval_idx = torch.tensor(sorted(perm[:n_eval]), dtype=torch.long)
    train_idx = torch.tensor(sorted(perm[n_eval:]), dtype=torch.long)
    train = {k: v.index_select(0, train_idx) for k, v in tensors.items()}
    evals = {k: v.index_select(0, eval_idx) for k, v in tensors.items()}
    return train, evals
