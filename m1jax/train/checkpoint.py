"""Orbax checkpoints of the training state plus the data iterator's position.

Saves are asynchronous (training goes on while the previous save finalises); only finalised
steps are ever restored. A latest checkpoint that fails to restore (truncated, corrupt) is
reported and skipped in favour of the one before it, so a crash during a save loses at most
`checkpoint_every` steps. A checkpoint whose tensors do not fit the run's state (another model
size or optimizer) is a configuration error, not corruption: it raises at once, naming the tensors.
"""

from __future__ import annotations

import logging
import os

import jax
import orbax.checkpoint as ocp

log = logging.getLogger("m1jax")

_MAX_LISTED = 8  # mismatching tensors named in an error; a changed width touches almost every one


def _key_name(k) -> str:
    """One path entry as a plain name: the checkpoint's metadata stores namedtuple fields (optax
    states) as dict keys, so `.mu` in the run's state and `['mu']` in the metadata must compare equal."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"opt_state/1/0/mu/embed": shape} for every leaf with a shape."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _params_first(names) -> list[str]:
    """Sorted, parameters before optimizer moments: the first lines of an error are the telling ones."""
    return sorted(names, key=lambda k: (not k.startswith("params/"), k))


def layout_mismatch(stored, target) -> str | None:
    """A description of how the stored tensors (checkpoint metadata) differ from `target`
    (ShapeDtypeStructs), or None when every tensor exists on both sides with the same shape."""
    have, want = _shapes(stored), _shapes(target)
    lines = [
        f"{k}: checkpoint {have[k]}, this run {want[k]}"
        for k in _params_first(have.keys() & want.keys())
        if have[k] != want[k]
    ]
    lines += [f"{k}: missing from the checkpoint" for k in _params_first(want.keys() - have.keys())]
    lines += [f"{k}: in the checkpoint, not in this run's state" for k in _params_first(have.keys() - want.keys())]
    if not lines:
        return None
    more = f"\n  ... and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return f"{len(lines)} tensor(s) differ:\n  " + "\n  ".join(lines[:_MAX_LISTED]) + more


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        # Handlers named up front so a fresh manager can read a step's metadata (shapes) before restoring.
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

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

        Raises ValueError, naming the tensors and their shapes, when the newest readable checkpoint
        holds a different state layout (another model size or optimizer): older checkpoints of the
        same run would not fit either, so nothing is skipped.
        """
        failures = []
        for step in reversed(self.steps()):
            mismatch = self._layout_mismatch(step, abstract_state)
            if mismatch:
                raise ValueError(
                    f"checkpoint at step {step} in {self.directory} does not fit this run's state "
                    f"(changed model or optimizer config? use a fresh workdir): {mismatch}"
                )
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

    def _layout_mismatch(self, step: int, abstract_state) -> str | None:
        """`layout_mismatch` against the step's stored metadata; None when that is unreadable (the
        restore then fails and is reported as a corrupt checkpoint)."""
        try:
            stored = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - a truncated checkpoint: left to the restore's fallback
            return None
        if stored is None or not jax.tree.leaves(stored):  # no usable metadata: nothing to compare
            return None
        return layout_mismatch(stored, abstract_state)

    def close(self) -> None:
        self.manager.close()
