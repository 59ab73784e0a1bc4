"""The rollout engine: continuous batching over a fixed number of decode slots, with prefix sharing.

`rl.sampler.sample` runs on it. The engine holds one state pytree (donated to every call) with
`slots` S rows of decode cache (lightning states, softmax KV of `max_len` positions, and each
row's own cache `index`), the next-token logits of every slot, and the result buffers of the
call's R samples [R, N]. Two jitted programs act on it:

- `insert`: prefill Q distinct prompts once each (left-padded to a bucket Pb) and copy each
  prompt's cache and last logits into the slots of its samples: a group of G samples of one
  prompt costs one prefill (prefix sharing).
- `decode`: the sampling loop over all slots at once; a slot whose sample ends (stop token,
  confident run, or `max_new_tokens`) writes its result row and becomes free, and the loop
  returns to the host as soon as enough slots are free for the next pending group
  (continuous batching) or nothing is live.

Shapes are static per call (S, R, N, max_len, Pb, Q rounded up to a power of two); slot ids,
sample ids and counts are traced, so refilling a slot never recompiles. Token t of sample j is
drawn with key fold_in(fold_in(rng, j), t): a sample's tokens depend on its id and the
parameters, not on its slot, its batch-mates or the slot count (up to floating-point rounding:
the padding bucket and batch of the prefill that started it vary with the slot count, which can
move a logit in its last bits).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from m1jax.config import ModelConfig
from m1jax.generate import decode_step, prefill, process_logits

_F32 = jnp.float32
TRACES: collections.Counter = collections.Counter()  # times each program was traced (= compiled)
FINISH_STOP, FINISH_LENGTH, FINISH_CONFIDENT = 0, 1, 2


def groups_of(prompts: Sequence[np.ndarray]) -> list[tuple[int, int]]:
    """[(first row, count)] of runs of identical consecutive prompts: each run is prefilled once."""
    out = []
    for i, p in enumerate(prompts):
        if out and len(p) == len(prompts[out[-1][0]]) and np.array_equal(p, prompts[out[-1][0]]):
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def route_dtype(cfg: ModelConfig):
    """The dtype of recorded expert ids: one byte per choice while the experts fit (M1: 32)."""
    return jnp.uint8 if cfg.num_local_experts <= 256 else jnp.int32


def init_state(
    cfg: ModelConfig, params, slots: int, max_len: int, rows: int, n: int, pad_id: int, record: bool = False
) -> dict:
    """An empty engine state: every slot free, every result row unwritten. Jittable (ints static).
    `record`: also buffers for each sample's experts per token and layer (router replay): the
    prompt's [R, max_len - n, L, k] (right-aligned, as the rollout's left-padded prompt) and the
    response's [R, n, L, k]."""
    shapes = jax.eval_shape(lambda p: prefill(cfg, p, jnp.zeros((slots, 1), jnp.int32), max_len), params)[1]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    cache["index"] = jnp.zeros((slots,), jnp.int32)  # each slot at its own position
    extra = {}
    if record:
        shape = (cfg.num_hidden_layers, cfg.num_experts_per_tok)
        extra["prompt_routes"] = jnp.zeros((rows, max_len - n, *shape), route_dtype(cfg))
        extra["routes"] = jnp.zeros((rows, n, *shape), route_dtype(cfg))
    return extra | {
        "cache": cache,
        "last": jnp.zeros((slots, cfg.vocab_size), _F32),  # next-token logits
        "pos": jnp.zeros((slots,), jnp.int32),  # tokens generated so far
        "live": jnp.zeros((slots,), bool),
        "run": jnp.zeros((slots,), jnp.int32),  # confident-run counter
        "sid": jnp.full((slots,), rows, jnp.int32),  # result row; `rows` = free (writes are dropped)
        "kid": jnp.zeros((slots,), jnp.int32),  # the sample's key id (its tokens' random stream)
        "tokens": jnp.full((rows, n), pad_id, jnp.int32),
        "logp": jnp.zeros((rows, n), _F32),
        "length": jnp.zeros((rows,), jnp.int32),
        "finish": jnp.full((rows,), FINISH_LENGTH, jnp.int32),
        "steps": jnp.zeros((), jnp.int32),  # decode steps taken (each pushes all S slots through the model)
    }


