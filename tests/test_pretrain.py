"""The pretraining runner: end to end, exact resume, NaN guard, real text, bad input."""

import json

import pytest
import torch

from esorl.config import ConfigError, load_config
from esorl.train.common import CheckpointError, TrainingDiverged, read_metrics
from esorl.train.pretrain import PretrainConfig, run_pretrain

from conftest import SST2, need_sst2


def tiny_cfg(tmp_path, **over):
    base = {
        "model": {"hidden_size": 32, "n_layers": 2, "n_heads": 2, "cond_dim": 16},
        "data": {"source": "synthetic", "synthetic_size": 400, "max_length": 24, "truncate": True, "cache_dir": str(tmp_path / "cache")},
        "objective": {"alpha0": 0.25, "batch_split": 0.5},
        "training": {"learning_rate": 3e-3, "warmup_steps": 2, "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
                     "max_steps": 6, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "per_device_eval_batch_size": 4,
                     "eval_steps": 3, "eval_batches": 2, "save_steps": 3, "output_dir": str(tmp_path / "run"), "bf16": False,
                     "attention_backend": "sdpa", "logging_steps": 1},
        "logging": {"wandb_mode": "disabled"},
    }
    ov = [f"{k}={v}" for k, v in over.items()]
    return load_config(PretrainConfig, None, ov, base=base)


def test_end_to_end_and_exact_resume(tmp_path):
    full = run_pretrain(tiny_cfg(tmp_path / "a"))
    recs = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    losses = {r["step"]: r["train/loss"] for r in recs if "train/loss" in r}
    assert sorted(losses) == list(range(1, 7))
    evals = [r for r in recs if "val/nelbo" in r]
    assert evals and all(torch.isfinite(torch.tensor(r["val/nelbo"])) and r["val/ppl"] > 1 for r in evals)
    from esorl import EsoLMModel

    EsoLMModel.from_pretrained(full["model_dir"])  # exported with safetensors
    # killed during step 5 (after the step-3 checkpoint), then resumed
    import esorl.train.pretrain as pt

    real = pt.hybrid_loss

    def killed(model, x, v, cfg, seed, step, *a, **k):
        if step == 4 and model.training:
            raise KeyboardInterrupt("simulated kill")
        return real(model, x, v, cfg, seed, step, *a, **k)

    pt.hybrid_loss = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            run_pretrain(tiny_cfg(tmp_path / "b"))
    finally:
        pt.hybrid_loss = real
    cfg = tiny_cfg(tmp_path / "b")
    run_pretrain(cfg, resume="latest")
    recs_b = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    losses_b = {r["step"]: r["train/loss"] for r in recs_b if "train/loss" in r}
    assert sorted(losses_b) == list(range(1, 7))  # records after the checkpoint were redone once
    for s in range(1, 7):
        assert abs(losses[s] - losses_b[s]) < 1e-6, (s, losses[s], losses_b[s])
    state = json.loads((tmp_path / "b" / "run" / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["data_position"] == 48


def test_nan_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    import esorl.train.pretrain as pt

    real = pt.hybrid_loss

    def poisoned(model, x, v, cfg, seed, step, *a, **k):
        out = real(model, x, v, cfg, seed, step, *a, **k)
        if step == 4 and model.training:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(pt, "hybrid_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 5.*step-0000003"):
        run_pretrain(tiny_cfg(tmp_path))
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "step-0000003" / "trainer_state.json").exists()
    assert (ck / "latest").read_text() == "step-0000003"


def test_loss_falls_on_sst2(tmp_path):
    need_sst2()
    cfg = tiny_cfg(tmp_path, **{"data.source": str(SST2), "data.max_length": 32, "training.max_steps": 40, "training.save_steps": 0,
                                "training.eval_steps": 0, "training.per_device_train_batch_size": 16, "training.gradient_accumulation_steps": 1,
                                "training.per_device_eval_batch_size": 16, "model.hidden_size": 64})
    run_pretrain(cfg)
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["train/loss"] for r in recs if "train/loss" in r]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert "val/ppl" in recs[-1] and recs[-1]["val/ppl"] < 5000


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="training.max_stepz"):
        tiny_cfg(tmp_path, **{"training.max_stepz": 3})
    with pytest.raises(ConfigError, match="training.learning_rate"):
        tiny_cfg(tmp_path, **{"training.learning_rate": "fast"})
    with pytest.raises(FileNotFoundError, match="nope"):
        run_pretrain(tiny_cfg(tmp_path, **{"data.source": str(tmp_path / "nope.txt")}))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        run_pretrain(tiny_cfg(tmp_path, **{"data.source": str(empty), "data.eval_split": ""}))
    longdoc = tmp_path / "long.txt"
    longdoc.write_text(" ".join(["word"] * 50) + "\n")
    with pytest.raises(ValueError, match="max_length"):
        run_pretrain(tiny_cfg(tmp_path, **{"data.source": str(longdoc), "data.eval_split": "", "data.truncate": False}))
    # a corrupted checkpoint
    run_pretrain(tiny_cfg(tmp_path / "c", **{"training.max_steps": 3}))
    ck = tmp_path / "c" / "run" / "checkpoints" / "step-0000003"
    for f in ck.rglob("*.safetensors"):
        f.write_bytes(b"garbage")
    for f in ck.rglob("*.bin"):
        f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="step-0000003"):
        run_pretrain(tiny_cfg(tmp_path / "c"), resume="latest")


