"""Tests of esorl.data: synthetic corpus, tokenizers, dataset loading and packing (CPU, fast)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from esorl.data import (
    SPECIAL_TOKENS,
    generate_reviews,
    load_prompt_completion_dataset,
    load_text_dataset,
    load_tokenizer,
    mask_token_id,
    negative_words,
    positive_words,
    split_train_eval,
    tokenize_and_pack,
    tokenizer_ids,
    train_tokenizer,
    write_synthetic_corpus,
)
from esorl.data.synthetic import MAX_WORDS, MIN_WORDS

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"


def _need_shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not SHARED.is_dir():
        pytest.skip(f"shared folder {SHARED} is absent (it holds the real SST-2/Shakespeare test data)")
    assert path.exists(), f"{path} is missing from the shared folder"
    return path


# --------------------------------------------------------------------------- synthetic


def test_generate_reviews_deterministic():
    a = generate_reviews(300, seed=0)
    assert a == generate_reviews(300, seed=0)
    assert a != generate_reviews(300, seed=1)
    assert generate_reviews(50, seed=0) == a[:50]  # prefix property
    for r in a:
        assert set(r) == {"text", "label"} and r["label"] in (0, 1)


def test_generate_reviews_pinned():
    # The corpus must be byte-identical on every machine / Python version. If the grammar
    # is changed on purpose, update this hash (and regenerate any cached corpora).
    text = "\n".join(f"{r['text']}\t{r['label']}" for r in generate_reviews(200, seed=0))
    assert hashlib.sha256(text.encode()).hexdigest() == PINNED_SHA256


PINNED_SHA256 = "227a880e92f02f7b0ab771108f671982cd0256d7af3d9a53c453b842b0464101"


def test_generate_reviews_statistics():
    rows = generate_reviews(5000, seed=3)
    balance = sum(r["label"] for r in rows) / len(rows)
    assert 0.4 <= balance <= 0.6
    vocab = {w for r in rows for w in r["text"].split()}
    assert 150 <= len(vocab) <= 2000
    for r in rows:
        words = r["text"].split()
        assert MIN_WORDS <= len(words) <= MAX_WORDS
        assert r["text"] == r["text"].lower() and r["text"] == " ".join(words)
        assert words[-1] in (".", "!")
    # Real structure: negation, contrast and intensifiers are all present.
    texts = [r["text"] for r in rows]
    for marker in (" not ", " never ", " but ", " and ", " really "):
        assert any(marker in t for t in texts), marker
    assert len(set(texts)) > 0.8 * len(texts)


def test_lexicons():
    pos, neg = positive_words(), negative_words()
    assert not set(pos) & set(neg)
    assert {"wonderful", "friendly"} <= set(pos) and {"terrible", "boring"} <= set(neg)
    assert all(" " not in w for w in pos + neg)
    rows = generate_reviews(3000, seed=0)
    vocab = {w for r in rows for w in r["text"].split()}
    assert set(pos) <= vocab and set(neg) <= vocab  # every lexicon word is used
    # Without negation or contrast, the lexicon words that occur agree with the label
    # (what a keyword reward relies on; negation/contrast are what it gets wrong).
    twists = {"not", "never", "hardly", "far", "anything", "but", "although", "though", "while"}
    plain = [r for r in rows if not twists & set(r["text"].split())]
    assert len(plain) > 500
    for r in plain:
        words = set(r["text"].split())
        wrong = words & set(neg if r["label"] else pos)
        assert not wrong, (r, wrong)


def test_write_synthetic_corpus(tmp_path):
    paths = write_synthetic_corpus(tmp_path, n_train=300, n_dev=50, n_test=40, seed=7)
    assert set(paths) == {"train", "dev", "test"}
    for split, n in (("train", 300), ("dev", 50), ("test", 40)):
        lines = paths[split].read_text().splitlines()
        assert len(lines) == n
        assert all(len(line.split("\t")) == 2 and line.split("\t")[1] in ("0", "1") for line in lines)
        ds = load_text_dataset(str(tmp_path), split=split)
        assert len(ds) == n and ds.column_names == ["text", "label"]
        assert ds[0]["text"] == lines[0].split("\t")[0]
    # Identical content: not rewritten (mtime kept); no temp files left behind.
    mtime = paths["train"].stat().st_mtime_ns
    assert write_synthetic_corpus(tmp_path, n_train=300, n_dev=50, n_test=40, seed=7) == paths
    assert paths["train"].stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.tsv", "test.tsv", "train.tsv"]
    # Splits are independent: train differs from dev, and resizing dev keeps train.
    before = paths["train"].read_bytes()
    write_synthetic_corpus(tmp_path, n_train=300, n_dev=60, n_test=40, seed=7)
    assert paths["train"].read_bytes() == before
    assert len(paths["dev"].read_text().splitlines()) == 60


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def corpus():
    return [r["text"] for r in generate_reviews(2000, seed=0)]


@pytest.fixture(scope="module")
def word_tok(corpus, tmp_path_factory):
    return train_tokenizer(corpus, tmp_path_factory.mktemp("word_tok"), kind="word")


@pytest.fixture(scope="module")
def bpe_tok(corpus, tmp_path_factory):
    return train_tokenizer(corpus, tmp_path_factory.mktemp("bpe_tok"), kind="bpe", vocab_size=600)


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_special_token_ids(kind, word_tok, bpe_tok):
    tok = word_tok if kind == "word" else bpe_tok
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == i
    ids = tokenizer_ids(tok)
    assert ids == dict(pad=0, bos=1, eos=2, mask=4, vocab_size=len(tok))
    assert mask_token_id(tok) == 4 and tok.unk_token_id == 3


def test_word_tokenizer_round_trip(word_tok, corpus):
    for s in corpus[:200] + [r["text"] for r in generate_reviews(50, seed=99)]:
        ids = word_tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s.split())  # one token per word
        assert word_tok.decode(ids) == s
    assert word_tok.decode([1, word_tok.convert_tokens_to_ids("the"), 2]) == "<bos> the <eos>"
    assert word_tok("zzzunseen", add_special_tokens=False)["input_ids"] == [3]
    # Nothing is added automatically (the packer places BOS/EOS itself).
    assert word_tok("the")["input_ids"] == word_tok("the", add_special_tokens=False)["input_ids"]


def test_bpe_tokenizer_round_trip(bpe_tok, corpus):
    for s in corpus[:100] + ["Unseen Text, with CAPS & ünïcödé!\n  spaces"]:
        assert bpe_tok.decode(bpe_tok(s, add_special_tokens=False)["input_ids"]) == s
    assert len(bpe_tok) == 600


def test_load_tokenizer_local(word_tok, tmp_path, corpus):
    train_tokenizer(corpus[:100], tmp_path, kind="word")
    tok = load_tokenizer(str(tmp_path))
    assert tokenizer_ids(tok)["mask"] == 4 and tokenizer_ids(tok)["pad"] == 0
    s = corpus[0]
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s


def test_load_tokenizer_adds_mask_and_pad(tmp_path, corpus):
    # A GPT-2-like tokenizer (byte-level BPE, only <|endoftext|>, no mask, no pad): the
    # same fix-up path that load_tokenizer("gpt2") takes, without the network.
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token=eot, eos_token=eot, unk_token=eot).save_pretrained(
        str(tmp_path)
    )
    n = raw.get_vocab_size()
    tok = load_tokenizer(str(tmp_path))
    ids = tokenizer_ids(tok)
    assert tok.mask_token == "[MASK]" and ids["mask"] == n and ids["vocab_size"] == n + 1
    assert ids["pad"] == ids["eos"] == raw.token_to_id(eot)
    assert ids["pad"] != ids["mask"]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_tok"):
        load_tokenizer(str(tmp_path / "no_such_tok"))
    f = tmp_path / "tokenizer.json"
    f.write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(f))


# --------------------------------------------------------------------------- loading


def test_load_sst2_dev():
    path = _need_shared("sst2")
    ds = load_text_dataset(str(path), split="dev")
    assert len(ds) == 872
    assert ds.column_names == ["text", "label"]
    assert set(ds["label"]) == {0, 1}
    assert ds[0]["text"] == "one long string of cliches" and ds[0]["label"] == 0
    # The same file addressed directly, and via the "validation" alias.
    assert len(load_text_dataset(str(path / "dev.tsv"))) == 872
    assert len(load_text_dataset(str(path), split="validation")) == 872


def test_load_tinyshakespeare():
    path = _need_shared("tinyshakespeare", "input.txt")
    ds = load_text_dataset(str(path))
    assert ds.column_names == ["text"]
    assert ds[0]["text"] == "First Citizen:"
    raw_lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(ds) == len(raw_lines)


def test_load_columns_and_renames(tmp_path):
    rows = [{"review": "good film", "stars": "1", "id": 5}, {"review": "bad film", "stars": "0", "id": 6}]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "dev.csv").write_text("review,stars\nnice,1\nawful,0\nok,1\n")
    ds = load_text_dataset(str(tmp_path), text_field="review", label_field="stars")
    assert ds.column_names == ["text", "label"] and ds["label"] == [1, 0] and ds["text"] == ["good film", "bad film"]
    dev = load_text_dataset(str(tmp_path), split="dev", text_field="review")
    assert dev.column_names == ["text"] and len(dev) == 3
    tsv = tmp_path / "plain.tsv"
    tsv.write_text("no label here\nnor here\n")
    assert load_text_dataset(str(tsv)).column_names == ["text"]


def test_load_prompt_completion(tmp_path):
    rows = [{"question": "1+1?", "answer": "2 #### 2"}, {"question": "2+2?", "answer": "4 #### 4"}]
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_prompt_completion_dataset(str(tmp_path), "test", prompt_field="question", completion_field="answer")
    assert ds["prompt"] == ["1+1?", "2+2?"] and ds["completion"] == ["2 #### 2", "4 #### 4"]
    assert ds["answer"] == ["2 #### 2", "4 #### 4"]  # kept for a verifiable reward
    only = load_prompt_completion_dataset(str(tmp_path / "test.jsonl"), prompt_field="question", completion_field=None)
    assert "completion" not in only.column_names and only["prompt"] == ["1+1?", "2+2?"]
    with pytest.raises(KeyError, match="completion"):
        load_prompt_completion_dataset(str(tmp_path), "test", prompt_field="question")


def test_load_gsm8k_prompts():
    path = _need_shared("gsm8k")
    ds = load_prompt_completion_dataset(str(path), "test", prompt_field="question", completion_field="answer")
    assert len(ds) == 1319 and "#### " in ds[0]["answer"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.tsv.*'train'"):
        load_text_dataset(str(tmp_path / "missing.tsv"))
    with pytest.raises(FileNotFoundError, match=r"'dev'"):
        load_text_dataset(str(tmp_path), split="dev")  # directory without a dev file
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_text_dataset(str(tmp_path / "nowhere"), split="test")
    for name in ("empty.txt", "empty.tsv", "empty.jsonl"):
        (tmp_path / name).write_text("\n  \n" if name.endswith("txt") else "")
        with pytest.raises(ValueError, match="is empty"):
            load_text_dataset(str(tmp_path / name))
    (tmp_path / "header_only.csv").write_text("text,label\n")
    with pytest.raises(ValueError, match="empty"):
        load_text_dataset(str(tmp_path / "header_only.csv"))
    (tmp_path / "cols.jsonl").write_text('{"sentence": "hi", "label": 1}\n')
    with pytest.raises(KeyError, match=r"'text'.*\['sentence', 'label'\]"):
        load_text_dataset(str(tmp_path / "cols.jsonl"))
    with pytest.raises(KeyError, match="'stars'"):
        load_text_dataset(str(tmp_path / "cols.jsonl"), text_field="sentence", label_field="stars")
    (tmp_path / "mixed.tsv").write_text("a b\t1\nc d\n")
    with pytest.raises(ValueError, match="line: 2"):
        load_text_dataset(str(tmp_path / "mixed.tsv"))


# --------------------------------------------------------------------------- packing


def test_pack_wrap(word_tok):
    texts = ["the pasta was good .", "", "the staff were rude ."]
    n_tokens = 5 + 1 + 5 + 1  # two non-empty documents, EOS after each; "" is skipped
    out = tokenize_and_pack(texts, word_tok, max_length=4)
    assert out["input_ids"].shape == (n_tokens // 4, 4) and out["input_ids"].dtype == torch.long
    assert out["valid"].dtype == torch.bool and out["valid"].all()
    stream = out["input_ids"].flatten().tolist()
    eos = word_tok.eos_token_id
    assert stream[5] == eos and stream[11] == eos and stream.count(eos) == 2
    assert word_tok.decode(stream[:5]) == texts[0]
    # BOS before each document.
    out = tokenize_and_pack(texts, word_tok, max_length=7, add_bos=True)
    assert out["input_ids"].flatten().tolist()[:7] == [1] + stream[:6]
    # Corpus shorter than one window.
    with pytest.raises(ValueError, match="shorter than one window"):
        tokenize_and_pack(texts, word_tok, max_length=100)


def test_pack_pad(word_tok):
    texts = ["the pasta was good .", "i loved this film ! really", "bad ."]
    out = tokenize_and_pack(texts, word_tok, max_length=8, mode="pad")
    ids, valid = out["input_ids"], out["valid"]
    assert ids.shape == valid.shape == (3, 8)
    assert valid.sum(1).tolist() == [6, 7, 3]
    eos, pad = word_tok.eos_token_id, word_tok.pad_token_id
    for i, t in enumerate(texts):
        n = len(t.split())
        assert ids[i, n] == eos and word_tok.decode(ids[i, :n].tolist()) == t
        assert (ids[i, n + 1 :] == pad).all() and not valid[i, n + 1 :].any()
    no_eos = tokenize_and_pack(texts, word_tok, max_length=8, mode="pad", add_eos=False, add_bos=True)
    assert no_eos["valid"].sum(1).tolist() == [6, 7, 3] and (no_eos["input_ids"][:, 0] == 1).all()
    assert eos not in no_eos["input_ids"].tolist()[0]


def test_pack_pad_too_long(word_tok):
    texts = ["good .", "the pasta was really very good ."]
    with pytest.raises(ValueError, match=r"document 1 is 8 tokens.*max_length=6"):
        tokenize_and_pack(texts, word_tok, max_length=6, mode="pad")
    out = tokenize_and_pack(texts, word_tok, max_length=6, mode="pad", truncate=True)
    assert out["valid"][1].all() and word_tok.eos_token_id not in out["input_ids"][1].tolist()
    assert word_tok.decode(out["input_ids"][1].tolist()) == "the pasta was really very good"


def test_pack_dataset_and_bpe(bpe_tok, tmp_path):
    write_synthetic_corpus(tmp_path, n_train=200, n_dev=10, n_test=10)
    ds = load_text_dataset(str(tmp_path), "train")
    out = tokenize_and_pack(ds, bpe_tok, max_length=32)
    assert out["input_ids"].shape[1] == 32 and out["input_ids"].shape[0] > 10
    assert int(out["input_ids"].max()) < len(bpe_tok)
    padded = tokenize_and_pack(ds, bpe_tok, max_length=64, mode="pad")
    assert padded["input_ids"].shape == (200, 64)  # row i is document i
    with pytest.raises(ValueError, match="mode"):
        tokenize_and_pack(ds, bpe_tok, max_length=32, mode="chunk")


def test_split_train_eval():
    tensors = {"input_ids": torch.arange(100).view(50, 2), "valid": torch.ones(50, 2, dtype=torch.bool)}
    train, ev = split_train_eval(tensors, 0.1, seed=0)
    assert train["input_ids"].shape == (45, 2) and ev["input_ids"].shape == (5, 2)
    rows = sorted(train["input_ids"][:, 0].tolist() + ev["input_ids"][:, 0].tolist())
    assert rows == list(range(0, 100, 2))  # a partition of the rows
    again, ev2 = split_train_eval(tensors, 0.1, seed=0)
    assert torch.equal(ev["input_ids"], ev2["input_ids"])
    _, ev3 = split_train_eval(tensors, 0.1, seed=1)
    assert not torch.equal(ev["input_ids"], ev3["input_ids"])
    assert split_train_eval(tensors, 0.001, seed=0)[1]["input_ids"].shape[0] == 1
    with pytest.raises(ValueError):
        split_train_eval(tensors, 1.0, seed=0)
    with pytest.raises(ValueError, match="rows"):
        split_train_eval({"a": torch.zeros(3), "b": torch.zeros(4)}, 0.5, seed=0)
