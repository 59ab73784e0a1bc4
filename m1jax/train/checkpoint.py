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
import sys
import traceback

import jax
import orbax.checkpoint as ocp

from m1jax.errors import RunError

log = logging.getLogger("m1jax")

_MAX_LISTED = 8  # mismatching tensors named in an error; a changed width touches almost every one


class CheckpointRestoreError(RunError):
    """Checkpoints exist but none of them restores."""


class _LayoutError(Exception):
    """A readable checkpoint that does not fit the target: a config error, never skipped."""


def _short(e: Exception, limit: int = 200) -> str:
    """An exception as one line of at most `limit` characters (tensorstore errors embed whole specs)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


class _LeftoverReads(logging.Filter):
    """Drops asyncio's '... exception was never retrieved' for the reads of a failed restore."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "exception was never retrieved" in text and ("async_deserialize" in text or "DATA_LOSS" in text):
            log.debug("ignored a leftover read of a failed checkpoint restore: %s", text.splitlines()[-1][:200])
            return False
        return True


def _closed_loop_callback(u) -> bool:
    """An unraisable 'Event loop is closed' raised by asyncio's call_soon_threadsafe (the callback
    of a read that finished after its restore gave up); any other error is not ours to hide."""
    if not (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"):
        return False
    frames = traceback.extract_tb(u.exc_traceback) if u.exc_traceback is not None else []
    return any(f.name == "call_soon_threadsafe" for f in frames) or not frames


def _quiet_failed_restore_leftovers() -> None:
    """Silence the leftovers of a failed restore: they are harmless and would print dozens of
    tracebacks per corrupt checkpoint. When one tensor fails to read, orbax closes its event loop
    while tensorstore still completes the other reads: their callbacks fail on the closed loop
    (unraisable 'Event loop is closed' errors) and their futures' errors are never retrieved
    (asyncio logs each). Both go to the log at debug level; anything else passes through. The hook
    and the filter stay installed for the process (the leftovers may surface after the restore).
    """
    previous = sys.unraisablehook
    if getattr(previous, "_m1jax_quiet", False):
        return

    def hook(u):
        if _closed_loop_callback(u):
            log.debug("ignored a leftover read callback of a failed checkpoint restore: Event loop is closed")
            return
        previous(u)

    hook._m1jax_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_LeftoverReads())


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

        def restore(step):
            mismatch = self._layout_mismatch(step, abstract_state)
            if mismatch:
                raise _LayoutError(
                    f"checkpoint at step {step} in {self.directory} does not fit this run's state "
                    f"(changed model or optimizer config? use a fresh workdir): {mismatch}"
                )
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
            out = self.manager.restore(step, args=args)
            return out["state"], out["data"]

        found = self._newest(restore, "resumed from")
        return None if found is None else (found[0], *found[1])

    def restore_params(self, abstract_params):
        """(step, params) of the newest checkpoint whose parameters restore, or None: only the
        "params" subtree is read (no optimizer state is needed to load a model)."""
        handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        reader = ocp.CheckpointManager(self.directory, item_handlers=handlers)
        target = {"params": abstract_params}
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)

        def restore(step):
            mismatch = self._layout_mismatch(step, target, only=target)
            if mismatch:
                raise _LayoutError(f"checkpoint at step {step} in {self.directory} holds another model: {mismatch}")
            item = ocp.args.PyTreeRestore(target, restore_args=restore_args, partial_restore=True)
            return reader.restore(step, args=ocp.args.Composite(state=item))["state"]["params"]

        try:
            return self._newest(restore, "loaded parameters from")
        finally:
            reader.close()

    def _newest(self, restore, verb: str):
        """(step, restore(step)) for the newest step that restores, falling back past unreadable
        ones (each a warning); None without checkpoints; CheckpointRestoreError if none restores."""
        failures = []
        _quiet_failed_restore_leftovers()  # before: the leftovers of a failed read fire during the restore
        for step in reversed(self.steps()):
            try:
                out = restore(step)
            except _LayoutError as e:
                raise ValueError(str(e)) from None
            except Exception as e:  # noqa: BLE001 - any failure means this checkpoint is unusable
                log.debug(f"restoring step {step} of {self.directory} failed", exc_info=True)
                short = _short(e)
                log.warning(
                    f"checkpoint at step {step} in {self.directory} could not be restored ({short}); "
                    "falling back to the previous checkpoint"
                )
                failures.append(f"step {step}: {short}")
                continue
            if failures:
                log.warning(f"{verb} step {step} after skipping {len(failures)} unreadable checkpoint(s)")
            return step, out
        if failures:
            raise CheckpointRestoreError(
                f"none of the {len(failures)} checkpoint(s) in {self.directory} could be restored; move that "
                "directory away to start afresh, or use another workdir:\n  " + "\n  ".join(failures)
            )
        return None

    def _layout_mismatch(self, step: int, abstract_state, only=None) -> str | None:
        """`layout_mismatch` against the step's stored metadata (`only`: of these top-level keys);
        None when that is unreadable (the restore then fails and is reported as a corrupt checkpoint)."""
        try:
            stored = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - a truncated checkpoint: left to the restore's fallback
            return None
        if stored is None or not jax.tree.leaves(stored):  # no usable metadata: nothing to compare
            return None
        if only is not None:
            stored = {k: stored[k] for k in only if k in stored}
        return layout_mismatch(stored, abstract_state)

    def close(self) -> None:
        self.manager.close()