def state_shardings(state, mesh, length=None) -> dict:
    """NamedShardings for an engine state (arrays or shapes) on a rollout mesh: slots and result rows
    over the batch axes ("data", "fsdp", "expert"), heads over "tensor": lightning states
    [n, r, S, H, Dk, Dv], softmax K/V [n, r, S, T, Hkv, D], per-slot [S, ...], results [R, ...].
    `length`: a mesh axis for the K/V positions T (a long prefill's cache, sequence parallel).
    A dimension the axes do not divide stays whole. Used to compile engine programs ahead of time."""
    from jax.sharding import NamedSharding, PartitionSpec

    from m1jax.mesh import BATCH_AXES

    batch = tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1) or None

    def fits(size, axes):
        names = (axes,) if isinstance(axes, str) else axes or ()
        return size % int(np.prod([mesh.shape[a] for a in names])) == 0

    def spec(path, leaf):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        dims = [None] * len(leaf.shape)
        if keys[-1] == "steps":
            pass
        elif keys[0] == "cache" and keys[-1] in ("state", "k", "v"):  # [n, r, S, ...]
            dims[2] = batch
            dims[3 if keys[-1] == "state" else 4] = "tensor"
            if keys[-1] != "state":
                dims[3] = length
        elif leaf.shape:  # [S, ...] per slot or [R, ...] per result row
            dims[0] = batch
        dims = [a if a is not None and fits(n, a) else None for n, a in zip(leaf.shape, dims, strict=True)]
        return NamedSharding(mesh, PartitionSpec(*dims))

    return jax.tree_util.tree_map_with_path(spec, state)


def insert(cfg: ModelConfig, params, st, prompts, lengths, src, slot_ids, sample_ids, key_ids, pos0, run0) -> dict:
    """Prefill prompts [Q, Pb] (left-padded, lengths [Q]) once each; slot `slot_ids[m]` starts
    sample `sample_ids[m]` (its result row; key id `key_ids[m]`) from prompt `src[m]` (m < S; padding
    entries use slot id S: dropped). A sample resumed mid-response (`rl.partial`) was prefilled with
    its `pos0[m]` tokens so far after the prompt and continues at token `pos0[m]`, its confident-run
    counter at `run0[m]`; a new one has both 0."""
    TRACES["insert"] += 1
    pb = prompts.shape[1]
    record = "routes" in st
    logits, c, *ids = prefill(cfg, params, prompts, pb, lengths=lengths, record_routes=record, last_only=True)

    def put(dst, new):  # new [n, r, Q, ...] -> the slots' rows of dst [n, r, S, ...] (softmax K/V: [:Pb])
        where = (slice(None), slice(None), slot_ids) + tuple(slice(0, d) for d in new.shape[3:])
        return dst.at[where].set(jnp.take(new, src, axis=2), mode="drop")

    cache = dict(st["cache"])
    for name in ("groups", "tail"):
        if name in cache:
            cache[name] = jax.tree.map(put, cache[name], c[name])
    set_rows = lambda a, v: a.at[slot_ids].set(v, mode="drop")
    cache["index"] = set_rows(cache["index"], pb)
    cache["start"] = set_rows(cache["start"], pb - lengths[src])
    extra = {}
    if record:  # the prompt's routes, right-aligned in the sample's row (free entries write nowhere)
        rows, width = st["prompt_routes"].shape[:2]
        row = jnp.where(slot_ids < slot_ids.shape[0], sample_ids, rows)
        routes = jnp.take(ids[0], src, axis=0).astype(st["prompt_routes"].dtype)
        extra["prompt_routes"] = st["prompt_routes"].at[row, width - pb :].set(routes, mode="drop")
    return dict(
        st,
        **extra,
        cache=cache,
        last=set_rows(st["last"], logits[src, -1].astype(_F32)),
        pos=set_rows(st["pos"], pos0),
        live=set_rows(st["live"], True),
        run=set_rows(st["run"], run0),
        sid=set_rows(st["sid"], sample_ids),
        kid=set_rows(st["kid"], key_ids),
    )


