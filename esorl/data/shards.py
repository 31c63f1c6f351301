"""Corpus-scale pretraining data: token ids in memory-mapped shards on disk.

``prepare_shards`` tokenizes a corpus once (Hugging Face ``datasets``, ``num_proc`` workers)
into ``<root>/<split>-NNNNN.bin`` files of token ids (``uint16`` when the vocabulary fits,
else ``uint32``; every document followed by EOS, preceded by BOS with ``add_bos``), one
``<split>-NNNNN.docs.npy`` of document start offsets per shard, and ``index.json`` (dtype,
token and document counts, tokenizer hash, source fingerprint). Shards are written
atomically one at a time, so an interrupted preparation resumes where it stopped and yields
the same files; a second call with the same inputs only checks the index; a changed
tokenizer or source is refused (``rebuild=True`` starts over).

:class:`ShardedSplit` reads fixed-length rows straight from the memory maps: ``wrap``
windows of the concatenated stream or one document per row (``pad``). It looks like the
in-memory ``{"input_ids", "valid"}`` tensors of :func:`esorl.data.tokenize_and_pack`
(``split["input_ids"][rows]``), so the training loop is the same for both; the memory a
training process needs does not grow with the corpus (only the pages it reads are mapped in).

The held-out split is made of *documents* (a source split, or a seeded ``eval_fraction`` of the
training documents), never of windows, so no held-out text appears in training windows.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..io import atomic_save, atomic_write

import numpy as np
import torch

INDEX = "index.json"
VERSION = 1
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class ShardError(RuntimeError):
    """A shard directory is incomplete, corrupted or was made from other inputs; the message
    names the file."""


# ----------------------------------------------------------------------------- permutation


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """splitmix64 finaliser of ``x + key`` (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(key & 0xFFFFFFFFFFFFFFFF) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def permute(j, n: int, *key: int) -> np.ndarray:
    """A seeded bijection of ``[0, n)``, evaluated elementwise: ``permute(arange(n), n, k)`` is
    a permutation of ``arange(n)`` that depends only on ``key``.

    A 4-round Feistel network on ``2·h`` bits (``4^h ≥ n``) with cycle walking, so any single
    position costs O(1) time and memory whatever ``n`` (no ``randperm(n)`` per epoch)."""
    j = np.asarray(j, dtype=np.int64)
    if n < 1:
        raise ValueError(f"permute: n must be >= 1, got {n}")
    if j.size and (j.min() < 0 or j.max() >= n):
        raise ValueError(f"permute: indices must be in [0, {n})")
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)
    k = 0
    for v in key:
        k = int(_mix(np.array([k ^ (v & 0xFFFFFFFFFFFFFFFF)], dtype=np.uint64), 0)[0])
    keys = [int(_mix(np.array([r], dtype=np.uint64), k)[0]) for r in range(4)]
    x = j.astype(np.uint64)
    todo = np.ones(x.shape, dtype=bool)
    while todo.any():
        y = x[todo]
        left, right = y >> np.uint64(half), y & mask
        for kr in keys:
            left, right = right, left ^ (_mix(right, kr) & mask)
        y = (left << np.uint64(half)) | right
        x[todo] = y
        todo[todo] = y >= np.uint64(n)  # cycle walking: outside [0, n) → apply again
    return x.astype(np.int64)


# ----------------------------------------------------------------------------- preparation


def tokenizer_hash(tok) -> str:
    """sha256 of the tokenizer's full definition (vocabulary, merges, special tokens)."""
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    specials = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, getattr(tok, "mask_token_id", None)]
    return hashlib.sha256((text + json.dumps(specials)).encode()).hexdigest()[:16]


def open_corpus(source: str, split: str, text_field: str = "text"):
    """A ``datasets.Dataset`` with a ``text`` column, memory-mapped (Arrow) where the format
    allows: ``.txt`` (one document per non-blank line), ``.jsonl``/``.json``, ``.parquet``,
    ``.csv``, a directory holding ``<split>.<ext>``, or a hub dataset name. (``.tsv`` goes
    through esorl's own reader.) Its ``_fingerprint`` identifies the content."""
    import datasets

    from .datasets import _find_split_file, load_text_dataset

    path = Path(source).expanduser()
    if path.is_dir():
        path = _find_split_file(path, split)
    builders = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if path.is_file() and path.suffix in builders:
        ds = datasets.load_dataset(builders[path.suffix], data_files={"train": str(path)}, split="train")
        if text_field not in ds.column_names:
            raise KeyError(f"column {text_field!r} not found in {path}; available columns: {ds.column_names}")
        ds = ds.select_columns([text_field])
        if text_field != "text":
            ds = ds.rename_column(text_field, "text")
        return ds.filter(lambda b: [bool(t and t.strip()) for t in b["text"]], batched=True)
    # .tsv, a hub name, or a missing path (esorl's loader raises the explanatory error)
    return load_text_dataset(source, split=split, text_field=text_field)


