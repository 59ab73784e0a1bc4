"""The MiniMax-M1 decoder: embedding, scanned groups of hybrid layers, final norm, LM head.

The layer list is split into a repeating pattern (M1: 7 lightning + 1 softmax) scanned `n` times
with `nn.scan`, plus an optional tail, so compile time does not grow with depth. Each layer derives
its lightning decay from its *global* index, carried in the scan.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m1jax.attention import SoftmaxAttention
from m1jax.config import LIGHTNING, ModelConfig, layer_plan
from m1jax.kernels.lightning import run_ids
from m1jax.layers import Context, RMSNorm, layer_slopes, param, project
from m1jax.lightning_attention import LightningAttention
from m1jax.moe import MoE, RouterStats, resolve_impl, switch_aux_loss

_F32 = jnp.float32
_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    """Post-norm residual (SPEC 1.1): y = a*RMSNorm(x) + b*Attn(RMSNorm(x)); same for the MoE."""

    cfg: ModelConfig
    kind: int
    mode: str = "train"
    max_len: int | None = None

    @nn.compact
    def __call__(self, x, layer_idx, cache, ctx: Context):
        """x [B, T, D] -> (x, (new cache, RouterStats)): the signature of a scan body."""
        c = self.cfg
        pdt = c.params_dtype
        h = RMSNorm(c.rms_norm_eps, ("embed",), pdt, name="input_norm")(x)
        if self.kind == LIGHTNING:
            slopes = layer_slopes(c.num_attention_heads, layer_idx, c.num_hidden_layers)
            a, cache = LightningAttention(c, self.mode, name="attn")(h, slopes, ctx, cache)
            alpha, beta = c.layernorm_linear_attention_alpha, c.layernorm_linear_attention_beta
        else:
            a, cache = SoftmaxAttention(c, self.mode, self.max_len, name="attn")(h, ctx, cache)
            alpha, beta = c.layernorm_full_attention_alpha, c.layernorm_full_attention_beta
        y = alpha * (h if c.postnorm else x) + beta * a
        z = RMSNorm(c.rms_norm_eps, ("embed",), pdt, name="post_norm")(y)
        routes = None if ctx.routes is None else ctx.routes[layer_idx]  # [B, T, k] of this layer
        stacked = None
        if ctx.experts is not None:  # this run's stacks and where its layer `base` sits (LayerGroup)
            w1, w3, w2, g, base = ctx.experts
            stacked = (w1, w3, w2, (g, layer_idx - base))
        m, stats = MoE(c, name="moe")(z, ctx.valid, routes, stacked)
        out = c.layernorm_mlp_alpha * (z if c.postnorm else y) + c.layernorm_mlp_beta * m
        return out.astype(c.compute_dtype), (cache, stats)


def _layer_stack(cfg: ModelConfig, mode: str):
    """`nn.scan` over consecutive layers of one kind (each with its own params and index)."""
    cls = DecoderLayer
    if mode == "train" and cfg.remat != "none":
        cls = nn.remat(DecoderLayer, policy=_REMAT[cfg.remat], prevent_cse=False)
    return nn.scan(
        cls,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, 0, nn.broadcast),
        metadata_params={nn.PARTITION_NAME: "sublayers"},
    )


class LayerGroup(nn.Module):
    """One period of the layer pattern, the body of the outer layer scan. Each run of same-kind
    layers inside it (M1: 7 lightning, then 1 softmax) is an inner scan, so the compiled body holds
    one layer of each kind however long the pattern is."""

    cfg: ModelConfig
    kinds: tuple[int, ...]
    first_layer: int = 0  # global index of this stack's first layer
    mode: str = "train"
    max_len: int | None = None

    @nn.compact
    def __call__(self, x, g, caches, ctx: Context):
        new_caches, stats = [], []
        for j, (kind, offset, length) in enumerate(pattern_runs(self.kinds)):
            layer_idx = self.first_layer + g * len(self.kinds) + offset + jnp.arange(length)
            stack = _layer_stack(self.cfg, self.mode)(self.cfg, kind, self.mode, self.max_len, name=f"run_{j}")
            run_ctx = ctx
            if ctx.experts is not None:
                run_ctx = ctx._replace(experts=(*ctx.experts[j], g, layer_idx[0]))
            x, (cache, st) = stack(x, layer_idx, None if caches is None else caches[j], run_ctx)
            new_caches.append(cache)
            stats.append(st)
        stats = jax.tree.map(lambda *s: jnp.concatenate(s), *stats)  # [p, ...] in layer order
        return x, (None if self.mode == "train" else tuple(new_caches), stats)


def pattern_runs(kinds: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Consecutive same-kind layers: [(kind, offset, length)], e.g. 7L+1S -> [(0, 0, 7), (1, 7, 1)]."""
    runs: list[tuple[int, int, int]] = []
    for i, k in enumerate(kinds):
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((k, i, 1))
    return runs