def decode(cfg: ModelConfig, sp, params, st: dict, rng, need) -> dict:
    """Decode every live slot until `need` slots are free (or none is live). `sp`: SamplingParams."""
    TRACES["decode"] += 1
    n = st["tokens"].shape[1]
    rows = st["tokens"].shape[0]
    temp = 1.0 if sp.greedy else sp.temperature
    stops = jnp.asarray(sp.stop_tokens or (-1,), jnp.int32)
    truncated = sp.top_k > 0 or sp.top_p < 1.0
    record = "routes" in st

    def cond(st):
        live = st["live"]
        return jnp.any(live) & (jnp.sum(~live) < need)

    def body(st):
        last, live, pos, sid, kid = st["last"], st["live"], st["pos"], st["sid"], st["kid"]
        proc = process_logits(last, temperature=temp, top_k=sp.top_k, top_p=sp.top_p)
        logsm = jax.nn.log_softmax(proc, axis=-1)
        if sp.greedy:
            tok = jnp.argmax(proc, axis=-1)
        else:
            keys = jax.vmap(lambda j, t: jax.random.fold_in(jax.random.fold_in(rng, j), t))(kid, pos)
            tok = jax.vmap(jax.random.categorical)(keys, proc)
        tok = jnp.where(live, tok, sp.pad_id).astype(jnp.int32)
        logp = jnp.take_along_axis(logsm, tok[:, None], axis=-1)[:, 0]
        # M1's confident-run rule is about the model's probability (temperature only).
        model = jax.nn.log_softmax(last / temp, axis=-1) if truncated else logsm
        model_logp = jnp.take_along_axis(model, tok[:, None], axis=-1)[:, 0]
        run = jnp.where(live & (jnp.exp(model_logp) > sp.confident_prob), st["run"] + 1, 0)
        stopped = jnp.isin(tok, stops)
        confident = (run >= sp.confident_run) if sp.confident_run > 0 else jnp.zeros_like(live)
        newly = live & (stopped | confident | (pos == n - 1))
        reason = jnp.where(stopped, FINISH_STOP, jnp.where(confident, FINISH_CONFIDENT, FINISH_LENGTH))
        row = jnp.where(live, sid, rows)  # free slots write nowhere
        done_row = jnp.where(newly, sid, rows)
        out, cache, *ids = decode_step(cfg, params, st["cache"], tok[:, None], record_routes=record)
        cache["index"] = jnp.where(live, cache["index"], st["cache"]["index"])  # free slots stay put
        still = live & ~newly
        extra = {}
        if record:  # the experts of the token just fed: response position `pos`
            extra["routes"] = st["routes"].at[row, pos].set(ids[0][:, 0].astype(st["routes"].dtype), mode="drop")
        return dict(
            st,
            **extra,
            cache=cache,
            last=out[:, 0],
            pos=pos + live,
            live=still,
            run=run,
            sid=jnp.where(newly, rows, sid),
            tokens=st["tokens"].at[row, pos].set(tok, mode="drop"),
            logp=st["logp"].at[row, pos].set(logp, mode="drop"),
            length=st["length"].at[done_row].set(pos + 1, mode="drop"),
            finish=st["finish"].at[done_row].set(reason, mode="drop"),
            steps=st["steps"] + 1,
        )

    return jax.lax.while_loop(cond, body, st)


_init = jax.jit(init_state, static_argnums=(0, 2, 3, 4, 5, 6, 7))
_insert = jax.jit(insert, static_argnums=(0,), donate_argnums=(2,))
_decode = jax.jit(decode, static_argnums=(0, 1), donate_argnums=(3,))


