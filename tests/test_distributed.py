"""Pretraining under 2-process CPU DDP and DeepSpeed ZeRO-2 / ZeRO-3 (gloo) gives the
single-process losses: all randomness is keyed by the global sample index, κ and the
normalisation apply to the global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "model": {"hidden_size": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16},
    "data": {"source": "synthetic", "synthetic_size": 400, "seq_len": 24, "truncate": True},
    "objective": {"alpha0": 0.25, "batch_split": 0.5},
    "optim": {"lr": 3.0e-3, "warmup_steps": 2},
    "train": {"max_steps": 2, "batch_size": 8, "micro_batch_size": 4, "eval_every": 0, "eval_batches": 2, "save_every": 0,
              "mixed_precision": "no", "attention_backend": "sdpa", "ema_decay": 0.9},
    "logging": {"wandb_mode": "disabled", "log_every": 1},
}


def _run(tmp_path, name, launcher):
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg["train"]["output_dir"] = str(tmp_path / name)
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    cmd = launcher + ["-m", "esorl.cli", "pretrain", "--config", str(f)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    recs = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs}


@pytest.mark.slow
def test_ddp_and_zero_match_single_process(tmp_path):
    single = _run(tmp_path, "single", [sys.executable])
    for name in ("cpu_ddp_2proc", "cpu_zero2_2proc", "cpu_zero3_2proc"):
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / f"{name}.yaml")]
        multi = _run(tmp_path, name, launch)
        for step in (1, 2):
            assert abs(multi[step]["train/loss"] - single[step]["train/loss"]) < 1e-5, (name, step, multi[step], single[step])
        assert abs(multi[2]["val/nelbo"] - single[2]["val/nelbo"]) < 1e-4, name  # EMA eval too
