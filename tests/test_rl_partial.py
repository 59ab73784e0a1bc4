"""Partial rollouts (`rl.partial`, `rl.sampling.partial`): a response cut at a step's end continues in
the next one under the new policy, every token keeping the version that sampled it; cutting does not
change a response's tokens, and a run with responses in flight resumes exactly."""

import jax
import numpy as np
import pytest
from test_model import CFG, PARAMS
from test_rl_async import ASYNC, params_equal, values
from test_rl_train import rows, small_toy

from rl import partial, rollouts
from rl.config import validate
from rl.loop import train
from rl.sampler import SamplingParams, sample

_RNG = np.random.default_rng(3)
PROMPTS = [np.asarray(_RNG.integers(1, CFG.vocab_size, size=n), np.int32) for n in (5, 9, 3, 12, 7, 4, 10, 6)]
G = 2


def _stream_all(sp, slots, want, calls, params=PARAMS):
    """Run the stream over `calls` calls of `want` groups (call i is version i); gid -> samples."""
    stream, out = partial.Stream(G), {}
    for v in range(calls):
        for grp in partial.generate(
            CFG, sp, params, stream, lambda gid: PROMPTS[gid % len(PROMPTS)], want=want, version=v,
            rng=jax.random.PRNGKey(7), slots=slots, pad_multiple=8,
        ):  # fmt: skip
            out[grp[0].gid] = grp
    return out, stream


def test_greedy_responses_cut_across_calls_equal_uncut_sampling():
    """Greedy: a response re-prefilled mid-way continues with the tokens it would have had."""
    sp = SamplingParams(10, greedy=True, stop_tokens=tuple(range(0, CFG.vocab_size, 5)))  # ragged lengths
    out, _ = _stream_all(sp, slots=4, want=1, calls=6)
    cut = [s for grp in out.values() for s in grp if len(set(s.versions)) > 1]
    assert cut, "no response spanned two calls: the test exercises nothing"
    ref = sample(CFG, PARAMS, [PROMPTS[g % len(PROMPTS)] for g in sorted(out)], sp, None)
    for i, gid in enumerate(sorted(out)):
        for s in out[gid]:
            assert s.tokens == ref.tokens[i, : ref.lengths[i]].tolist(), (gid, s.versions)


def test_sampled_tokens_do_not_depend_on_where_a_response_was_cut():
    """Keys are (group, sample, position): 4 slots and 16 cut responses at other points (or not at
    all) and give the same tokens."""
    sp = SamplingParams(9, temperature=1.0, stop_tokens=tuple(range(0, CFG.vocab_size, 7)))
    few, stream = _stream_all(sp, slots=4, want=1, calls=5)
    many, _ = _stream_all(sp, slots=16, want=5, calls=3)
    assert any(len(set(s.versions)) > 1 for grp in few.values() for s in grp)
    common = sorted(set(few) & set(many))  # each call hands out its lowest complete groups
    assert len(common) >= 3, (sorted(few), sorted(many))
    for gid in common:
        for a, b in zip(few[gid], many[gid], strict=True):
            assert a.tokens == b.tokens and a.finish == b.finish, gid
            np.testing.assert_allclose(a.logp, b.logp, atol=2e-5)  # recompute-on-swap: rounding only
            assert a.versions == sorted(a.versions)  # versions never decrease along a response
    # the carried state survives a snapshot round trip
    back = partial.Stream.restore(G, stream.snapshot())
    assert back.next_gid == stream.next_gid and sorted(back.groups) == sorted(stream.groups)
    for gid in stream.groups:
        assert [vars(s) | {"prompt": s.prompt.tolist()} for s in back.groups[gid]] == [
            vars(s) | {"prompt": s.prompt.tolist()} for s in stream.groups[gid]
        ]


