"""A tiny model for tests (see m1jax/config.py). Edit fields with .replace(...)."""

from m1jax import config


def get_config():
    return config.tiny()
