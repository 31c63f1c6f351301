"""A tiny policy directory (word tokenizer on the synthetic corpus + random Eso-LM) for RL tests."""

from pathlib import Path

import torch

from esorl import EsoLMConfig, EsoLMModel


def make_tiny_policy(root: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    from esorl.data import generate_reviews, tokenizer_ids, train_tokenizer

    out = root / "policy"
    if (out / "config.json").exists():
        return out
    texts = [r["text"] for r in generate_reviews(2000, seed=0)]
    tok = train_tokenizer(texts, root / "tok", kind="word", vocab_size=4096)
    ids = tokenizer_ids(tok)
    torch.manual_seed(seed)
    m = EsoLMModel(EsoLMConfig(vocab_size=ids["vocab_size"], mask_token_id=ids["mask"], hidden_size=hidden, n_layers=layers, n_heads=2,
                               cond_dim=16, max_seq_len=48, dropout=0.0, pad_token_id=ids["pad"], eos_token_id=ids["eos"], bos_token_id=ids["bos"]))
    with torch.no_grad():  # non-zero output layer so the policy is not uniform
        for n, p in m.named_parameters():
            if "adaLN" in n or "output_layer.linear" in n:
                p.normal_(0, 0.05)
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def recipe_dict(policy_dir: Path, out_dir: Path, cache: Path, **grpo) -> dict:
    """A GRPO recipe on the tiny policy; ``grpo`` fields are EsoGRPOConfig's (TRL's names).
    ``save_steps=k`` turns checkpoints on (default: none)."""
    g = {"output_dir": str(out_dir), "learning_rate": 3e-3, "lr_scheduler_type": "constant", "adam_beta2": 0.99, "max_steps": 2,
         "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 6, "diffusion_steps": 3, "sampling_alpha0": 1.0,
         "save_strategy": "steps" if grpo.get("save_steps") else "no", "attention_backend": "sdpa", "log_completions": False,
         "gradient_checkpointing": False, "disable_tqdm": True}
    g.update(grpo)
    return {
        "policy": {"init_from": str(policy_dir)},
        "prompts": {"source": "synthetic", "synthetic_size": 300, "prompt_words": 2, "eval_prompts": 0, "cache_dir": str(cache)},
        "rewards": [{"name": "keyword", "weight": 1.0, "kwargs": {"positive": ["great", "good", "wonderful"], "normalize": "words"}}],
        "grpo": g,
        "logging": {"wandb_mode": "disabled"},
    }


class EvenIdReward:
    """A trivially learnable reward: the fraction of completion words whose id is even
    (≈ 0.5 for a near-uniform policy, 1.0 when it only emits even ids)."""

    __name__ = "even_id_reward"

    def __init__(self, policy_dir):
        from esorl.data import load_tokenizer

        self.tok = load_tokenizer(str(policy_dir))

    def __call__(self, prompts, completions, **kw):
        out = []
        for c in completions:
            ids = self.tok(c, add_special_tokens=False)["input_ids"]
            out.append(sum(1 for i in ids if i % 2 == 0) / max(len(ids), 1))
        return out


def even_id_reward_factory(policy_dir):
    """``EvenIdReward`` as a recipe reward (``rewards: [{name: tests/rl_fixtures.py:even_id_reward_factory, kwargs: {policy_dir: ...}}]``)."""
    return EvenIdReward(policy_dir)
