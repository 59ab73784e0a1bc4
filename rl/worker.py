"""Asynchronous rollouts: a thread that produces the batches of later steps with an older policy.

With `rl.max_staleness` K, the batch of learner step b is sampled by policy version
v(b) = max(floor, b - K), where version s is the params after s learner steps and `floor` is the
first version this process has (0, or the step a run resumed at). That rule is the whole
throttle: batch b can start only once the learner has published version b - K, so at most K + 1
batches wait, and thread timing changes no value (keys and prompts depend on the step only).
Version swaps happen at batch boundaries, so every token of a batch has staleness
step - version.

The learner (main thread) calls `publish(version, params)` after each step, `get(step)` for each
batch and `pending(lo, hi)` at checkpoints (the batches sampled by versions it can no longer
recreate, saved with the checkpoint); errors in the thread re-raise in `get` / `pending`.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

log = logging.getLogger("m1jax")


class RolloutWorker:
    def __init__(self, produce, *, start: int, stop: int, staleness: int, floor: int, place, saved=()):
        """`produce(params, step, version) -> batch`; `place(params)` copies a version onto the rollout
        devices (it must return arrays the learner's next update cannot donate); batches for steps
        `start` .. `stop` - 1, the first ones from `saved` (restored with a checkpoint)."""
        self.produce, self.place, self.k, self.floor, self.stop = produce, place, staleness, floor, stop
        self.batches = {int(b["step"]): b for b in saved}
        self.next = start + len(self.batches)
        self.versions: dict[int, object] = {}
        self.error: BaseException | None = None
        self.closing = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="rollout-worker", daemon=True)
        self.thread.start()

    def version_of(self, step: int) -> int:
        return max(self.floor, step - self.k)

    def publish(self, version: int, params) -> None:
        """Make `version` available to the worker (a copy on the rollout devices); older versions no
        batch still needs are dropped by the thread. A version past the last batch's is not copied:
        decided from `stop` alone, not from the thread's progress, so every process decides alike
        (the copy may be a collective)."""
        if version > self.version_of(self.stop - 1):
            return
        placed = self.place(params)
        with self.cond:
            self.versions[version] = placed
            self.cond.notify_all()

    def get(self, step: int) -> tuple[dict, float]:
        """(the batch of `step`, seconds waited for it); removes it."""
        t0 = time.perf_counter()
        with self.cond:
            while step not in self.batches:
                self._check()
                self.cond.wait(0.1)
            batch = self.batches.pop(step)
        return batch, time.perf_counter() - t0

    def pending(self, lo: int, hi: int) -> list[dict]:
        """The batches of steps lo .. hi - 1 (waiting for the ones still in progress), kept."""
        with self.cond:
            while not all(s in self.batches for s in range(lo, hi)):
                self._check()
                self.cond.wait(0.1)
            return [self.batches[s] for s in range(lo, hi)]

    def close(self) -> None:
        """Stop after the batch in progress (its result is dropped) and join the thread."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        self.thread.join()
        self.versions.clear()  # (the params copies: not held through the run's final evaluation)
        self.batches.clear()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"the rollout worker failed at step {self.next}: {self.error!r}") from self.error
        if not self.thread.is_alive() and not self.closing and self.next < self.stop:
            raise RuntimeError("the rollout worker stopped unexpectedly")

    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    if self.next >= self.stop:
                        return
                    v = self.version_of(self.next)
                    t0 = time.perf_counter()
                    while v not in self.versions and not self.closing:
                        self.cond.wait()
                    waited = time.perf_counter() - t0
                    if self.closing:
                        return
                    for old in [u for u in self.versions if u < v]:  # no later batch needs them
                        del self.versions[old]
                    params, step = self.versions[v], self.next
                batch = self.produce(params, step, v)
                batch["worker_wait_s"] = np.asarray(waited)  # before it: waiting for version v
                with self.cond:
                    self.batches[step] = batch
                    self.next = step + 1
                    self.cond.notify_all()
        except BaseException as e:  # noqa: BLE001 - handed to the learner, which re-raises it
            log.exception("rollout worker failed")
            with self.cond:
                self.error = e
                self.cond.notify_all()
