"""Partial rollouts (`rl.sampling.partial`): responses that outlive a step continue in the next one.

Groups come from a stream: group g is prompt g % P of the step-batch g // P (the prompts the
synchronous loop would use, in the same order). The engine keeps its slots busy with the stream's
next groups and a step's generation ends once P groups are complete; every sample still running is
carried over with its tokens so far, their log-probs and the policy version that sampled each. The
next call prefills prompt + tokens so far under the new policy (recompute on swap: the cache is
rebuilt, never reused across versions) and the response continues. The batch is the P complete
groups of lowest id. Token t of sample j of group g is drawn with key
fold_in(fold_in(key, g * G + j), t), whichever call draws it: where a response was cut does not
change its random stream.

Every decision (admissions, when a call ends) depends on the sampled values only, so a run is
deterministic whatever the thread timing, and `Stream.snapshot` / `restore` carry it across a
checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rl import engine
from rl.sampler import Rollout

RUNNING = -1


@dataclasses.dataclass
class Sample:
    gid: int  # group id in the stream
    j: int  # index in its group
    prompt: np.ndarray  # [Tp] prompt ids
    tokens: list = dataclasses.field(default_factory=list)  # response ids so far
    logp: list = dataclasses.field(default_factory=list)  # their sampling log-probs (fp32)
    versions: list = dataclasses.field(default_factory=list)  # the policy version that sampled each
    run: int = 0  # confident-run counter
    finish: int = RUNNING  # an engine FINISH_* once done


@dataclasses.dataclass
class Stream:
    """The carried state: the next group id and the samples of groups not yet handed out."""

    size: int  # G samples per group
    next_gid: int = 0
    groups: dict = dataclasses.field(default_factory=dict)  # gid -> [Sample] * G

    def complete(self) -> list[int]:
        return sorted(g for g, ss in self.groups.items() if all(s.finish != RUNNING for s in ss))

    def snapshot(self) -> dict:
        """The state as flat host arrays (keys `carry_*`), for a batch dict or a checkpoint file."""
        ss = [s for g in sorted(self.groups) for s in self.groups[g]]
        width = lambda f: max([len(f(s)) for s in ss], default=0)
        tp, n = width(lambda s: s.prompt), width(lambda s: s.tokens)
        pad = lambda xs, w, dt: np.asarray([list(x) + [0] * (w - len(x)) for x in xs], dt).reshape(len(ss), w)
        meta = [[s.gid, s.j, s.run, s.finish, len(s.prompt), len(s.tokens)] for s in ss]
        return {
            "carry_next_gid": np.asarray(self.next_gid),
            "carry_meta": np.asarray(meta, np.int64).reshape(len(ss), 6),
            "carry_prompt": pad([s.prompt for s in ss], tp, np.int32),
            "carry_tokens": pad([s.tokens for s in ss], n, np.int32),
            "carry_logp": pad([s.logp for s in ss], n, np.float32),
            "carry_versions": pad([s.versions for s in ss], n, np.int64),
        }

    @classmethod
    def restore(cls, size: int, d: dict) -> Stream:
        st = cls(size, int(d["carry_next_gid"]))
        for i, (gid, j, run, finish, tp, n) in enumerate(np.asarray(d["carry_meta"]).tolist()):
            s = Sample(gid, j, np.asarray(d["carry_prompt"][i, :tp], np.int32), run=run, finish=finish)
            s.tokens = [int(x) for x in d["carry_tokens"][i, :n]]
            s.logp = [float(x) for x in d["carry_logp"][i, :n]]
            s.versions = [int(x) for x in d["carry_versions"][i, :n]]
            st.groups.setdefault(gid, []).append(s)
        if any(len(ss) != size for ss in st.groups.values()):
            raise ValueError(
                f"config.rl.samples_per_prompt={size}: the carried partial rollouts hold groups of "
                f"{sorted({len(ss) for ss in st.groups.values()})} samples; resume with the run's own value"
            )
        return st


def generate(
    cfg, sp, params, stream: Stream, prompt_of: Callable[[int], np.ndarray], *, want: int, version: int, rng,
    slots: int, pad_multiple: int,
) -> list[list[Sample]]:  # fmt: skip
    """Advance `stream` until `want` groups are complete; returns them (lowest ids first) and keeps
    the rest. `prompt_of(gid)` -> prompt ids; `rng` is the run's one sampling key."""
    g, n = stream.size, sp.max_new_tokens
    if slots < g:
        raise ValueError(f"partial rollouts need slots >= samples per group ({g}), got {slots}")
    bucket = lambda m: -(-m // pad_multiple) * pad_multiple
    # New groups this call may start: enough to fill every slot after `want` groups complete. Their
    # prompt lengths are known up front, so the cache length (a compiled shape) is fixed per call.
    window = range(stream.next_gid, stream.next_gid + want + slots // g)
    prompts = {gid: np.asarray(prompt_of(gid), np.int32) for gid in window}
    longest = max([len(p) for p in prompts.values()] + [len(s.prompt) for ss in stream.groups.values() for s in ss])
    max_len = bucket(longest) + n + pad_multiple  # a resumed sample's prefill is padded past its prompt's bucket
    st = engine._init(cfg, params, slots, max_len, slots, n, sp.pad_id, False)
    resume = [s for gid in sorted(stream.groups) for s in stream.groups[gid] if s.finish == RUNNING]
    for s in resume:  # a budget lowered since the sample was cut (a resume with another schedule)
        if len(s.tokens) >= n:
            s.finish = engine.FINISH_LENGTH
    resume = [s for s in resume if s.finish == RUNNING]
    free, held = list(range(slots)), {}  # held: slot -> (sample, tokens it held when inserted)
    while len(stream.complete()) < want:
        # Resumed samples are prefilled apart from new groups, in inserts of one prefill bucket each:
        # every sample of an insert starts at the insert's bucket Pb, and Pb + (n - tokens so far)
        # must stay within max_len (a short new prompt beside a long resumed one would not).
        inserts = {}  # bucket -> [(prefill ids, [(slot, sample)])]
        while resume and free:
            s = resume.pop(0)
            ids = np.concatenate([s.prompt, np.asarray(s.tokens, np.int32)])
            inserts.setdefault(("resume", bucket(len(ids))), []).append((ids, [(free.pop(0), s)]))
        while len(free) >= g and stream.next_gid in prompts:
            gid = stream.next_gid
            stream.groups[gid] = [Sample(gid, j, prompts[gid]) for j in range(g)]
            inserts.setdefault(("new", 0), []).append((prompts[gid], [(free.pop(0), s) for s in stream.groups[gid]]))
            stream.next_gid += 1
        for entries in inserts.values():
            st = engine._insert(cfg, params, st, *_insert_args(entries, slots, bucket, sp.pad_id, g, max_len - n))
            held.update({slot: (s, len(s.tokens)) for _, ss in entries for slot, s in ss})
        if not held:
            break
        # Back to the host when the next group fits, or else at the next finished sample (a resumed one
        # may take its slot, or it may complete the batch): never run every slot to its end.
        need = g if stream.next_gid in prompts else len(free) + 1
        st = engine._decode(cfg, sp, params, st, rng, jnp.asarray(need, jnp.int32))
        free += _harvest(st, held, version, final=False)
    _harvest(st, held, version, final=True)
    done = stream.complete()[:want]
    return [stream.groups.pop(gid) for gid in done]


def _harvest(st, held: dict, version: int, *, final: bool) -> list[int]:
    """Move the tokens of finished slots (and with `final`, of every live slot) into their samples;
    returns the freed slots."""
    live, pos, run, toks, logp, length, finish = jax.device_get(
        (st["live"], st["pos"], st["run"], st["tokens"], st["logp"], st["length"], st["finish"])
    )
    freed = []
    for slot in sorted(held):
        s, p0 = held[slot]
        if live[slot] and not final:
            continue
        end = int(pos[slot]) if live[slot] else int(length[slot])
        s.tokens += toks[slot, p0:end].tolist()
        s.logp += logp[slot, p0:end].tolist()
        s.versions += [version] * (end - p0)
        if live[slot]:
            s.run = int(run[slot])
        else:
            s.finish = int(finish[slot])
        del held[slot]
        freed.append(slot)
    return freed


def _insert_args(entries, slots: int, bucket, pad_id: int, g: int, room: int):
    """`engine.insert` arguments for `entries` [(prefill ids, [(slot, sample)])]: result row = slot.
    `room`: max_len - n, the most a sample's start position Pb may exceed its tokens so far."""
    q = engine._pow2(len(entries))
    pb = bucket(max(len(ids) for ids, _ in entries))
    if any(pb - len(s.tokens) > room for _, ss in entries for _, s in ss):
        raise AssertionError(f"partial rollouts: an insert at bucket {pb} would overrun the cache")
    toks = np.full((q, pb), pad_id, np.int32)
    lengths = np.ones((q,), np.int32)
    src, slot_ids = np.zeros((slots,), np.int32), np.full((slots,), slots, np.int32)
    key_ids, pos0, run0 = (np.zeros((slots,), np.int32) for _ in range(3))
    m = 0
    for k, (ids, ss) in enumerate(entries):
        toks[k, pb - len(ids) :] = ids
        lengths[k] = len(ids)
        for slot, s in ss:
            src[m], slot_ids[m], key_ids[m] = k, slot, s.gid * g + s.j
            pos0[m], run0[m] = len(s.tokens), s.run
            m += 1
    return toks, lengths, src, slot_ids, slot_ids, key_ids, pos0, run0


def to_rollout(groups: list[list[Sample]], n: int, pad_id: int, pad_multiple: int) -> tuple[Rollout, np.ndarray]:
    """(host Rollout of the groups' samples, group-major, responses padded to `n`; versions [R, n])."""
    ss = [s for grp in groups for s in grp]
    tp = -(-max(len(s.prompt) for s in ss) // pad_multiple) * pad_multiple
    r = len(ss)
    prompt, tokens = np.full((r, tp), pad_id, np.int32), np.full((r, n), pad_id, np.int32)
    logp, versions = np.zeros((r, n), np.float32), np.zeros((r, n), np.int64)
    lengths, finish = np.zeros((r,), np.int32), np.zeros((r,), np.int32)
    for i, s in enumerate(ss):
        k = len(s.tokens)
        if k > n:
            raise ValueError(f"a carried response has {k} tokens, more than the budget max_new_tokens={n}")
        prompt[i, tp - len(s.prompt) :] = s.prompt
        tokens[i, :k], logp[i, :k], versions[i, :k] = s.tokens, s.logp, s.versions
        lengths[i], finish[i] = k, s.finish
    mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
    plen = np.asarray([len(s.prompt) for s in ss], np.int32)
    return Rollout(prompt, plen, tokens, logp * mask, mask, lengths, finish), versions
