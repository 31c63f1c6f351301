"""GRPO step time: the TRL-based ``EsoGRPOTrainer`` vs the hand-written loop it replaced.

Both run the same recipe (policy, prompts, keyword reward, batch, completion length, schedule,
estimator) from the command line, each in its own process; the old loop from a ``git
worktree`` of the last commit that had it (``--old-rev``). A step's time is measured the same
way for both, from outside: ``(wall(K2 steps) − wall(K1 steps)) / (K2 − K1)``, which removes
start-up, model loading and export. Runs alternate old/new ``--repeats`` times (side by side,
so machine load hits both) and the table reports medians.

    python benchmarks/grpo_trainer_overhead.py            # ~3-5 minutes on 2 CPU cores

Writes ``benchmarks/results/grpo_trainer_overhead.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OLD_REV = "1eb11c6"  # the last commit with the hand-written GRPO loop


def policy(root: Path, hidden: int, layers: int) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from rl_fixtures import make_tiny_policy

    return make_tiny_policy(root, hidden=hidden, layers=layers)


def recipes(pol: Path, out: Path, cache: Path, a) -> tuple[dict, dict]:
    common = {"learning_rate": 1e-3, "per_device_train_batch_size": a.batch, "num_generations": 8, "max_completion_length": a.length,
              "diffusion_steps": 4, "sampling_alpha0": 1.0, "attention_backend": "sdpa", "likelihood": a.likelihood, "beta": a.beta,
              "num_iterations": 1, "log_completions": False, "num_completions_to_print": 0, "logging_steps": 1}
    base = {"policy": {"init_from": str(pol)},
            "prompts": {"source": "synthetic", "synthetic_size": 300, "prompt_words": 2, "eval_prompts": 0, "cache_dir": str(cache)},
            "rewards": [{"name": "keyword", "weight": 1.0, "kwargs": {"positive": ["great", "good"], "normalize": "words"}}],
            "logging": {"wandb_mode": "disabled"}}
    old = {**base, "grpo": {**common, "output_dir": str(out / "old"), "save_steps": 0, "eval_steps": 0, "lr_scheduler_type": "constant"}}
    new = {**base, "grpo": {**common, "output_dir": str(out / "new"), "save_strategy": "no", "lr_scheduler_type": "constant",
                            "gradient_checkpointing": False, "disable_tqdm": True}}
    return old, new


def timed_run(cmd_root: Path, recipe: dict, steps: int, work: Path, tag: str) -> float:
    recipe = json.loads(json.dumps(recipe))
    recipe["grpo"]["max_steps"] = steps
    recipe["grpo"]["output_dir"] = str(work / f"{tag}-{steps}-{time.time_ns()}")
    f = work / f"{tag}.yaml"
    f.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(cmd_root), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "esorl.cli", "grpo", "--config", str(f)], cwd=cmd_root, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{tag} run failed:\n{res.stderr[-3000:]}")
    return dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old-rev", default=OLD_REV)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--k1", type=int, default=2)
    p.add_argument("--k2", type=int, default=12)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--length", type=int, default=24)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--likelihood", default="exact")
    p.add_argument("--beta", type=float, default=0.05)
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "grpo_trainer_overhead.json"))
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="esorl-grpo-overhead-"))
    old_tree = work / "old_tree"
    subprocess.run(["git", "worktree", "add", "--detach", str(old_tree), a.old_rev], cwd=REPO, check=True, capture_output=True)
    try:
        pol = policy(work / "pol", a.hidden, a.layers)
        old, new = recipes(pol, work, work / "cache", a)
        per_step = {"old": [], "new": []}
        for r in range(a.repeats):
            for tag, root, rec in (("old", old_tree, old), ("new", REPO, new)):
                t1 = timed_run(root, rec, a.k1, work, tag)
                t2 = timed_run(root, rec, a.k2, work, tag)
                per_step[tag].append((t2 - t1) / (a.k2 - a.k1))
                print(f"repeat {r}: {tag} {per_step[tag][-1]:.3f} s/step", flush=True)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=REPO, capture_output=True)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    ratio = med["new"] / med["old"]
    import torch

    result = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})", "torch": torch.__version__,
              "threads": int(os.environ.get("OMP_NUM_THREADS", "2")), "old_rev": a.old_rev,
              "setup": {k: getattr(a, k) for k in ("batch", "length", "hidden", "layers", "likelihood", "beta", "k1", "k2", "repeats")},
              "seconds_per_step": per_step, "median": med, "new_over_old": ratio}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    print(f"\n| loop | s / step (median of {a.repeats}) | all repeats |\n|---|---|---|")
    for k in ("old", "new"):
        print(f"| {k} | {med[k]:.3f} | {', '.join(f'{x:.3f}' for x in per_step[k])} |")
    print(f"\nnew / old = {ratio:.3f} ({(ratio - 1) * 100:+.1f} %); results: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
