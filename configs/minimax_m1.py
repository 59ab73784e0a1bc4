"""MiniMax-M1 as published: 456.09B parameters, 45.94B active.

80 layers = 10 x [7 lightning + 1 softmax]; see m1jax/config.py. Edit fields with .replace(...).
"""

from m1jax import config


def get_config():
    return config.minimax_m1()
