"""Explicit collectives on 8 host CPU devices equal the single-device computations.

- Expert parallelism (all-to-all dispatch): values and gradients equal the single-device dropless
  MoE; with a capacity factor, exactly the assignments past a full slot are dropped.
- LASP-2 lightning attention over `sequence`: values and gradients (q, k, v, initial state) equal
  the token recurrence on one device, with several blocks per shard and documents that cross,
  start at, or fill whole shards.
- Sequence-parallel softmax attention (all-gathered keys and values) equals the flash loop.
- The sharded training step really runs these collectives (they appear in its compiled program).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from m1jax import config, moe, parallel
from m1jax import sharding as shd
from m1jax.kernels import lightning_attention
from m1jax.kernels.lightning import run_ids
from m1jax.kernels.softmax import flash_attention
from m1jax.parallel import expert, sequence

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (host) devices")


def rel_rms(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


def _ids(shape):
    return "x".join(f"{k}{v}" for k, v in shape.items())


def _under(mesh, fn):
    """jit `fn` and run it with `mesh` as the context mesh (as the Trainer does)."""
    jitted = jax.jit(parallel.traced_under(mesh, fn))

    def run(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    return run


# -- expert parallelism --------------------------------------------------------------------

B, T, D, F, E, K = 4, 16, 8, 12, 8, 2


def _moe_inputs(seed=0, b=B):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    x = jax.random.normal(ks[0], (b, T, D))
    w_router = jax.random.normal(ks[1], (D, E))
    w = [jax.random.normal(kk, s) * 0.3 for kk, s in zip(ks[2:], [(E, D, F), (E, D, F), (E, F, D)], strict=True)]
    return x, w_router, w


def _single_moe(w_router, x, w1, w3, w2):
    xf = x.reshape(-1, D)
    _, weights, ids = moe.route(xf, w_router, K)
    return moe.experts_dense(xf, weights, ids, w1, w3, w2).reshape(x.shape)


def _parallel_moe(mesh, w_router, cf=0.0, impl=moe.experts_tiled):
    def f(x, w1, w3, w2):
        _, weights, ids = moe.route(x, w_router, K)
        m = jax.sharding.get_abstract_mesh()
        return expert.experts(x, weights, ids, w1, w3, w2, expert_fn=impl, mesh=m, capacity_factor=cf)

    return f


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", [{"expert": 8}, {"expert": 4, "fsdp": 2}, {"expert": 2, "tensor": 2, "sequence": 2}], ids=_ids
)
@pytest.mark.parametrize("impl", ["tiled", "dense"])
def test_expert_parallel_equals_single_device(shape, impl):
    x, w_router, w = _moe_inputs()
    mesh = shd.make_mesh(shape)
    par = _parallel_moe(mesh, w_router, impl=moe._IMPLS[impl])
    want = _single_moe(w_router, x, *w)
    got = _under(mesh, par)(x, *w)
    assert rel_rms(got, want) <= 1e-6

    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
    want_g = jax.grad(loss(lambda *a: _single_moe(w_router, *a)), argnums=(0, 1, 2, 3))(x, *w)
    got_g = _under(mesh, jax.grad(loss(par), argnums=(0, 1, 2, 3)))(x, *w)
    for g, r in zip(got_g, want_g, strict=True):
        assert rel_rms(g, r) <= 1e-6


def _expected_with_drops(x, w_router, w, ep, n_shards, cap):
    """The single-device MoE with the assignments an all-to-all of capacity `cap` drops: per source
    shard (a contiguous block of tokens), per destination shard, those past the first `cap` in token
    order (written independently of the implementation, in NumPy)."""
    xf = np.asarray(x).reshape(-1, D)
    _, weights, ids = (np.asarray(a) for a in moe.route(jnp.asarray(xf), w_router, K))
    keep = np.ones_like(weights, bool)
    per = xf.shape[0] // n_shards
    for s in range(n_shards):
        used = np.zeros(ep, int)
        for n in range(s * per, (s + 1) * per):
            for j in range(K):
                dest = ids[n, j] // (E // ep)
                keep[n, j] = used[dest] < cap
                used[dest] += 1
    out = moe.experts_dense(jnp.asarray(xf), jnp.asarray(weights * keep), jnp.asarray(ids), *w)
    return np.asarray(out).reshape(x.shape), int((~keep).sum())


@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0])
def test_expert_capacity_drops_exactly_the_overflow(cf):
    x, w_router, w = _moe_inputs(seed=1, b=8)
    mesh = shd.make_mesh({"expert": 4, "fsdp": 2})  # 8 token shards (batch over fsdp x expert), 4 expert shards
    got = _under(mesh, _parallel_moe(mesh, w_router, cf))(x, *w)
    n_local = 8 * T // 8
    cap = expert.capacity(n_local * K, 4, cf)
    want, dropped = _expected_with_drops(x, w_router, w, 4, 8, cap)
    assert rel_rms(got, want) <= 1e-6
    if cf <= 1.0:
        assert dropped > 0  # random routing overflows a slot of the balanced size
    dropless = _single_moe(w_router, x, *w)
    assert (rel_rms(got, dropless) > 1e-3) == (dropped > 0)


@pytest.mark.slow
def test_moe_module_uses_all_to_all_on_an_expert_mesh():
    cfg = config.tiny(num_local_experts=8, hidden_size=48)
    mesh = shd.make_mesh({"expert": 4, "fsdp": 2})
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 48))
    valid = jnp.ones((8, 16), bool)
    layer = moe.MoE(cfg)
    params = layer.init(jax.random.PRNGKey(1), x, valid)
    want, want_stats = layer.apply(params, x, valid)
    fn = _under(mesh, lambda p, x: layer.apply(p, x, valid))
    got, got_stats = fn(params, x)
    assert rel_rms(got, want) <= 1e-6
    np.testing.assert_allclose(got_stats.counts, want_stats.counts)
    with jax.set_mesh(mesh):
        text = jax.jit(parallel.traced_under(mesh, lambda p, x: layer.apply(p, x, valid))).lower(params, x).as_text()
    assert "all_to_all" in text or "all-to-all" in text
    gspmd = _under(mesh, lambda p, x: moe.MoE(cfg.replace(parallel_impl="gspmd")).apply(p, x, valid))
    assert rel_rms(gspmd(params, x)[0], want) <= 1e-6


@pytest.mark.slow
def test_router_replay_on_an_expert_mesh_equals_the_local_path():
    """Replayed experts (router replay) through the all-to-all dispatch give the local replay's values
    and router gradient, and count the same flips."""
    cfg = config.tiny(num_local_experts=8, hidden_size=48)
    mesh = shd.make_mesh({"expert": 4, "fsdp": 2})
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 48))
    valid = jnp.ones((8, 16), bool)
    routes = jax.random.randint(jax.random.PRNGKey(2), (8, 16, 1), 0, 4) * 2 + jnp.array([0, 1])  # distinct pairs
    layer = moe.MoE(cfg)
    params = layer.init(jax.random.PRNGKey(1), x, valid)
    loss = lambda p, x: jnp.sum(layer.apply(p, x, valid, routes)[0] ** 2)
    want, want_stats = layer.apply(params, x, valid, routes)
    got, got_stats = _under(mesh, lambda p, x: layer.apply(p, x, valid, routes))(params, x)
    assert rel_rms(got, want) <= 1e-6
    np.testing.assert_array_equal(np.asarray(got_stats.ids), np.asarray(want_stats.ids))
    assert float(got_stats.flips) == float(want_stats.flips) > 0
    g_want = jax.grad(loss)(params, x)["params"]["router"].unbox()
    g_got = _under(mesh, jax.grad(loss))(params, x)["params"]["router"].unbox()
    assert rel_rms(g_got, g_want) <= 1e-5 and float(jnp.abs(g_want).max()) > 0


def test_capacity_factor_is_validated():
    with pytest.raises(ValueError, match="moe_capacity_factor"):
        config.tiny(moe_capacity_factor=-1.0)
    with pytest.raises(ValueError, match="parallel_impl"):
        config.tiny(parallel_impl="ring")


# -- sequence parallelism: lightning (LASP-2) ------------------------------------------------

SLOPES = jnp.array([0.92, 0.083, 1e-3, 5e-5])  # decays exp(-s): ~0.40 to ~0.99995


def _lightning_inputs(t, dk=8, dv=12, b=2, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k = (jax.random.normal(kk, (b, t, 4, dk)) * 0.5 for kk in ks[:2])
    v = jax.random.normal(ks[2], (b, t, 4, dv))
    h0 = jax.random.normal(ks[3], (b, 4, dk, dv)) * 0.3
    w = jax.random.normal(ks[4], (b, t, 4, dv))
    return q, k, v, h0, w


def _segments(t, shard, kind):
    """[2, t] segment ids: documents crossing shard boundaries, starting exactly at one, filling
    several whole shards, or padding (id 0) at the end."""
    if kind is None:
        return None
    row0 = np.ones(t, np.int32)
    row1 = np.ones(t, np.int32)
    if kind == "cross":
        row0[shard // 2 :] = 2  # a document starting mid-shard, running through later shards
        row0[3 * shard + 5 :] = 3
        row1[shard + 1 :] = 2
    else:  # "aligned": boundaries exactly at shard starts, a 3-shard document, trailing padding
        row0[shard:] = 2
        row0[4 * shard :] = 3
        row1[2 * shard :] = 2
        row1[-shard // 2 :] = 0
    return jnp.asarray(np.stack([row0, row1]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape", [{"sequence": 8}, {"sequence": 4, "tensor": 2}, {"sequence": 2, "data": 2, "tensor": 2}], ids=_ids
)
@pytest.mark.parametrize("segments", [None, "cross", "aligned"])
def test_lasp2_equals_recurrence(shape, segments):
    n = shape["sequence"]
    shard = 40 if n == 8 else 80  # block 16: 2.5 or 5 blocks per shard
    t = n * shard
    q, k, v, h0, w = _lightning_inputs(t)
    seg = _segments(t, shard, segments)
    runs = None if seg is None else run_ids(seg)
    mesh = shd.make_mesh(shape)

    def par(q, k, v, h0):
        m = jax.sharding.get_abstract_mesh()
        return sequence.lightning(q, k, v, SLOPES, runs=runs, initial_state=h0, impl="reference", block_size=16, mesh=m)

    def ref(q, k, v, h0):
        return lightning_attention(q, k, v, SLOPES, initial_state=h0, segment_ids=seg, impl="recurrent")

    (out, final), (want_out, want_final) = _under(mesh, par)(q, k, v, h0), ref(q, k, v, h0)
    assert rel_rms(out, want_out) <= 1e-5
    assert rel_rms(final, want_final) <= 1e-5

    def loss(f):
        def g(q, k, v, h0):
            o, s = f(q, k, v, h0)
            return jnp.sum(o * w) + jnp.sum(s * jnp.cos(h0))

        return jax.grad(g, argnums=(0, 1, 2, 3))

    got_g, want_g = _under(mesh, loss(par))(q, k, v, h0), loss(ref)(q, k, v, h0)
    for name, g, r in zip("q k v h0".split(), got_g, want_g, strict=True):
        assert rel_rms(g, r) <= 1e-5, name


def test_lasp2_gathers_states_not_tokens():
    """The only cross-shard traffic of LASP-2 is the [R, B, H, Dk, Dv] end states (plus ids)."""
    mesh = shd.make_mesh({"sequence": 8})
    q, k, v, _, _ = _lightning_inputs(8 * 64)
    sh = NamedSharding(mesh, P(None, "sequence"))
    q, k, v = (jax.device_put(x, sh) for x in (q, k, v))

    def par(q, k, v):
        m = jax.sharding.get_abstract_mesh()
        return sequence.lightning(q, k, v, SLOPES, impl="reference", block_size=16, mesh=m)[0]

    with jax.set_mesh(mesh):
        hlo = jax.jit(parallel.traced_under(mesh, par)).lower(q, k, v).compile().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather(" in line or "all-gather-start(" in line]
    assert gathers, "no all-gather in the compiled program"
    assert all("[8,2,4,8,12]" in line or "s32[8,2]" in line for line in gathers), gathers


# -- sequence parallelism: softmax -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("shape", [{"sequence": 8}, {"sequence": 4, "tensor": 2}], ids=_ids)
@pytest.mark.parametrize("segments", [None, "cross"])
def test_sequence_parallel_softmax_equals_flash(shape, segments):
    n = shape["sequence"]
    shard = 48
    t = n * shard
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    q = jax.random.normal(ks[0], (2, t, 4, 16))
    k, v = (jax.random.normal(kk, (2, t, 2, 16)) for kk in ks[1:3])
    w = jax.random.normal(ks[3], (2, t, 4, 16))
    seg = _segments(t, shard, segments)
    runs = None if seg is None else run_ids(seg)
    mesh = shd.make_mesh(shape)

    def par(q, k, v):
        return sequence.softmax(q, k, v, runs=runs, mesh=jax.sharding.get_abstract_mesh())

    def ref(q, k, v):
        return flash_attention(q, k, v, runs)

    assert rel_rms(_under(mesh, par)(q, k, v), ref(q, k, v)) <= 1e-5
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))
    for g, r in zip(_under(mesh, grad(par))(q, k, v), grad(ref)(q, k, v), strict=True):
        assert rel_rms(g, r) <= 1e-5


# -- the training step runs them ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape, used",
    [({"expert": 4, "fsdp": 2}, {"experts"}), ({"sequence": 4, "fsdp": 2}, {"lightning", "softmax"})],
    ids=lambda x: _ids(x) if isinstance(x, dict) else "-".join(sorted(x)),
)
def test_trainer_traces_the_explicit_collectives(monkeypatch, shape, used):
    """The Trainer's step traces under its mesh, so the model takes the shard_map paths (whose
    results tests/test_sharded_train.py compares with one device); "gspmd" takes none."""
    from m1jax.train import config as tc
    from m1jax.train import optim
    from m1jax.train.step import Trainer

    calls = []
    for mod, name in ((expert, "experts"), (sequence, "lightning"), (sequence, "softmax")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    c = tc.base_config()
    c.model.update(preset="tiny", vocab_size=96, num_local_experts=8)
    c.update(batch_size=8, seq_len=64)
    cfg = tc.validate(c)
    lr = optim.schedule("constant", 1e-3, 10, 0)
    for impl, want in (("shard_map", used), ("gspmd", set())):
        calls.clear()
        tr = Trainer(cfg.replace(parallel_impl=impl), optim.adamw(lr), lr, shd.make_mesh(shape))
        batch = {
            n: jax.ShapeDtypeStruct((8, 64), jnp.int32, sharding=tr.batch_sharding) for n in ("tokens", "segment_ids")
        }
        tr.step.lower(tr.abstract_state, batch)
        assert set(calls) == want, (impl, calls)
