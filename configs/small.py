"""~118M-parameter 7:1 hybrid for a laptop CPU: the embedded default.

See m1jax/config.py. Edit fields with .replace(...).
"""

from m1jax import config


def get_config():
    return config.small()
