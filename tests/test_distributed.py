"""Pretraining under 2-process CPU DDP and DeepSpeed ZeRO-2 / ZeRO-3 (gloo) gives the
single-process losses for the same global batch (per_device_train_batch_size ×
gradient_accumulation_steps × ranks: 4 × 2 × 1 = 4 × 1 × 2): all randomness is keyed by the
global sample index, κ and the normalisation apply to the global batch."""

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
    "data": {"source": "synthetic", "synthetic_size": 400, "max_length": 24, "truncate": True},
    "objective": {"alpha0": 0.25, "batch_split": 0.5},
    "training": {"learning_rate": 3.0e-3, "warmup_steps": 2, "max_steps": 2, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                 "per_device_eval_batch_size": 4, "eval_steps": 0, "eval_batches": 2, "save_steps": 0, "bf16": False, "attention_backend": "sdpa",
                 "logging_steps": 1, "ema_decay": 0.9},
    "logging": {"wandb_mode": "disabled"},
}


def _run(tmp_path, name, launcher, sections=None, **data):
    cfg = json.loads(json.dumps(TINY))
    cfg["data"].update(data)
    for k, v in (sections or {}).items():
        cfg.setdefault(k, {}).update(v)
    cfg["data"]["cache_dir"] = str(tmp_path / "cache")
    cfg["training"]["output_dir"] = str(tmp_path / name)
    if len(launcher) > 1:  # 2 ranks: the same global batch with half the accumulation
        cfg["training"]["gradient_accumulation_steps"] = 1
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


@pytest.mark.slow
def test_zero3_lora_export_gathers_the_partitioned_weights(tmp_path):
    """LoRA (continued pretraining) under ZeRO-3: the export merges the adapters into whole
    weights gathered on every rank, and equals the single-process export."""
    import torch
    from safetensors.torch import load_file

    _run(tmp_path, "base", [sys.executable], {"training": {"max_steps": 6, "ema_decay": 0.0}})  # adaLN gates off zero
    lora = {"model": {"init_from": str(tmp_path / "base" / "model")}, "lora": {"enabled": True, "r": 4}, "training": {"ema_decay": 0.0}}
    single = _run(tmp_path, "lora_single", [sys.executable], lora)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "cpu_zero3_2proc.yaml")]
    multi = _run(tmp_path, "lora_zero3", launch, lora)
    for step in (1, 2):
        assert abs(multi[step]["train/loss"] - single[step]["train/loss"]) < 1e-5, step
    base, a, b = (load_file(str(tmp_path / n / "model" / "model.safetensors")) for n in ("base", "lora_single", "lora_zero3"))
    assert set(a) == set(b) == set(base)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # the adapters moved and were merged
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@pytest.mark.slow
def test_sharded_data_two_ranks_match_one(tmp_path):
    """Memory-mapped shards: each rank reads only its rows of the global batch, and the
    2-rank DDP losses equal the single-process ones."""
    kw = {"storage": "shards", "mode": "wrap", "shards_dir": str(tmp_path / "shards")}
    single = _run(tmp_path, "single_shards", [sys.executable], **kw)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / "cpu_ddp_2proc.yaml")]
    multi = _run(tmp_path, "ddp_shards", launch, **kw)
    for step in (1, 2):
        assert abs(multi[step]["train/loss"] - single[step]["train/loss"]) < 1e-5, (step, multi[step], single[step])


_NAN_SCRIPT = '''
import sys
sys.path.insert(0, sys.argv[1])
from esorl.config import load_config
sys.path.insert(0, sys.argv[1] + "/tests")
from rl_fixtures import EvenIdReward
from esorl.rl.grpo import GRPORecipe, build_grpo_trainer
from esorl.train.common import TrainingDiverged
rec = load_config(GRPORecipe, sys.argv[2], [])
tr = build_grpo_trainer(rec, [EvenIdReward(rec.policy.init_from)], [1.0])
p0 = next(p for p in tr.model.parameters() if p.requires_grad)
left = [1]
def hook(g):  # one rank's gradient overflows once (a backward overflow)
    if left[0] and tr.accelerator.process_index == 0:
        left[0] -= 1
        return g * float("nan")
    return g
p0.register_hook(hook)
try:
    tr.train()
    print("NO_DIVERGENCE")
except TrainingDiverged as e:
    open(sys.argv[3] + f".rank{tr.accelerator.process_index}", "w").write(str(e))
'''


@pytest.mark.slow
def test_zero_nonfinite_gradient_stops_before_the_engine_steps(tmp_path):
    """DeepSpeed steps inside its engine and skips non-finite gradients only in fp16: esorl
    checks the partitioned gradients first, on every rank, and stops before the update; no
    checkpoint is written from it."""
    sys.path.insert(0, str(REPO / "tests"))
    from rl_fixtures import make_tiny_policy, recipe_dict

    pol = make_tiny_policy(tmp_path)
    script = tmp_path / "nan_run.py"
    script.write_text(_NAN_SCRIPT)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    for name in ("cpu_zero2_2proc", "cpu_zero3_2proc"):
        out = tmp_path / name
        f = tmp_path / f"{name}.yaml"
        f.write_text(yaml.safe_dump(recipe_dict(pol, out, tmp_path / "cache", per_device_train_batch_size=4, save_steps=1)))
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_configs" / f"{name}.yaml")]
        marker = tmp_path / f"{name}.diverged"
        res = subprocess.run(launch + [str(script), str(REPO), str(f), str(marker)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        for rank in (0, 1):  # every rank stopped, before the update of step 1
            m = Path(f"{marker}.rank{rank}")
            assert m.exists() and "a gradient is non-finite at step 1" in m.read_text(), (name, rank, res.stdout[-2000:], res.stderr[-3000:])
        assert "NO_DIVERGENCE" not in res.stdout
        assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*")), name
