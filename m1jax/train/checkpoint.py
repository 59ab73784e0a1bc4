"""Orbax checkpoints of the training state plus the data iterator's position.

Saves are asynchronous (training goes on while the previous save finalises); only finalised
steps are ever restored. A latest checkpoint that fails to restore (truncated, corrupt) is
reported and skipped in favour of the one before it, so a crash during a save loses at most
`checkpoint_every` steps.
"""

from __future__ import annotations

import logging
import os

import orbax.checkpoint as ocp

log = logging.getLogger("m1jax")


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, data_state: dict, *, force: bool = False, wait: bool = False) -> bool:
        if step in self.manager.all_steps():  # e.g. a periodic save, then a stop at the same step
            saved = False
        else:
            args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
            saved = self.manager.save(step, args=args, force=force)
        if wait:
            self.manager.wait_until_finished()
        return saved

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state):
        """(step, state, data_state) of the newest checkpoint that restores, or None if there is none.

        `abstract_state`: a pytree of `jax.ShapeDtypeStruct` with shardings (the target layout, so
        a checkpoint restores onto whatever mesh this run uses).
        """
        failures = []
        for step in reversed(self.steps()):
            try:
                args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
                out = self.manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                msg = f"checkpoint at step {step} in {self.directory} could not be restored ({type(e).__name__}: {e})"
                log.warning(msg + "; falling back to the previous checkpoint")
                failures.append(msg)
                continue
            if failures:
                log.warning(f"resumed from step {step} after skipping {len(failures)} unreadable checkpoint(s)")
            return step, out["state"], out["data"]
        if failures:
            raise RuntimeError("no checkpoint could be restored:\n" + "\n".join(failures))
        return None

    def close(self) -> None:
        self.manager.close()
