"""CISPO reinforcement learning (rollouts, clipped IS-weight updates, GRPO/DAPO baselines).

Not implemented yet: tracked by the CISPO issue. The model and `m1jax.generate` it builds on exist.
"""
