"""m1jax: MiniMax-M1 hybrid lightning/softmax MoE models in JAX/Flax."""

from m1jax import config
from m1jax import host as _host
from m1jax.config import ModelConfig, layer_plan, minimax_m1
from m1jax.model import M1Model, abstract_params, init_params, param_axes

_host.skip_absent_tpu()  # before JAX starts its backends (importing does not): no TPU probe without a TPU

__all__ = [
    "M1Model",
    "ModelConfig",
    "abstract_params",
    "config",
    "init_params",
    "layer_plan",
    "minimax_m1",
    "param_axes",
]
