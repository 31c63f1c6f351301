"""The study's per-arm cost, each arm in its own process (docs/ESOLM.md §10): peak memory is
a process-wide high-water mark, so arms measured in one process would all report the largest.

For each arm a fresh ``python -m esorl.compare.cost`` builds the arm's trainer at its selected
setting and runs ``cost.steps + 1`` GRPO steps (the first is a warm-up and is not timed).
Reported per arm: wall-clock per step and its phases (rollout, scoring of old/reference
log-probs, the update = the rest), token forwards per completion from the estimator registry,
and peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the steps; on CPU the peak
resident set during the steps (sampled every 5 ms) minus the resident set before them (what
the steps added above everything built before them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def measure_all(cfg, selected: dict) -> dict:
    """``{arm: cost}`` for every arm of ``cfg``, one child process each (the study's
    ``config.yaml`` in ``output_dir`` must exist)."""
    from tqdm.auto import tqdm

    out = {}
    conf = Path(cfg.output_dir) / "config.yaml"
    for a in tqdm(cfg.arms, desc="cost (one process per arm)", dynamic_ncols=True):
        cmd = [sys.executable, "-m", "esorl.compare.cost", "--config", str(conf), "--arm", a.name, "--selected", json.dumps(selected.get(a.name, {}))]
        # the child imports what this process can (a reward given as module:function)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"cost measurement of arm {a.name} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
        out[a.name] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def measure(cfg, arm_name: str, selected: dict) -> dict:
    """The cost of one arm, in this process (see the module docstring)."""
    import resource
    import shutil
    import time

    import torch

    from ..likelihood import get_estimator
    from ..rl.grpo import build_grpo_trainer
    from ..train.common import read_metrics
    from .runner import run_recipe

    arm = cfg.arm(arm_name)
    steps = cfg.cost.steps
    rec = run_recipe(cfg, arm, cfg.seeds[0], None, selected)
    scratch = Path(cfg.output_dir) / "cost_scratch" / arm_name
    shutil.rmtree(scratch, ignore_errors=True)
    rec.grpo.update(output_dir=str(scratch), max_steps=steps + 1, save_strategy="no", eval_strategy="no", eval_on_start=False, log_exact_kl=False)
    rec.logging.wandb_mode = "disabled"
    tr = build_grpo_trainer(rec, report_to="none")
    cuda = tr.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()
    sampler = _PeakRSS()
    t0 = time.perf_counter()
    with sampler:
        tr.train()
    wall = time.perf_counter() - t0
    recs = [r for r in read_metrics(scratch / "metrics.jsonl") if "loss" in r][1:]  # the warm-up step is not timed

    def mean(k):
        # per optimizer step: with μ > 1 only the steps that generate log rollout and score
        # times, so the phases are totals over the timed steps divided by their number
        return sum(r.get(k, 0.0) for r in recs) / len(recs) if recs else float("nan")

    args = tr.args
    est = args.estimator()
    P = max(len(x) for x in tr.processing_class(list(tr.train_dataset["prompt"][:64]))["input_ids"]) + 1
    info = get_estimator(est.likelihood)
    kw = est.params(args.sampling_alpha0, 0)
    sizes = args.sampling().schedule.sample(1, args.max_completion_length).step_sizes.tolist()
    res = {"arm": arm_name, "likelihood": est.likelihood, "objective": getattr(args, "objective", "grpo"), "steps_timed": len(recs),
           "step_s": mean("step_time"), "rollout_s": mean("time/rollout"), "score_s": mean("time/score"),
           "update_s": mean("step_time") - mean("time/rollout") - mean("time/score"), "wall_s": wall,
           "token_forwards_per_completion": info.forwards(P, args.max_completion_length, sizes, kw),
           "device": str(tr.accelerator.device)}
    if cuda:
        res["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        res.update(rss_before_mb=rss0, peak_rss_mb=sampler.peak, peak_memory_mb=sampler.peak - rss0,
                   process_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    shutil.rmtree(scratch, ignore_errors=True)
    return res


def _rss_mb() -> float:
    """The process's current resident set (MB), from ``/proc/self/statm`` (Linux)."""
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakRSS:
    """The peak resident set while the block runs, sampled every 5 ms by a thread (the
    process-wide ``ru_maxrss`` would include building the trainer)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = _rss_mb(), threading.Event()

        def loop():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, _rss_mb())

        self._t = threading.Thread(target=loop, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mb())


def main(argv=None):
    import argparse

    from ..config import load_config
    from .runner import CompareConfig

    p = argparse.ArgumentParser(prog="python -m esorl.compare.cost", description="the cost of one arm of a study, in this process")
    p.add_argument("--config", required=True)
    p.add_argument("--arm", required=True)
    p.add_argument("--selected", default="{}", help="the arm's selected sweep setting, JSON")
    a = p.parse_args(argv)
    cfg = load_config(CompareConfig, a.config)
    print(json.dumps(measure(cfg, a.arm, json.loads(a.selected))))


if __name__ == "__main__":
    main()
