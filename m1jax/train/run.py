"""The run loop that pretraining (`m1jax.train.loop`) and RL (`rl.loop`) share.

A `Run` owns the workdir: config.json, checkpoints with resume (the newest readable one; an
unreadable one is skipped), `metrics.jsonl` and TensorBoard through `MetricWriter`, SIGTERM /
SIGINT (finish the step, save, return), the progress bar, and `summary.json`, written last, whose
presence marks a run complete: rerunning a complete run builds nothing (`Run.finished`). In a
multi-host run every process works in the same workdir; only process 0 writes its files.

Each kind of run supplies its state (`begin`: the abstract layout and a fresh one), its step
(`loop`: `body(state, step) -> state`), its data position for the checkpoints and its final stage.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from m1jax.train.checkpoint import Checkpointer
from m1jax.train.metrics import MetricWriter, clear_summary, read_summary, write_summary

log = logging.getLogger("m1jax")


@contextlib.contextmanager
def stop_on_signals():
    """Yields a dict whose "signal" entry is set by SIGTERM / SIGINT instead of dying mid-step."""
    flag: dict[str, str | None] = {"signal": None}
    old = {}
    if threading.current_thread() is threading.main_thread():  # handlers only work there
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        for s in old:
            signal.signal(s, lambda num, _frame: flag.__setitem__("signal", signal.Signals(num).name))
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_requested(flag) -> str | None:
    """The stop signal if any process got one, else None. With several processes they agree (one
    tiny all-gather per step), so all leave the step loop at the same step and save the checkpoint
    together: a process stopping alone would wait in the save's collectives while the others wait
    in the next step's."""
    if jax.process_count() > 1:
        anyone = np.any(multihost_utils.process_allgather(np.int32(flag["signal"] is not None)))
        if anyone and flag["signal"] is None:
            flag["signal"] = "signal on another process"
    return flag["signal"]


def finished(workdir: str, checkpoints: list[int], steps: int) -> dict | None:
    """The stored summary of a run that finished (its final stage included) at its newest
    checkpoint, at or past `steps`; else None. Checked before anything is built or restored.

    With several processes, process 0 decides and tells the others: they must take the same path,
    since training and the final stage are collectives."""
    done = read_summary(workdir)
    last = checkpoints[-1] if checkpoints else None
    ok = done is not None and last is not None and done.get("end_step") == last >= steps
    if jax.process_count() > 1:
        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
        if ok and done is None:  # process 0 read it; this one could not (yet): the step suffices
            done = {"end_step": last, "steps": steps}
    return done if ok else None


class Run:
    """One run of config `c` (fields steps, checkpoint.every, checkpoint.keep) in `workdir`."""

    def __init__(self, c, workdir: str, *, desc: str, progress: bool = True):
        self.c, self.workdir, self.desc, self.progress = c, workdir, desc, progress
        os.makedirs(workdir, exist_ok=True)
        self.ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.checkpoint.keep)
        self.primary = jax.process_index() == 0  # the one writer of the workdir's files
        self.writer: MetricWriter | None = None
        self.bar = None
        self.stopped_by: str | None = None

    def finished(self) -> dict | None:
        """The stored summary if this run is already complete (then the Run is closed), else None."""
        done = finished(self.workdir, self.ckpt.steps(), self.c.steps)
        if done is not None:
            self.ckpt.close()
            if done["end_step"] > self.c.steps:
                log.warning(f"the run in {self.workdir} finished at step {done['end_step']}, past config.steps")
        return done

    def begin(self, abstract_state, fresh, *, final_keys: tuple[str, ...] = ()):
        """(state, start step, data state or None): the newest checkpoint that restores, or `fresh()`
        at step 0. Writes config.json, opens the metrics (rows after `start` are superseded, and at
        `start` those with `final_keys` when the final stage will run again) and the progress bar."""
        c = self.c
        if self.primary:
            with open(os.path.join(self.workdir, "config.json"), "w") as fh:
                fh.write(c.to_json_best_effort(indent=2))
        restored = self.ckpt.restore_latest(abstract_state)
        if restored is None:
            state, start, data = fresh(), 0, None
            if self.primary:
                clear_summary(self.workdir)  # of an earlier run in this workdir
        else:
            start, state, data = restored
            log.info(f"resumed from step {start} ({self.ckpt.directory})")
            previous = read_summary(self.workdir)
            if previous is not None and previous.get("end_step") == start < c.steps:
                log.warning(
                    f"extending the finished run in {self.workdir} from step {start} to config.steps={c.steps}; "
                    f"the learning-rate schedule is recomputed for {c.steps} steps (it was for {previous.get('steps')})"
                )
        again = final_keys if start >= c.steps else ()
        resume = None if restored is None else start
        self.writer = MetricWriter(self.workdir, resume_step=resume, enabled=self.primary, drop_at_resume=again)
        if self.progress and self.primary and start < c.steps:  # one bar, not one per process
            from tqdm.auto import tqdm

            self.bar = tqdm(total=c.steps, initial=start, desc=self.desc, unit="step", dynamic_ncols=True)
        return state, start, data

    def loop(self, state, start: int, body, data_state, *, stop_at: int | None = None, after=None):
        """Run `body(state, step) -> state` for the steps from `start` to `c.steps` (or `stop_at`, or a
        stop signal), checkpointing every `checkpoint.every` steps and at the end with `data_state(step)`
        (a collective: every process calls it). `after()` runs once the steps are done. Returns
        (state, step); `stopped_by` says why it ended before `c.steps` (None if it did not)."""
        c, step = self.c, start
        with stop_on_signals() as flag:
            while step < min(c.steps, stop_at or c.steps) and stop_requested(flag) is None:
                state = body(state, step)
                step += 1
                if step % c.checkpoint.every == 0 and step < c.steps:
                    self.ckpt.save(step, state, data_state(step))
                if self.bar is not None:
                    self.bar.update(1)
            if after is not None:
                after()
        if self.bar is not None:
            self.bar.close()
        self.ckpt.save(step, state, data_state(step), force=True, wait=True)
        self.ckpt.close()
        if step < c.steps:
            self.stopped_by = flag["signal"] or "stop_at"
            log.warning(f"{self.stopped_by}: saved a checkpoint at step {step}; rerun the same command to resume")
        return state, step

    def write_file(self, name: str, rows: list[dict]) -> None:
        """`workdir/name` as JSON lines (process 0 only)."""
        if self.primary:
            with open(os.path.join(self.workdir, name), "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)

    def close(self, summary: dict | None = None) -> None:
        """Close the metrics; with `summary`, write summary.json (last: it marks the run complete)."""
        if self.writer is not None:
            self.writer.close()
        if summary is not None and self.primary:
            write_summary(self.workdir, summary | {"steps": self.c.steps})