class Stats:
    """What one engine call did (for tests and benchmarks): prefills, insert and decode calls, and
    decode steps (each runs every slot through the model)."""

    def __init__(self):
        self.prefills = self.inserts = self.decodes = self.steps = 0


def run(
    cfg: ModelConfig,
    sp,
    params,
    prompts: Sequence[np.ndarray],
    rng,
    *,
    slots: int,
    pad_multiple: int,
    stats=None,
    key_ids: Sequence[int] | None = None,
):
    """Sample one response per prompt row on `slots` decode slots. prompts: 1-D int arrays.
    `key_ids`: each row's key id (its tokens' random stream; default the row index).

    Returns host arrays (tokens [R, N], logp [R, N], length [R], finish [R], routes), routes being
    None unless `sp.record_routes`: then each sample's experts [R, Tp + N, L, k] over its
    left-padded prompt (width Tp = the padded length of the longest prompt) and its response.
    """
    r = len(prompts)
    n = sp.max_new_tokens
    bucket = lambda m: -(-m // pad_multiple) * pad_multiple
    max_len = bucket(max(len(p) for p in prompts)) + n
    pending = groups_of(prompts)
    if any(c > slots for _, c in pending):  # a group larger than the engine: split it
        pending = [(i + k, min(slots, c - k)) for i, c in pending for k in range(0, c, slots)]
    pending.reverse()  # pop() from the end
    stats = stats if stats is not None else Stats()
    st = _init(cfg, params, slots, max_len, r, n, sp.pad_id, sp.record_routes)
    free = list(range(slots))
    while True:
        take = []
        while pending and pending[-1][1] <= len(free):
            first, count = pending.pop()
            take.append((first, [free.pop(0) for _ in range(count)]))
        if take:
            st = _insert(cfg, params, st, *_insert_args(prompts, take, slots, bucket, sp.pad_id, key_ids))
            stats.inserts += 1
            stats.prefills += len(take)
        need = pending[-1][1] if pending else slots + 1  # return when the next group fits
        if not pending and not take and len(free) == slots:
            break
        st = _decode(cfg, sp, params, st, rng, jnp.asarray(need, jnp.int32))
        stats.decodes += 1
        live = np.asarray(jax.device_get(st["live"]))
        free = [s for s in range(slots) if not live[s]]
        if not pending and not live.any():
            break
    toks, logp, length, finish, steps = jax.device_get(
        (st["tokens"], st["logp"], st["length"], st["finish"], st["steps"])
    )
    stats.steps += int(steps)
    routes = None
    if sp.record_routes:
        routes = np.concatenate(jax.device_get((st["prompt_routes"], st["routes"])), axis=1)
    return toks, logp, length, finish, routes


def _insert_args(prompts, take, slots: int, bucket, pad_id: int, key_ids=None):
    """Host arrays for `insert`: the distinct prompts of `take` [(row, slot list)] padded to a
    power-of-two count Q and a length bucket Pb, and per-slot (src, slot id, sample id) of length S."""
    q = _pow2(len(take))
    pb = bucket(max(len(prompts[i]) for i, _ in take))
    toks = np.full((q, pb), pad_id, np.int32)
    lengths = np.ones((q,), np.int32)
    src = np.zeros((slots,), np.int32)
    slot_ids = np.full((slots,), slots, np.int32)  # out of range: dropped
    sample_ids = np.zeros((slots,), np.int32)
    kids = np.zeros((slots,), np.int32)
    zeros = np.zeros((slots,), np.int32)
    m = 0
    for k, (first, ss) in enumerate(take):
        p = prompts[first]
        toks[k, pb - len(p) :] = p
        lengths[k] = len(p)
        for j, s in enumerate(ss):
            src[m], slot_ids[m], sample_ids[m] = k, s, first + j
            kids[m] = first + j if key_ids is None else key_ids[first + j]
            m += 1
    return toks, lengths, src, slot_ids, sample_ids, kids, zeros, zeros
