"""Diffusion sampling with per-step log-probabilities, and reward fine-tuning (REINFORCE, PPO, LOOP)."""
