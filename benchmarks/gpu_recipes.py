"""Run every GPU recipe for two steps *as shipped* (bf16 autocast, its batch sizes, completion
lengths, estimator, μ, β, sampling schedule), on a machine without a network.

Why: the micro-benchmarks of ``gpu.py`` cast the weights to bf16 and never went through a
recipe's ``bf16: true`` path, which crashed every GPU RL run at its first rollout.
This script exercises that path end to end.

What it changes in each recipe, and only that (everything else is the shipped file):

* ``policy.init_from`` / ``model.init_from``: a random Eso-LM of the recipe's architecture
  (the small model of docs/ESOLM.md §9: 12 blocks, 768 hidden, 12 heads; ``--model tiny`` for a smoke run)
  with a word-level tokenizer trained on the local data, because the released checkpoint and
  the GPT-2 tokenizer come from a hub;
* a reward model from a hub (``hf_classifier``) → the rule-based ``keyword`` sentiment reward;
* pretraining data from a hub → ``../shared/data/tinyshakespeare`` with a trained BPE tokenizer;
* ``max_steps: 2`` (and save/eval every step, so checkpointing and evaluation run too);
  ``--smoke`` additionally shrinks batch sizes and lengths so the script runs on a CPU.

It prints one line per recipe (``OK`` / ``FAIL`` with the error and seconds) and writes
``benchmarks/results/gpu-recipes-<date>-<device>.json``. Exit status 1 if any recipe failed.

    python benchmarks/gpu_recipes.py                     # on a GPU machine, every recipe
    python benchmarks/gpu_recipes.py --smoke --device cpu --only grpo_gsm8k   # CPU check of the script
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

#: name → (command, recipe file); the recipes that ship with ``bf16: true``
RECIPES = {
    "grpo_owt_sentiment": ("grpo", "recipes/rl/grpo_owt_sentiment.yaml"),
    "grpo_gsm8k": ("grpo", "recipes/rl/grpo_gsm8k.yaml"),
    "compare_owt_sentiment": ("compare", "recipes/compare/owt_sentiment.yaml"),
    "sft_gsm8k_owt": ("sft", "recipes/sft/gsm8k_owt.yaml"),
    "pretrain_owt_small_esolmb": ("pretrain", "recipes/pretrain/owt_small_esolmb.yaml"),
}

KEYWORD_REWARD = {"name": "keyword", "weight": 1.0,
                  "kwargs": {"positive": ["good", "great", "best", "fun", "love"], "negative": ["bad", "worst", "dull"], "normalize": "words"}}


def stand_in_policy(out: Path, size: str, context: int) -> Path:
    """A random Eso-LM of the recipe's size with a word tokenizer on the local corpora."""
    import torch

    from esorl import EsoLMConfig, EsoLMModel
    from esorl.data import tokenizer_ids, train_tokenizer

    pol = out / f"policy-{size}-{context}"
    if (pol / "config.json").exists():
        return pol
    texts = []
    for f in (DATA / "sst2" / "train.tsv", DATA / "gsm8k" / "train.jsonl"):
        if f.exists():
            texts += [ln.split("\t")[0] if f.suffix == ".tsv" else " ".join(json.loads(ln).values()) for ln in f.read_text().splitlines()[:4000]]
    if not texts:
        from esorl.data import generate_reviews

        texts = [r["text"] for r in generate_reviews(2000, seed=0)]
    tok = train_tokenizer(texts, out / "tok", kind="word", vocab_size=8192)
    ids = tokenizer_ids(tok)
    dims = dict(hidden_size=768, n_layers=12, n_heads=12, cond_dim=128) if size == "small" else dict(hidden_size=64, n_layers=2, n_heads=2, cond_dim=32)
    torch.manual_seed(0)
    m = EsoLMModel(EsoLMConfig(vocab_size=ids["vocab_size"], mask_token_id=ids["mask"], max_seq_len=context, dropout=0.0,
                               pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"], **dims))
    with torch.no_grad():  # a non-uniform policy (the reference init zeroes the output layer)
        for n, p in m.named_parameters():
            if "adaLN" in n or "output_layer.linear" in n:
                p.normal_(0, 0.02)
    m.save_pretrained(pol)
    tok.save_pretrained(pol)
    return pol


def patch(name: str, cmd: str, rec: dict, out: Path, policy: Path, smoke: bool) -> dict:
    """The shipped recipe with only the hub-dependent fields and the step counts replaced."""
    r = copy.deepcopy(rec)
    run = str(out / "runs" / name)
    if cmd in ("grpo", "compare"):
        r["policy"] = {"init_from": str(policy)}
        r["rewards"] = [KEYWORD_REWARD if x.get("name") == "hf_classifier" else x for x in r.get("rewards", [])]
        g = r.setdefault("grpo", {})
        g.update(max_steps=2, save_steps=1, save_strategy="steps")
        if "eval_steps" in g:
            g["eval_steps"] = 1
        if cmd == "compare":
            r["output_dir"] = run
            r["seeds"] = r.get("seeds", [0])[:1]
            r["diagnostics"] = {**r.get("diagnostics", {}), "draws": 2, "fresh_batches": 1, "ref_n": 8, "when": ["initial"]}
        else:
            g["output_dir"] = run
        if r.get("prompts", {}).get("eval_prompts"):
            r["prompts"]["eval_prompts"] = 16
        if smoke:
            g.update(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_generations=4, max_completion_length=16, diffusion_steps=4)
    else:  # sft / pretrain
        r.setdefault("model", {})
        t = r.setdefault("training", {})
        t.update(max_steps=2, save_steps=1, eval_steps=2, eval_batches=1, output_dir=run)
        d = r.setdefault("data", {})
        if cmd == "sft":
            r["model"]["init_from"] = str(policy)
            d["tokenizer"] = ""
        else:
            d.update(source=str(DATA / "tinyshakespeare" / "input.txt"), tokenizer="train:bpe")
            d.pop("text_field", None)
            if smoke:
                r["model"].update(hidden_size=64, n_layers=2, n_heads=2, cond_dim=32)
        if smoke:
            t.update(per_device_train_batch_size=4, gradient_accumulation_steps=1, per_device_eval_batch_size=4)
            if cmd == "pretrain":
                d["max_length"] = 64
    return r


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help=f"comma list from {', '.join(RECIPES)}")
    p.add_argument("--smoke", action="store_true", help="small batches, lengths and model (a CPU check of this script)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu (cpu hides CUDA from the runs)")
    p.add_argument("--out", default=None, help="work directory (default: a fresh one under /tmp)")
    p.add_argument("--json", default=None, help="result JSON path (default benchmarks/results/gpu-recipes-<date>-<device>.json)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per recipe")
    a = p.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    import torch

    cuda = torch.cuda.is_available() and a.device != "cpu"
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    out = Path(a.out or f"/tmp/esorl-gpu-recipes-{os.getpid()}")
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    results = {}
    for name in names:
        cmd, path = RECIPES[name]
        rec = yaml.safe_load((REPO / path).read_text())
        context = 1024 if not a.smoke else 512  # GSM8K prompts need a few hundred tokens even in a smoke run
        policy = stand_in_policy(out, "tiny" if a.smoke else "small", context) if cmd != "pretrain" else None
        patched = patch(name, cmd, rec, out, policy, a.smoke)
        f = out / f"{name}.yaml"
        f.write_text(yaml.safe_dump(patched, sort_keys=False))
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "esorl.cli", cmd, "--config", str(f)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=a.timeout)
        dt = time.time() - t0
        ok = proc.returncode == 0
        err = "" if ok else (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:400]
        sec = rec.get("grpo") or rec.get("training") or rec.get("ppo") or {}
        precision = "bf16" if sec.get("bf16") else "fp16" if sec.get("fp16") else "no"
        results[name] = {"ok": ok, "seconds": round(dt, 1), "error": err, "recipe": path, "mixed_precision": precision}
        print(f"{'OK  ' if ok else 'FAIL'} {name:<28} {dt:7.1f} s  {err}", flush=True)
    res_path = Path(a.json or REPO / "benchmarks" / "results" / f"gpu-recipes-{datetime.date.today()}-{device.replace(' ', '-').lower()}.json")
    res_path.parent.mkdir(parents=True, exist_ok=True)
    res_path.write_text(json.dumps({"device": device, "torch": torch.__version__, "smoke": a.smoke, "results": results}, indent=1))
    print(f"results: {res_path}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