@dataclass
class ShardPlan:
    """What a preparation is made of (everything that changes the tokens)."""

    source: str
    split: str
    text_field: str
    eval_split: str
    eval_fraction: float
    seed: int
    add_bos: bool
    docs_per_shard: int


def _fingerprint(ds) -> str:
    return getattr(ds, "_fingerprint", None) or hashlib.sha256(str(len(ds)).encode()).hexdigest()[:16]


def _save_npy(path: Path, array) -> None:
    with open(path, "wb") as f:  # (np.save on a path would append .npy to the temporary name)
        np.save(f, array)


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, data)


def prepare_shards(plan: ShardPlan, tok, root: str | Path, num_proc: int = 1, rebuild: bool = False, progress: bool = True) -> Path:
    """Tokenize the corpus into ``root`` (see the module docstring); returns ``root``.

    Raises :class:`ShardError` if ``root`` holds shards of another tokenizer or source
    (unless ``rebuild``), ``FileNotFoundError``/``KeyError`` for a missing source/column."""
    from tqdm.auto import tqdm

    root = Path(root)
    if tok.eos_token_id is None:
        raise ValueError("sharded pretraining needs a tokenizer with an EOS token (documents are separated by EOS)")
    if plan.add_bos and tok.bos_token_id is None:
        raise ValueError("data.add_bos needs a tokenizer with a BOS token")
    thash = tokenizer_hash(tok)
    vocab = len(tok)
    dtype = "uint16" if vocab <= np.iinfo(np.uint16).max + 1 else "uint32"
    splits = {"train": open_corpus(plan.source, plan.split, plan.text_field)}
    if plan.eval_split:
        splits["eval"] = open_corpus(plan.source, plan.eval_split, plan.text_field)
    source_fp = hashlib.sha256(json.dumps({k: _fingerprint(v) for k, v in splits.items()}).encode()).hexdigest()[:16]
    want = {"version": VERSION, "tokenizer_hash": thash, "source_fingerprint": source_fp, "dtype": dtype, "vocab_size": vocab,
            "plan": plan.__dict__}
    idx_f = root / INDEX
    if idx_f.exists() or (root / "progress.json").exists():
        have = json.loads((idx_f if idx_f.exists() else root / "progress.json").read_text())
        diff = [k for k in ("tokenizer_hash", "source_fingerprint", "dtype", "plan", "version") if have.get(k) != want[k]]
        if diff and not rebuild:
            what = ", ".join({"tokenizer_hash": "the tokenizer", "source_fingerprint": "the source data", "plan": "the preparation settings",
                              "dtype": "the vocabulary size", "version": "the shard format"}[k] for k in diff)
            raise ShardError(f"{root}: its shards were made with other inputs ({what} changed, per {idx_f.name if idx_f.exists() else 'progress.json'}); "
                             f"pass --rebuild (rebuild=True) to tokenize again, or use another directory")
        if diff:
            shutil.rmtree(root)
        elif idx_f.exists() and have.get("complete"):
            return root  # the same inputs, already done: a no-op
    root.mkdir(parents=True, exist_ok=True)
    _write_atomic(root / "progress.json", json.dumps(want).encode())
    eos, bos = tok.eos_token_id, tok.bos_token_id

    def encode(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [([bos] if plan.add_bos else []) + x + [eos] for x in ids]}

    np_dtype = np.dtype(dtype)
    out: dict[str, list] = {"train": [], "eval": []}
    for name, ds in splits.items():
        n = len(ds)
        n_shards = max(1, -(-n // plan.docs_per_shard))
        bar = tqdm(total=n, desc=f"tokenize {name}", disable=not progress, dynamic_ncols=True, unit="doc")
        for k in range(n_shards):
            a, b = k * plan.docs_per_shard, min(n, (k + 1) * plan.docs_per_shard)
            carve = name == "train" and not plan.eval_split and plan.eval_fraction > 0
            dest = {"train": f"train-{k:05d}", "eval": f"eval-{k:05d}"}
            writes = [dest["train"], dest["eval"]] if carve else [dest[name]]  # the files this shard produces
            done = all((root / f"{d}.bin").exists() and (root / f"{d}.docs.npy").exists() for d in writes)
            if not done:
                part = ds.select(range(a, b)).map(encode, batched=True, batch_size=1000, num_proc=num_proc if b - a > 4000 else None,
                                                  remove_columns=ds.column_names, desc=None)
                if carve:
                    # held-out documents: a seeded draw per document, a pure function of (seed, document index)
                    u = permute(np.arange(a, b), max(n, 1), plan.seed, 7) / max(n, 1)
                    held = u < plan.eval_fraction
                    groups = {"train": np.flatnonzero(~held), "eval": np.flatnonzero(held)}
                else:
                    groups = {name: None}
                for g, rows in groups.items():
                    stem = dest[g] if name == "train" else f"eval-{k:05d}"
                    sub = part if rows is None else part.select(rows).flatten_indices()
                    # the token lists straight from Arrow: flat values and offsets, no Python loop per token
                    col = sub.data.column("ids").combine_chunks() if len(sub) else None
                    flat = col.values.to_numpy(zero_copy_only=False).astype(np.int64) if col is not None else np.zeros(0, np.int64)
                    starts = (col.offsets.to_numpy().astype(np.int64) - int(col.offsets[0].as_py())) if col is not None else np.zeros(1, np.int64)
                    if flat.size and flat.max() >= vocab:
                        raise ShardError(f"token id {int(flat.max())} does not fit the vocabulary of {vocab}")
                    # docs first, then the tokens: a shard counts as written once its .bin exists
                    atomic_save(root / f"{stem}.docs.npy", lambda p, a=starts: _save_npy(p, a))
                    _write_atomic(root / f"{stem}.bin", flat.astype(np_dtype).tobytes())
            bar.update(b - a)
        bar.close()
    for f in sorted(root.glob("*.bin")):
        split = "train" if f.name.startswith("train-") else "eval"
        starts = np.load(root / f.name.replace(".bin", ".docs.npy"))
        out[split].append({"file": f.name, "tokens": int(starts[-1]), "docs": len(starts) - 1, "bytes": f.stat().st_size,
                           "sha256_head": hashlib.sha256(f.read_bytes()[: 1 << 20]).hexdigest()[:16]})
    index = {**want, "complete": True, "eos_token_id": eos, "bos_token_id": bos,
             "splits": {k: v for k, v in out.items() if v}, "tokens": {k: sum(s["tokens"] for s in v) for k, v in out.items() if v}}
    _write_atomic(idx_f, json.dumps(index, indent=1).encode())
    (root / "progress.json").unlink(missing_ok=True)
    return root


# ----------------------------------------------------------------------------- reading


class TokenShards:
    """The token stream of one split: its shards memory-mapped read-only, in order."""

    def __init__(self, root: str | Path, split: str):
        self.root = Path(root)
        idx_f = self.root / INDEX
        if not idx_f.is_file():
            raise ShardError(f"{idx_f} is missing: the shards were not prepared (or preparation was interrupted); run `esorl prepare-data`")
        try:
            self.index = json.loads(idx_f.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{idx_f} is corrupted ({e}); prepare the data again") from None
        if not self.index.get("complete") or split not in self.index.get("splits", {}):
            raise ShardError(f"{idx_f}: no complete {split!r} split")
        dtype = np.dtype(self.index["dtype"])
        self.maps, self.doc_starts, offs = [], [], [0]
        for s in self.index["splits"][split]:
            f = self.root / s["file"]
            if not f.is_file():
                raise ShardError(f"shard {f} is missing")
            if f.stat().st_size != s["tokens"] * dtype.itemsize or f.stat().st_size != s["bytes"]:
                raise ShardError(f"shard {f} is truncated or corrupted: {f.stat().st_size} bytes, the index says "
                                 f"{s['tokens']} tokens × {dtype.itemsize} bytes; prepare the data again (--rebuild)")
            with open(f, "rb") as fh:
                if hashlib.sha256(fh.read(1 << 20)).hexdigest()[:16] != s["sha256_head"]:
                    raise ShardError(f"shard {f} is corrupted (its checksum differs from the index); prepare the data again (--rebuild)")
            self.maps.append(np.memmap(f, dtype=dtype, mode="r") if s["tokens"] else np.zeros(0, dtype=dtype))
            starts = np.load(self.root / s["file"].replace(".bin", ".docs.npy"), mmap_mode="r")
            if len(starts) != s["docs"] + 1 or int(starts[-1]) != s["tokens"]:
                raise ShardError(f"document index {s['file'].replace('.bin', '.docs.npy')} does not match its shard")
            self.doc_starts.append(starts)
            offs.append(offs[-1] + s["tokens"])
        self.offsets = np.array(offs, dtype=np.int64)  # global start of each shard
        self.n_tokens = int(self.offsets[-1])
        self.doc_counts = np.array([len(s) - 1 for s in self.doc_starts], dtype=np.int64)
        self.doc_offsets = np.concatenate([[0], np.cumsum(self.doc_counts)]).astype(np.int64)
        self.n_docs = int(self.doc_offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream (across shard boundaries)."""
        out = np.empty(length, dtype=np.int64)
        got = 0
        while got < length:
            pos = start + got
            s = int(np.searchsorted(self.offsets, pos, side="right")) - 1
            local = pos - int(self.offsets[s])
            take = min(length - got, int(self.offsets[s + 1]) - pos)
            out[got : got + take] = self.maps[s][local : local + take]
            got += take
        return out

    def document(self, d: int) -> np.ndarray:
        s = int(np.searchsorted(self.doc_offsets, d, side="right")) - 1
        i = d - int(self.doc_offsets[s])
        a, b = int(self.doc_starts[s][i]), int(self.doc_starts[s][i + 1])
        return np.asarray(self.maps[s][a:b], dtype=np.int64)


class _Column:
    def __init__(self, split: "ShardedSplit", key: str):
        self.split, self.key = split, key

    def __len__(self) -> int:
        return self.split.n_rows

    def __getitem__(self, rows):
        return self.split.rows(rows)[self.key]


class ShardedSplit:
    """Fixed-length rows of a sharded split, read on demand: ``split["input_ids"][rows]``
    ``(len(rows), seq_len)`` long and ``split["valid"][rows]`` bool, like the in-memory
    tensors. Row ``r`` is window ``r`` of the stream (``wrap``: tokens ``[r·L, (r+1)·L)``,
    the tail dropped) or document ``r`` (``pad``: padded with ``pad_id``, cut at ``L`` with
    ``truncate``, else a document longer than ``L`` is an error naming it). The training
    loop shuffles rows itself (a pure function of seed and position)."""

    def __init__(self, shards: TokenShards, seq_len: int, mode: str = "wrap", pad_id: int = 0, truncate: bool = False):
        self.shards, self.L, self.mode, self.pad_id = shards, seq_len, mode, pad_id
        if mode == "wrap":
            self.n_rows = shards.n_tokens // seq_len
            if self.n_rows == 0:
                raise ShardError(f"{shards.root}: {shards.n_tokens} tokens make no window of {seq_len}")
        elif mode == "pad":
            self.n_rows = shards.n_docs
            if not truncate:
                for s, starts in enumerate(shards.doc_starts):
                    lens = np.diff(np.asarray(starts))
                    if lens.size and lens.max() > seq_len:
                        i = int(lens.argmax())
                        raise ShardError(f"document {int(shards.doc_offsets[s]) + i} (shard {shards.maps[s].filename if hasattr(shards.maps[s], 'filename') else s}) "
                                         f"has {int(lens.max())} tokens, longer than data.max_length={seq_len}; set data.truncate=true or data.mode=wrap")
        else:
            raise ValueError(f"data.mode must be 'wrap' or 'pad', got {mode!r}")
        self._cache = (None, None)

    def __len__(self) -> int:
        return self.n_rows

    def __getitem__(self, key: str) -> _Column:
        if key not in ("input_ids", "valid"):
            raise KeyError(key)
        return _Column(self, key)

    def __contains__(self, key) -> bool:
        return key in ("input_ids", "valid")

    def get(self, key, default=None):
        return self[key] if key in self else default

    def rows(self, rows) -> dict:
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        key = tuple(rows.tolist())
        if self._cache[0] == key:  # input_ids and valid of the same rows: read once
            return self._cache[1]
        B, L = len(rows), self.L
        ids = np.full((B, L), self.pad_id, dtype=np.int64)
        valid = np.zeros((B, L), dtype=bool)
        for b, r in enumerate(rows.tolist()):
            if not 0 <= r < self.n_rows:
                raise IndexError(f"row {r} out of range [0, {self.n_rows})")
            if self.mode == "wrap":
                ids[b] = self.shards.read(r * L, L)
                valid[b] = True
            else:
                d = self.shards.document(r)[:L]
                ids[b, : len(d)] = d
                valid[b, : len(d)] = True
        out = {"input_ids": torch.from_numpy(ids), "valid": torch.from_numpy(valid)}
        self._cache = (key, out)
        return out