def test_a_long_resumed_response_beside_new_groups_stays_within_the_cache():
    """A response cut after 30 tokens resumes in the call that starts new groups: each keeps the tokens
    of uncut greedy decoding (a shared insert would start the new ones past the cache's room)."""
    prompts = [PROMPTS[3], PROMPTS[0], PROMPTS[6]]
    sp = SamplingParams(40, greedy=True)
    ref = sample(CFG, PARAMS, prompts, sp, None)
    first = ref.tokens[0].tolist()
    stream = partial.Stream(G, next_gid=1)
    stream.groups[0] = [
        partial.Sample(0, 0, prompts[0], first, [0.0] * 40, [0] * 40, finish=1),
        partial.Sample(0, 1, prompts[0], first[:30], [0.0] * 30, [0] * 30),
    ]
    out = partial.generate(
        CFG, sp, PARAMS, stream, lambda gid: prompts[gid % 3], want=3, version=1, rng=None, slots=6, pad_multiple=8
    )
    assert [grp[0].gid for grp in out] == [0, 1, 2]
    for grp in out:
        for s in grp:
            assert s.tokens == ref.tokens[s.gid].tolist(), (s.gid, s.j)
    assert out[0][1].versions == [0] * 30 + [1] * 10


def test_a_call_ends_once_its_groups_are_complete():
    """With more slots than the batch needs, the call returns at the first complete group, leaving the
    other responses running (carried), instead of decoding every slot to its end."""
    prompts = PROMPTS * 2
    sp = SamplingParams(40, temperature=1.0, stop_tokens=tuple(range(0, CFG.vocab_size, 8)))
    stream = partial.Stream(G)
    out = partial.generate(
        CFG, sp, PARAMS, stream, lambda gid: prompts[gid], want=1, version=0, rng=jax.random.PRNGKey(1),
        slots=8, pad_multiple=8,
    )  # fmt: skip
    assert len(out) == 1
    running = [s for ss in stream.groups.values() for s in ss if s.finish == partial.RUNNING]
    assert running and all(0 < len(s.tokens) < 40 for s in running)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"rl.sampling.partial": True}, "rl.sampling.partial"),  # the trainer's old log-probs, no correction
        ({"rl.sampling.partial": True, "rl.mismatch.router_replay": True, **ASYNC}, "rl.sampling.partial"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate(small_toy(overrides))


PARTIAL = {"rl.sampling.partial": True, "rl.sampling.max_new_tokens": 12, "eval.every": 100, **ASYNC}


@pytest.mark.slow
@pytest.mark.parametrize("k, split", [(0, False), (1, False), (0, True)])
def test_partial_run_carries_tokens_and_resumes_exactly(tmp_path, k, split):
    """Carried tokens show up as staleness (at K = 0 too); stop at step 2 with responses in flight,
    resume: the same rows and params as the uninterrupted run. `split`: rollouts on 4 devices of
    their own, so a thread generates while the checkpoint is written (its carry must be the one
    before the next batch, not the thread's moving stream)."""
    mesh = {"mesh.data": 4, "rl.rollout_mesh.data": 4} if split else {}
    c = small_toy({"steps": 4, "checkpoint.every": 2, "rl.max_staleness": k, **PARTIAL, **mesh})
    full = train(c, str(tmp_path / "full"), progress=False)
    stale = [r["staleness_max"] for r in rows(tmp_path / "full", "loss")]
    assert max(stale) > k  # some token was sampled by a version older than the batch's own
    carry = rollouts.load_carry(str(tmp_path / "full"), 2)
    assert (carry["carry_meta"][:, 3] == partial.RUNNING).any()  # the checkpoint holds responses in flight
    train(c, str(tmp_path / "part"), progress=False, stop_at=2)
    resumed = train(c, str(tmp_path / "part"), progress=False)
    assert resumed["start_step"] == 2 and resumed["end_step"] == 4
    assert values(tmp_path / "full") == values(tmp_path / "part")
    params_equal(full["state"]["params"], resumed["state"]["params"])
