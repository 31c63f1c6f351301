"""RL fine-tuning of Eso-LMs: GRPO (on TRL's ``GRPOTrainer``) and PPO over exact or Monte
Carlo likelihoods. ``from esorl.rl import EsoGRPOConfig, EsoGRPOTrainer`` (imported on first
access: TRL is a heavy import)."""

_LAZY = {"EsoGRPOConfig": "grpo_trainer", "EsoGRPOTrainer": "grpo_trainer", "GRPORecipe": "grpo", "run_grpo": "grpo",
         "EsoPPOConfig": "ppo", "EsoPPOTrainer": "ppo", "PPORecipe": "ppo"}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
