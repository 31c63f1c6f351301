"""RL fine-tuning of Eso-LMs: GRPO and PPO over exact or Monte Carlo likelihoods."""
