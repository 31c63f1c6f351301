"""The study the toolkit exists for: the same RL run with exact vs Monte Carlo likelihoods."""