ScannedGroups = nn.scan(
    LayerGroup,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    in_axes=(0, 0, nn.broadcast),
    metadata_params={nn.PARTITION_NAME: "layers"},
)


def _positions_in_runs(runs: jax.Array) -> jax.Array:
    """[B, T] run ids -> position of each token inside its own document."""
    t = jnp.arange(runs.shape[1])
    is_start = jnp.concatenate([jnp.ones_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], axis=1)
    return t - jax.lax.cummax(jnp.where(is_start, t, 0), axis=1)


class M1Model(nn.Module):
    """`apply({'params': p}, tokens[B, T], segment_ids=None) -> (logits fp32 [B, T, V], aux)`.

    segment_ids: [B, T] ints; each contiguous run of equal ids is one document (attention, the
    lightning state and RoPE positions restart there); id 0 marks padding, left out of the router
    statistics. aux: {"router_aux_loss": Switch loss pooled over layers (= top-k when balanced),
    "expert_load": [L, E] fraction of each layer's assignments per expert}.

    Router replay (R3): `routes` [B, T, L, k] gives every token's experts in every layer (as
    recorded by a sampler's forward with `run(record_routes=True)`, which adds aux["expert_ids"]
    [B, T, L, k] int32); the router still computes its probabilities (and gradient) and
    aux["router_flips"] counts valid tokens whose own top-k differs, summed over layers.
    """

    cfg: ModelConfig

    def __call__(self, tokens, segment_ids=None, positions=None, routes=None):
        logits, aux, _ = self.run(tokens, segment_ids, positions, routes=routes)
        return logits, aux

    @nn.compact
    def run(
        self,
        tokens,
        segment_ids=None,
        positions=None,
        cache=None,
        mode="train",
        max_len=None,
        start=None,
        hidden=False,
        routes=None,
        record_routes=False,
    ):
        """All modes. prefill: `start` [B] = first real token (left padding), returns a cache with
        `max_len` slots. decode: tokens [B, 1] and the cache from prefill/decode. hidden=True returns
        the final-normed hidden states [B, T, D] instead of logits (for a chunked loss: `lm_head`).
        routes / record_routes: router replay and recording (class docstring)."""
        c = self.cfg
        check_tokens(tokens, c.vocab_size)
        b, t = tokens.shape
        ctx = self._context(tokens, segment_ids, positions, cache, mode, start)
        if routes is not None:  # [B, T, L, k] -> [L, B, T, k]: each layer indexes its own
            want = (b, t, c.num_hidden_layers, c.num_experts_per_tok)
            if tuple(routes.shape) != want:
                raise ValueError(f"routes must be [B, T, L, k] = {want}, got {tuple(routes.shape)}")
            ctx = ctx._replace(routes=jnp.moveaxis(jnp.asarray(routes, jnp.int32), 2, 0))

        init = nn.initializers.normal(c.initializer_range)
        embed = param(self, "embed", (c.vocab_size, c.hidden_size), ("vocab", "embed"), init, c.params_dtype)
        x = jnp.take(embed, tokens, axis=0).astype(c.compute_dtype)
        x = self.perturb("embeddings", x)  # no-op unless a "perturbations" collection asks for d/dx

        pattern, n_groups, tail = layer_plan(c)
        new_cache, all_stats = {}, []
        for name, kinds, n, first in (("groups", pattern, n_groups, 0), ("tail", tail, 1, n_groups * len(pattern))):
            if not kinds:
                continue
            stack = ScannedGroups(c, kinds, first, mode, max_len, name=name)
            stack_ctx = ctx._replace(experts=self._stacked_experts(name, kinds)) if mode == "decode" else ctx
            x, (caches, stats) = stack(x, jnp.arange(n), None if cache is None else cache[name], stack_ctx)
            new_cache[name] = caches
            all_stats.append(jax.tree.map(lambda s: s.reshape(-1, *s.shape[2:]), stats))  # [n*p, ...]

        x = RMSNorm(c.rms_norm_eps, ("embed",), c.params_dtype, name="final_norm")(x)
        if c.tie_word_embeddings:
            head = embed.T
        else:
            head = param(self, "lm_head", (c.hidden_size, c.vocab_size), ("embed", "vocab"), init, c.params_dtype)
        logits = x if hidden else lm_head(c, x, head)  # [B, T, V]

        stats = RouterStats(*(jnp.concatenate(s) for s in zip(*all_stats, strict=True)))
        load = stats.counts / jnp.maximum(stats.tokens[:, None] * c.num_experts_per_tok, 1.0)
        aux = {"router_aux_loss": switch_aux_loss(stats, c.num_local_experts), "expert_load": load}
        if routes is not None:
            aux["router_flips"] = jnp.sum(stats.flips)
        if record_routes:  # [L, B*T, k] -> [B, T, L, k]
            aux["expert_ids"] = jnp.moveaxis(stats.ids.reshape(stats.ids.shape[0], b, t, -1), 0, 2)
        if mode == "train":
            return logits, aux, None
        index = jnp.asarray(t, jnp.int32) if mode == "prefill" else cache["index"] + 1
        new_cache.update(index=index, start=ctx.start)
        return logits, aux, new_cache

    def _stacked_experts(self, name: str, kinds: tuple[int, ...]):
        """Decode with the tiled experts: each run's unsliced (w1, w3, w2) [n, p, E, ...] of stack
        `name`, for the MoE to slice one expert at a time (`moe._tiles_forward`: on CPU the layer
        scan's slice of a layer's experts is a copy of them all). None otherwise."""
        if resolve_impl(self.cfg.moe_impl) != "tiled" or self.is_initializing():
            return None
        p = nn.unbox(self.variables["params"][name])
        return tuple(
            tuple(p[f"run_{j}"]["moe"][w] for w in ("w1", "w3", "w2")) for j in range(len(pattern_runs(kinds)))
        )

    @staticmethod
    def _context(tokens, segment_ids, positions, cache, mode, start) -> Context:
        b, t = tokens.shape
        if mode == "decode":
            pos = (cache["index"] - cache["start"])[:, None]
            return Context(pos, None, jnp.ones((b, 1), bool), cache["index"], cache["start"])
        if mode == "prefill" and start is not None:  # left padding: pads are document 0
            segment_ids = (jnp.arange(t)[None, :] >= start[:, None]).astype(jnp.int32)
        runs = None if segment_ids is None else run_ids(segment_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t)) if runs is None else _positions_in_runs(runs)
        valid = jnp.ones((b, t), bool) if segment_ids is None else segment_ids != 0
        if mode == "prefill" and start is None:
            start = jnp.zeros((b,), jnp.int32)
        return Context(positions, runs, valid, None, start)


