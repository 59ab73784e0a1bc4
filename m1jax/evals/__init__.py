"""Evaluations of a model: held-out task accuracy (`heldout`) and needle retrieval (`needle`).

RL's held-out evaluation (greedy and sampled accuracy with paired changes) is `rl.evaluate`.
"""
