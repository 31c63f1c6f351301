"""Corpus-scale pretraining data: shards decode back to the text, preparation is resumable
and idempotent, changed inputs and damaged files are refused naming the file, windows are a
pure function of (seed, position) — the same on 1 or 2 ranks and across a resume — and the
held-out split is made of documents."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import esorl.data.shards as sh
from esorl.data import train_tokenizer
from esorl.data.shards import ShardedSplit, ShardError, ShardPlan, TokenShards, permute, prepare_shards
from esorl.train.common import read_metrics
from esorl.train.pretrain import global_batch_rows, rank_slice, run_pretrain

from test_pretrain import tiny_cfg

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from esorl.data import generate_reviews

    d = tmp_path_factory.mktemp("corpus")
    texts = [r["text"] for r in generate_reviews(700, seed=3)]
    (d / "train.txt").write_text("\n".join(texts[:600]) + "\n\n")  # a blank line is no document
    (d / "dev.txt").write_text("\n".join(texts[600:]) + "\n")
    tok = train_tokenizer(texts, d / "tok", kind="word", vocab_size=2048)
    return d, texts, tok


def plan(d, **kw):
    base = dict(source=str(d), split="train", text_field="text", eval_split="", eval_fraction=0.1, seed=0, add_bos=False, docs_per_shard=128)
    base.update(kw)
    return ShardPlan(**base)


def test_permute_is_a_seeded_bijection():
    for n in (1, 2, 5, 64, 1000, 4099):
        p = permute(np.arange(n), n, 11, 2)
        assert sorted(p.tolist()) == list(range(n))
    assert not np.array_equal(permute(np.arange(100), 100, 0, 0), permute(np.arange(100), 100, 0, 1))
    assert np.array_equal(permute(np.arange(100), 100, 4, 4)[[3, 70]], permute([3, 70], 100, 4, 4))  # per position


def test_shards_decode_back_to_the_source_and_hold_out_documents(corpus, tmp_path):
    d, texts, tok = corpus
    root = prepare_shards(plan(d), tok, tmp_path / "s", progress=False)
    idx = json.loads((root / "index.json").read_text())
    assert idx["dtype"] == "uint16" and len(idx["splits"]["train"]) == 5  # 600 docs / 128 per shard
    train, ev = TokenShards(root, "train"), TokenShards(root, "eval")
    assert train.n_docs + ev.n_docs == 600 and 30 <= ev.n_docs <= 90  # ~10 % held out, by document
    eos = tok.eos_token_id
    decoded = []
    for shards in (train, ev):
        for i in range(shards.n_docs):
            ids = shards.document(i).tolist()
            assert ids[-1] == eos and eos not in ids[:-1]
            decoded.append(tok.decode(ids[:-1]))
    expected = [tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in texts[:600]]
    assert sorted(decoded) == sorted(expected)  # every document once, in train or eval, never both
    # a source eval split instead of a carved one
    root2 = prepare_shards(plan(d, eval_split="dev"), tok, tmp_path / "s2", progress=False)
    assert TokenShards(root2, "eval").n_docs == 100 and TokenShards(root2, "train").n_docs == 600


def test_second_call_is_a_no_op_and_changed_inputs_are_refused(corpus, tmp_path):
    src, texts, tok = corpus
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.txt").write_text((src / "train.txt").read_text())
    root = prepare_shards(plan(d), tok, tmp_path / "s", progress=False)
    mtimes = {f.name: f.stat().st_mtime_ns for f in root.iterdir()}
    prepare_shards(plan(d), tok, root, progress=False)
    assert {f.name: f.stat().st_mtime_ns for f in root.iterdir()} == mtimes
    other = train_tokenizer(texts, tmp_path / "tok2", kind="word", vocab_size=512)
    with pytest.raises(ShardError, match=r"the tokenizer changed.*--rebuild"):
        prepare_shards(plan(d), other, root, progress=False)
    (d / "train.txt").write_text("\n".join(texts[:300]) + "\n")  # same file, other content
    with pytest.raises(ShardError, match=r"\(the source data changed, per index.json\)"):
        prepare_shards(plan(d), tok, root, progress=False)
    prepare_shards(plan(d), tok, root, rebuild=True, progress=False)
    assert TokenShards(root, "train").n_docs + TokenShards(root, "eval").n_docs == 300


@pytest.mark.parametrize("eval_split", ["", "dev"])
def test_interrupted_preparation_resumes_to_the_same_shards(corpus, tmp_path, monkeypatch, eval_split):
    d, texts, tok = corpus
    plan_ = lambda d: plan(d, eval_split=eval_split)  # noqa: E731 - carved held-out documents, or a source split
    clean = prepare_shards(plan_(d), tok, tmp_path / "clean", progress=False)
    real = sh._write_atomic
    calls = {"n": 0}

    def dies_after_two_shards(path, data):
        if path.suffix == ".bin":
            calls["n"] += 1
            if calls["n"] > (4 if not eval_split else 2):  # two shards written, then the machine dies
                raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(sh, "_write_atomic", dies_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(plan_(d), tok, tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed" / "index.json").exists()
    with pytest.raises(ShardError, match="index.json is missing"):
        TokenShards(tmp_path / "resumed", "train")
    monkeypatch.setattr(sh, "_write_atomic", real)
    written = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "resumed").glob("*.bin")}
    prepare_shards(plan_(d), tok, tmp_path / "resumed", progress=False)
    for f in clean.glob("*.bin"):
        assert f.read_bytes() == (tmp_path / "resumed" / f.name).read_bytes(), f.name
    assert all((tmp_path / "resumed" / n).stat().st_mtime_ns == t for n, t in written.items())  # not redone


def test_damaged_shards_are_refused_naming_the_file(corpus, tmp_path):
    d, texts, tok = corpus
    root = prepare_shards(plan(d), tok, tmp_path / "s", progress=False)
    f = root / "train-00001.bin"
    data = f.read_bytes()
    f.write_bytes(data[:-10])
    with pytest.raises(ShardError, match=r"train-00001.bin is truncated"):
        TokenShards(root, "train")
    f.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    with pytest.raises(ShardError, match=r"train-00001.bin is corrupted"):
        TokenShards(root, "train")
    f.unlink()
    with pytest.raises(ShardError, match=r"train-00001.bin is missing"):
        TokenShards(root, "train")


def test_windows_read_the_stream_across_shards_and_pad_rows(corpus, tmp_path):
    d, texts, tok = corpus
    root = prepare_shards(plan(d), tok, tmp_path / "s", progress=False)
    shards = TokenShards(root, "train")
    stream = np.concatenate([np.asarray(m, dtype=np.int64) for m in shards.maps])
    wrap = ShardedSplit(shards, 16, "wrap")
    assert len(wrap["input_ids"]) == len(stream) // 16
    rows = torch.tensor([0, 5, len(wrap) - 1])
    assert torch.equal(wrap["input_ids"][rows], torch.from_numpy(np.stack([stream[r * 16 : (r + 1) * 16] for r in rows.tolist()])))
    assert wrap["valid"][rows].all()
    pad = ShardedSplit(shards, 64, "pad", pad_id=0, truncate=True)
    r = pad.rows(torch.tensor([3]))
    doc = shards.document(3)
    n = min(64, len(doc))
    assert r["input_ids"][0, :n].tolist() == doc[:n].tolist() and r["valid"][0].sum() == n
    with pytest.raises(ShardError, match="longer than data.max_length=4"):
        ShardedSplit(shards, 4, "pad")


def test_batches_identical_for_one_and_two_ranks():
    G, micro, n_rows = 8, 2, 1000
    for position in (0, 996, 5 * 8):
        whole = global_batch_rows(position, G, n_rows, seed=3)
        assert len(set(whole.tolist())) == G
        for world in (1, 2, 4):
            accum = G // (micro * world)
            parts = {(m * world + r): whole[rank_slice(micro, world, r, m)] for r in range(world) for m in range(accum)}
            assert torch.equal(torch.cat([parts[k] for k in sorted(parts)]), whole)


def test_pretraining_on_shards_resumes_exactly(tmp_path):
    over = {"data.storage": "shards", "data.mode": "wrap", "training.max_steps": 6, "training.save_steps": 3, "training.eval_steps": 3}
    run_pretrain(tiny_cfg(tmp_path / "a", **over))
    full = {r["step"]: r for r in read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")}
    run_pretrain(tiny_cfg(tmp_path / "b", **{**over, "training.max_steps": 3}))
    run_pretrain(tiny_cfg(tmp_path / "b", **over), resume="latest")
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")}
    for s in range(1, 7):
        assert abs(full[s]["train/loss"] - resumed[s]["train/loss"]) < 1e-6, s
    assert abs(full[6]["val/nelbo"] - resumed[6]["val/nelbo"]) < 1e-6


def test_prepare_data_command(tmp_path):
    import yaml

    from dataclasses import asdict

    cfg = tiny_cfg(tmp_path, **{"data.storage": "shards", "data.mode": "wrap", "data.shards_dir": str(tmp_path / "shards")})
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(asdict(cfg)))
    res = subprocess.run([sys.executable, "-m", "esorl.cli", "prepare-data", "--config", str(f)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "train with data.storage=shards" in res.stdout, res.stderr[-2000:]
    assert json.loads((tmp_path / "shards" / "index.json").read_text())["complete"]
    (tmp_path / "shards" / "train-00000.bin").write_bytes(b"\0\0")
    res = subprocess.run([sys.executable, "-m", "esorl.cli", "prepare-data", "--config", str(f)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and "train-00000.bin is truncated" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]


def test_owt_recipe_runs_end_to_end_on_a_local_slice(tmp_path):
    """The OpenWebText recipe as shipped (L = 1024, wrap packing, shards, bf16 autocast), in
    CI-sized form: a local JSONL slice with OWT's `text` column instead of the hub dataset, a
    BPE tokenizer trained on it instead of GPT-2's (hub), a tiny model, two steps."""
    import json as _json

    from esorl.data import generate_reviews

    src = tmp_path / "owt_slice"
    src.mkdir()
    docs = [" ".join(r["text"] for r in generate_reviews(40, seed=s)) for s in range(300)]  # ~300 paragraph-sized documents
    (src / "train.jsonl").write_text("".join(_json.dumps({"text": d}) + "\n" for d in docs))
    over = ["data.source=" + str(src), "data.tokenizer=train:bpe", "data.tokenizer_vocab_size=2000", "data.eval_fraction=0.05",
            f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1", "model.hidden_size=64", "model.n_layers=2", "model.n_heads=2",
            "model.cond_dim=32", "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=1", "training.per_device_eval_batch_size=2", "training.max_steps=2", "training.eval_steps=2",
            "training.eval_batches=1", "training.save_steps=2", f"training.output_dir={tmp_path / 'run'}", "logging.wandb_mode=disabled"]
    res = subprocess.run([sys.executable, "-m", "esorl.cli", "pretrain", "--config", str(REPO / "recipes/pretrain/owt_small_esolmb.yaml"), *over],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert recs[-1]["step"] == 2 and np.isfinite(recs[-1]["val/nelbo"])
    cfg = _json.loads(next((tmp_path / "cache").glob("shards-*/index.json")).read_text())
    assert cfg["dtype"] == "uint16" and cfg["tokens"]["train"] > 1024 * 4