def lm_head(cfg: ModelConfig, x, head):
    """Final hidden states [..., D] x head [D, V] -> fp32 logits [..., V], in the head's dtype policy."""
    hdt = _F32 if cfg.lm_head_fp32 else cfg.compute_dtype
    return project(x.astype(hdt), head.astype(hdt)).astype(_F32)


def head_weight(cfg: ModelConfig, params):
    """The [D, V] LM-head matrix of a parameter tree (the embedding's transpose when tied)."""
    return params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]


def check_tokens(tokens, vocab_size: int) -> None:
    """Raise on tokens that are not an integer [B, T] array (always: shape and dtype are static) or
    hold ids outside [0, vocab_size) (when the values are known, i.e. not under `jit`)."""
    if not hasattr(tokens, "shape") or not hasattr(tokens, "dtype"):
        raise TypeError(f"tokens must be an integer array [B, T], got {type(tokens).__name__}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if len(tokens.shape) != 2:
        raise ValueError(f"tokens must be [B, T] (batch, time), got shape {tuple(tokens.shape)}")
    if not isinstance(tokens, (np.ndarray, jax.Array)) or tokens.size == 0:
        return
    if isinstance(tokens, jax.core.Tracer):  # under jit: values unknown
        return
    if isinstance(tokens, jax.Array) and not tokens.is_fully_addressable:  # other hosts' rows: not ours to read
        return
    values = np.asarray(tokens)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size}); got min {lo}, max {hi}")


def init_params(cfg: ModelConfig, rng: jax.Array, seq_len: int = 8):
    """Random parameters as plain arrays (logical axis metadata stripped; see `param_axes`)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return nn.unbox(M1Model(cfg).init(rng, tokens)["params"])


def abstract_params(cfg: ModelConfig):
    """Shapes and dtypes of the parameters (boxed with logical axes), never allocated."""
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    return jax.eval_shape(lambda r, t: M1Model(cfg).init(r, t), jax.random.PRNGKey(0), tokens)["params"]


def param_axes(cfg: ModelConfig):
    """A pytree of `PartitionSpec`s of logical axis names, matching `init_params`."""
    return nn.get_partition_spec(abstract_params(cfg))
