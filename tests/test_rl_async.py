"""Asynchronous off-policy RL (`rl.max_staleness`, `rl.rollout_mesh`, `rl.worker`): the version rule,
determinism whatever the thread timing, the 4 + 4 device split, and resume without a batch lost or
counted twice."""

import os
import threading

import jax
import numpy as np
import pytest
from test_rl_train import rows, small_toy

from rl import rollouts
from rl.config import validate
from rl.loop import TIMINGS, train
from rl.worker import RolloutWorker

ASYNC = {"rl.old_logp": "sampler"}  # K > 0 needs the behaviour policy's log-probs in the ratio


def values(workdir, key="loss"):
    """The metrics rows with `key`, without the timings (which no two runs share)."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows(workdir, key)]


def params_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- the worker alone (no model): version rule, throttle, errors ---


def _worker(k, stop, produce=None, start=0, saved=()):
    calls = []

    def default(params, step, version):
        calls.append((step, version, params))
        return {"step": np.asarray(step), "version": np.asarray(version)}

    w = RolloutWorker(
        produce or default, start=start, stop=stop, staleness=k, floor=start, place=lambda p: p, saved=saved
    )
    return w, calls


@pytest.mark.parametrize("k", [0, 1, 3])
def test_worker_samples_step_s_with_version_s_minus_k(k):
    w, calls = _worker(k, stop=8)
    w.publish(0, "v0")
    for s in range(8):
        batch, _ = w.get(s)
        assert int(batch["version"]) == max(0, s - k)
        w.publish(s + 1, f"v{s + 1}")
    w.close()
    assert [(s, v) for s, v, _ in calls] == [(s, max(0, s - k)) for s in range(8)]
    assert all(p == f"v{v}" for _, v, p in calls)  # each batch got the params of its version


def test_worker_runs_at_most_k_plus_one_batches_ahead():
    w, calls = _worker(2, stop=10)
    w.publish(0, "v0")
    w.pending(0, 3)  # batches 0..2 need version 0 only
    threading.Event().wait(0.3)  # give it time to (wrongly) run further
    assert len(calls) == 3  # batch 3 needs version 1, which the learner has not published
    w.publish(1, "v1")
    w.pending(3, 4)
    assert len(calls) == 4
    w.close()


def test_worker_copies_only_the_versions_a_batch_needs():
    placed = []
    w = RolloutWorker(
        lambda p, s, v: {"step": np.asarray(s)}, start=0, stop=6, staleness=2, floor=0, place=placed.append
    )
    for v in range(7):  # the learner publishes after every step; batch 5 needs version 3 at most
        w.publish(v, f"v{v}")
        if v < 6:
            w.get(v)
    w.close()
    assert placed == ["v0", "v1", "v2", "v3"]
    assert not w.versions and not w.batches  # nothing held once closed


def test_worker_error_reaches_the_learner():
    def produce(params, step, version):
        if step == 2:
            raise ValueError("reward server down")
        return {"step": np.asarray(step), "version": np.asarray(version)}

    w, _ = _worker(3, stop=8, produce=produce)
    w.publish(0, "v0")
    w.get(0)
    w.get(1)
    with pytest.raises(RuntimeError, match="rollout worker failed at step 2.*reward server down"):
        w.get(2)
    w.close()


def test_worker_resumes_after_saved_batches():
    saved = [{"step": np.asarray(s), "version": np.asarray(s - 2)} for s in (5, 6)]
    w, calls = _worker(2, stop=9, start=5, saved=saved)
    w.publish(5, "v5")
    assert int(w.get(5)[0]["version"]) == 3 and int(w.get(6)[0]["version"]) == 4  # restored, not resampled
    assert int(w.get(7)[0]["version"]) == 5
    w.close()
    assert [(s, v) for s, v, _ in calls][:1] == [(7, 5)]


# --- config ---


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"rl.max_staleness": -1}, "rl.max_staleness"),
        ({"rl.max_staleness": 1}, "rl.max_staleness"),  # old_logp "trainer" without a correction
        ({"rl.rollout_mesh.data": -2}, "rl.rollout_mesh.data"),
        ({"rl.rollout_mesh.data": 2, "mesh.data": -1}, "rl.rollout_mesh"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"config\.{field}="):
        validate(small_toy(overrides))


def test_a_rollout_mesh_needs_free_devices(tmp_path):
    c = small_toy({"rl.rollout_mesh.data": 16, **ASYNC})
    with pytest.raises(ValueError, match=r"rl\.rollout_mesh.*needs 16 devices.*8 devices each"):
        train(c, str(tmp_path), progress=False)


@pytest.mark.parametrize("ratio", [{"rl.old_logp": "sampler"}, {"rl.mismatch.mode": "tis"}])
def test_max_staleness_needs_the_behaviour_policy_in_the_ratio(ratio):
    """K > 0 is accepted with sampler log-probs or a mismatch correction, refused with neither."""
    c = small_toy({"rl.max_staleness": 1, **ratio})
    validate(c)  # accepted
    with c.unlocked():
        c.rl.old_logp, c.rl.mismatch.mode = "trainer", "none"
    with pytest.raises(ValueError, match=r"config\.rl\.max_staleness="):
        validate(c)


# --- runs ---


@pytest.mark.slow
@pytest.mark.parametrize("k", [2])
def test_async_runs_are_deterministic_and_report_staleness(tmp_path, k):
    """Two runs with staleness K give the same rows and params; staleness = min(step, K) every step."""
    c = small_toy({"steps": 5, "rl.max_staleness": k, **ASYNC})
    a = train(c, str(tmp_path / "a"), progress=False)
    b = train(c, str(tmp_path / "b"), progress=False)
    ra = values(tmp_path / "a")
    assert [r["staleness_max"] for r in ra] == [min(s, k) for s in range(5)]
    assert [r["staleness_mean"] for r in ra] == [min(s, k) for s in range(5)]
    assert ra == values(tmp_path / "b")
    params_equal(a["state"]["params"], b["state"]["params"])
    assert all(r["rollout_wait_s"] >= 0 for r in rows(tmp_path / "a", "loss"))
    # Files of the checkpoints that need batches (step 3 of every = 3); none for the final one.
    assert sorted(os.listdir(tmp_path / "a" / "rollouts")) == ["step_3.npz"]


@pytest.mark.slow
def test_staleness_changes_the_run_but_zero_is_the_synchronous_loop(tmp_path):
    """K = 1 differs from K = 0 from its second step on (batch 1 comes from the initial policy)."""
    sync = train(small_toy({"steps": 3, **ASYNC}), str(tmp_path / "k0"), progress=False)
    stale = train(small_toy({"steps": 3, "rl.max_staleness": 1, **ASYNC}), str(tmp_path / "k1"), progress=False)
    r0, r1 = values(tmp_path / "k0"), values(tmp_path / "k1")
    assert r0[0] == {**r1[0], "staleness_mean": 0.0, "staleness_max": 0}  # batch 0: version 0 either way
    assert r0[1]["loss"] != r1[1]["loss"]
    assert all(r["staleness_max"] == 0 for r in r0)
    assert sync["end_step"] == stale["end_step"] == 3


@pytest.mark.slow
def test_rollouts_on_their_own_devices_match_time_slicing(tmp_path):
    """8 host devices: learner on 4 (data), rollouts on the other 4, K = 1; the same rows (allclose)
    as rollouts time-slicing the learner's 4 devices."""
    base = {"steps": 3, "rl.max_staleness": 1, "mesh.data": 4, **ASYNC}
    shared = train(small_toy(base), str(tmp_path / "shared"), progress=False)
    split = train(small_toy(base | {"rl.rollout_mesh.data": 4}), str(tmp_path / "split"), progress=False)
    learner = split["state"]["params"]["embed"].sharding.device_set
    assert learner == set(jax.devices()[:4])
    for x, y in zip(values(tmp_path / "shared"), values(tmp_path / "split"), strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_allclose(y[key], x[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert shared["end_step"] == split["end_step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2])
def test_killed_async_run_resumes_without_losing_or_repeating_a_batch(tmp_path, k):
    """Stop at step 3, resume: the same rows and params as the uninterrupted run. The K batches sampled
    by versions 3 - K .. 2 are saved with the checkpoint; their versions are not recreated."""
    c = small_toy({"steps": 6, "rl.max_staleness": k, "checkpoint.every": 2, **ASYNC})
    full = train(c, str(tmp_path / "full"), progress=False)
    part = train(c, str(tmp_path / "part"), progress=False, stop_at=3)
    assert part["stopped_by"] == "stop_at"
    saved = rollouts.load(str(tmp_path / "part"), 3, k)
    assert [int(b["step"]) for b in saved] == list(range(3, 3 + k))
    assert [int(b["version"]) for b in saved] == [s - k for s in range(3, 3 + k)]
    resumed = train(c, str(tmp_path / "part"), progress=False)
    assert resumed["start_step"] == 3 and resumed["end_step"] == 6
    ra, rb = values(tmp_path / "full"), values(tmp_path / "part")
    assert [r["step"] for r in rb] == list(range(1, 7))
    assert ra == rb
    params_equal(full["state"]["params"], resumed["state"]["params"])


def test_missing_rollouts_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match=r"step_4\.npz is missing"):
        rollouts.load(str(tmp_path), 4, 2)


@pytest.mark.slow
def test_a_stop_at_the_resumed_step_keeps_its_checkpoint_loadable(tmp_path):
    """Resume with another K and stop at once: the checkpoint resumed from is not rewritten (its saved
    batch count and file still agree), and the run then resumes and finishes."""
    wd = str(tmp_path)
    c = small_toy({"steps": 4, "rl.max_staleness": 1, "checkpoint.every": 2, "eval.every": 100, **ASYNC})
    assert train(c, wd, progress=False, stop_at=2)["end_step"] == 2
    c2 = small_toy({"steps": 4, "rl.max_staleness": 2, "checkpoint.every": 2, "eval.every": 100, **ASYNC})
    assert train(c2, wd, progress=False, stop_at=2)["end_step"] == 2
    assert len(rollouts.load(wd, 2, 1)) == 1
    done = train(c2, wd, progress=False)
    assert done["start_step"] == 2 and done["end_step"] == 4
    # batch 2 was saved by the K = 1 run (version 1); batch 3 needs version 1, gone: the floor, 2
    assert [r["staleness_max"] for r in rows(wd, "loss")] == [0, 1, 1, 1]


@pytest.mark.slow
def test_resuming_with_a_smaller_staleness_uses_the_saved_batches_and_says_so(tmp_path, caplog):
    """A K = 2 checkpoint resumed at K = 1 trains on its 2 saved batches as they are (staleness 2,
    none lost) with a warning; resumed at K = 0 they are sampled again, also with a warning."""
    kw = {"steps": 5, "checkpoint.every": 2, "eval.every": 100, **ASYNC}
    for k in (1, 0):
        wd = str(tmp_path / f"k{k}")
        assert train(small_toy({**kw, "rl.max_staleness": 2}), wd, progress=False, stop_at=2)["end_step"] == 2
        caplog.clear()
        with caplog.at_level("WARNING", logger="m1jax"):
            done = train(small_toy({**kw, "rl.max_staleness": k}), wd, progress=False)
        assert done["start_step"] == 2 and done["end_step"] == 5
        text = caplog.text
        stale = [r["staleness_max"] for r in rows(wd, "loss")]
        if k == 1:
            assert "2 saved rollout batch(es) for max_staleness=1" in text and "staleness up to 2" in text
            assert stale == [0, 1, 2, 2, 1]  # steps 3, 4 as saved by the K = 2 run; step 5 by version 4
        else:
            assert "with max_staleness=0 they are not used" in text
            assert stale == [0, 1, 0, 0, 0]
