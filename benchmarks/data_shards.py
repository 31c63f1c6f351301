"""Corpus-scale data path (issue 16): preparation and loading throughput of memory-mapped
shards, and the resident memory of a training process as the corpus grows.

1. Writes a synthetic review corpus of ``--tokens`` word-level tokens (one review per line,
   generated in chunks by esorl's seeded generator) and a ``--small-tokens`` prefix of it.
2. Prepares both with ``data.storage=shards`` (``datasets`` map over ``--num-proc`` processes,
   Arrow → uint16 shards): tokens per second.
3. Reads random training rows (``--batch`` × ``--seq-len`` windows of the big corpus) from the
   memory maps: tokens per second.
4. Runs the same short pretraining (tiny model, ``--steps`` steps) on each corpus, each in its
   own process, with shards and (small corpus only, for contrast) in-memory tensors, and
   reports each process's peak resident memory (``ru_maxrss``).

    python benchmarks/data_shards.py                          # 10^8 vs 10^6 tokens, ~15 min on 2 cores
    python benchmarks/data_shards.py --tokens 2e6 --small-tokens 2e5 --steps 3    # smoke run (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import machine_info  # noqa: E402

_CHILD = r"""
import json, resource, sys, time
from esorl.config import load_config
from esorl.train.pretrain import PretrainConfig, run_pretrain
cfg = load_config(PretrainConfig, None, sys.argv[2:], base=json.loads(sys.argv[1]))
t0 = time.time()
run_pretrain(cfg)
print("RESULT", json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "seconds": time.time() - t0}))
"""


def write_corpus(path: Path, n_tokens: int, seed: int = 0) -> int:
    """Reviews (one per line) until ``n_tokens`` whitespace tokens; returns the count."""
    from esorl.data import generate_reviews

    total, chunk = 0, 0
    with open(path, "w") as f:
        while total < n_tokens:
            for r in generate_reviews(100_000, seed=seed * 100_003 + chunk):
                f.write(r["text"] + "\n")
                total += len(r["text"].split())
                if total >= n_tokens:
                    break
            chunk += 1
    return total


def base_recipe(corpus_dir: Path, work: Path, storage: str, seq_len: int, batch: int, steps: int) -> dict:
    return {
        "model": {"hidden_size": 64, "n_layers": 2, "n_heads": 2, "cond_dim": 32},
        "data": {"source": str(corpus_dir), "train_split": "train", "eval_split": "dev", "tokenizer": "train:word", "tokenizer_vocab_size": 4096,
                 "max_length": seq_len, "mode": "wrap", "storage": storage, "cache_dir": str(work / "cache"),
                 "shards_dir": str(work / f"shards-{corpus_dir.name}") if storage == "shards" else ""},
        "objective": {"alpha0": 0.25, "batch_split": 0.5},
        "training": {"max_steps": steps, "per_device_train_batch_size": batch, "per_device_eval_batch_size": batch, "eval_steps": 0, "save_steps": 0,
                     "output_dir": str(work / f"run-{corpus_dir.name}-{storage}"), "bf16": False, "attention_backend": "sdpa", "ema_decay": 0.0,
                     "logging_steps": 10},
        "logging": {"wandb_mode": "disabled"},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=float, default=1e8, help="size of the big corpus (word tokens)")
    p.add_argument("--small-tokens", type=float, default=1e6, help="size of the small corpus")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--load-batches", type=int, default=200)
    p.add_argument("--work", default="/tmp/esorl-data-bench")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/data_shards-<date>-cpu.json)")
    p.add_argument("--device", default="cpu", help="(CPU only: the data path)")
    a = p.parse_args(argv)
    import numpy as np
    import torch

    from esorl.config import load_config
    from esorl.data.corpus import prepare_shard_data
    from esorl.train.pretrain import PretrainConfig, global_batch_rows

    torch.set_num_threads(1)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": machine_info("cpu"), "args": vars(a), "corpora": {}}
    corpora = {}
    for name, n in (("big", int(a.tokens)), ("small", int(a.small_tokens))):
        d = work / f"corpus-{name}"
        d.mkdir(exist_ok=True)
        if not (d / "train.txt").exists():
            t0 = time.time()
            words = write_corpus(d / "train.txt", n)
            write_corpus(d / "dev.txt", min(n // 100 + 1000, 200_000), seed=99)
            print(f"[bench] wrote {name} corpus: {words:,} words in {time.time() - t0:.0f} s", flush=True)
        corpora[name] = d
    for name, d in corpora.items():
        cfg = load_config(PretrainConfig, None, [], base=base_recipe(d, work, "shards", a.seq_len, a.batch, a.steps))
        cfg.data.num_proc = a.num_proc
        t0 = time.time()
        _, splits = prepare_shard_data(cfg.data, 0, progress=True)
        dt = time.time() - t0
        idx = json.loads((splits["train"].shards.root / "index.json").read_text())
        n_tok = sum(idx["tokens"].values())
        disk = sum(f.stat().st_size for f in splits["train"].shards.root.glob("*.bin"))
        res["corpora"][name] = {"tokens": idx["tokens"], "dtype": idx["dtype"], "prepare_s": dt, "prepare_tokens_per_s": n_tok / dt, "disk_mb": disk / 2**20}
        print(f"[bench] prepared {name}: {n_tok:,} tokens in {dt:.1f} s ({n_tok / dt:,.0f} tokens/s), {disk / 2**20:.0f} MiB", flush=True)
        if name == "big":  # loading throughput: random training batches from the maps
            train = splits["train"]
            t0 = time.time()
            for s in range(a.load_batches):
                rows = global_batch_rows(s * a.batch, a.batch, len(train), 0)
                x = train["input_ids"][rows]
            dt = time.time() - t0
            res["load_tokens_per_s"] = a.load_batches * a.batch * a.seq_len / dt
            print(f"[bench] loading: {res['load_tokens_per_s']:,.0f} tokens/s ({x.shape} per batch)", flush=True)
    # resident memory of a training process, each configuration in its own process
    res["training_peak_rss_mb"] = {}
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    for name, storage in (("small", "shards"), ("big", "shards"), ("small", "memory")):
        rec = base_recipe(corpora[name], work, storage, a.seq_len, a.batch, a.steps)
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(rec)], capture_output=True, text=True, env=env, cwd=work)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"training run {name}/{storage} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(line[7:])
        res["training_peak_rss_mb"][f"{name}-{storage}"] = r
        print(f"[bench] pretraining {a.steps} steps on {name} ({storage}): peak RSS {r['peak_rss_mb']:.0f} MB, {r['seconds']:.1f} s", flush=True)
    rss = res["training_peak_rss_mb"]
    res["rss_big_minus_small_mb"] = rss["big-shards"]["peak_rss_mb"] - rss["small-shards"]["peak_rss_mb"]
    out = Path(a.out or REPO / "benchmarks" / "results" / f"data_shards-{time.strftime('%Y-%m-%d')}-cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print("\n| corpus | tokens (train + eval) | prepare (tokens/s) | disk |\n|---|---|---|---|")
    for name, c in res["corpora"].items():
        print(f"| {name} | {sum(c['tokens'].values()):,} | {c['prepare_tokens_per_s']:,.0f} | {c['disk_mb']:.0f} MiB |")
    print(f"\nloading random {a.batch} x {a.seq_len} windows: {res['load_tokens_per_s']:,.0f} tokens/s")
    print("\n| training process | peak RSS |\n|---|---|")
    for k, v in rss.items():
        print(f"| {k} | {v['peak_rss_mb']:.0f} MB |")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