def test_gradient_checkpointing_keeps_the_gradient(tmp_path):
    """``train.gradient_checkpointing`` (pretraining and SFT): the same first-step gradient."""
    norms = []
    for gc in (False, True):
        run_pretrain(tiny_cfg(tmp_path / str(gc), **{"training.max_steps": 1, "training.gradient_checkpointing": gc, "training.eval_steps": 0}))
        norms.append(read_metrics(tmp_path / str(gc) / "run" / "metrics.jsonl")[0]["train/grad_norm"])
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)


def test_continued_pretraining_with_lora_trains_adapters_and_exports_merged(tmp_path):
    """LoRA in pretraining (continued from ``model.init_from``): only the adapters move, the
    export is a plain Eso-LM with them merged; LoRA from scratch is refused before any work."""
    import torch
    from safetensors.torch import load_file

    # a base whose adaLN gates have moved off their zero init (else no gradient reaches the blocks)
    base = run_pretrain(tiny_cfg(tmp_path / "base", **{"training.max_steps": 4, "training.ema_decay": 0.0}))["model_dir"]
    with pytest.raises(ConfigError, match="model.init_from"):
        tiny_cfg(tmp_path / "x", **{"lora.enabled": True})
    cfg = tiny_cfg(tmp_path / "lora", **{"model.init_from": base, "lora.enabled": True, "lora.r": 4, "training.max_steps": 3,
                                        "training.ema_decay": 0.0, "training.learning_rate": 1e-2})
    out = run_pretrain(cfg)
    before, after = load_file(f"{base}/model.safetensors"), load_file(f"{out['model_dir']}/model.safetensors")
    assert set(before) == set(after)  # a plain Eso-LM: no adapter tensors
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("blocks.") and ("attn" in k or "mlp" in k) for k in changed), changed
    from esorl import EsoLMModel

    EsoLMModel.from_pretrained(out["model_dir"])


def test_resume_reads_a_checkpoint_of_the_old_vocabulary(tmp_path):
    """A checkpoint written before the one vocabulary records its settings under the old
    names (``train.seed``, ``optim.lr``): a resume compares them under the new ones."""
    import json

    run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 2, "training.save_steps": 2}))
    st = tmp_path / "run" / "checkpoints" / "step-0000002" / "trainer_state.json"
    state = json.loads(st.read_text())
    old = {("train." + k[len("training."):] if k.startswith("training.") else k): v for k, v in state["config"].items()}
    old = {("optim.lr" if k == "train.learning_rate" else k): v for k, v in old.items()}
    state["config"] = old
    state.pop("kind")
    st.write_text(json.dumps(state))
    from esorl.train.common import CheckpointError

    with pytest.raises(CheckpointError, match=r"training\.seed 0 → 5"):
        run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 4, "training.seed": 5}), resume="latest")
    res = run_pretrain(tiny_cfg(tmp_path, **{"training.max_steps": 4, "training.learning_rate": 1e-3}), resume="latest")
    assert [r["step"] for r in res["metrics"] if "train/loss" in r] == [1, 2, 3, 4]
