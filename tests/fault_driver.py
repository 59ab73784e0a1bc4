"""A pretraining run in a child process that dies at a chosen point, for tests/test_faults.py.

    python tests/fault_driver.py WORKDIR CONFIG_JSON FAULT STEP

CONFIG_JSON: flattened overrides of `m1jax.train.config.base_config()`. FAULT:
- `kill_in_step`: SIGKILL while step STEP is being computed (its update dispatched, not finished);
- `kill_in_save`: SIGKILL inside the checkpoint save at STEP, once its data is written and before
  it is committed (orbax's first rename inside that step's temporary directory);
- `none`: run to the end.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from m1jax.train import config as tc
from m1jax.train import loop


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(workdir: str, overrides: str, fault: str, at: int) -> None:
    c = tc.base_config()
    c.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(overrides).items()})
    if fault == "kill_in_step":
        base = loop.Trainer

        class Dying(base):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                step, count = self.step, [0]

                def dying_step(state, batch):
                    out = step(state, batch)  # dispatched: the step is running on the device
                    count[0] += 1
                    if count[0] == at:  # a fresh run: the count is the step number
                        _die()
                    return out

                self.step = dying_step

        loop.Trainer = Dying
    elif fault == "kill_in_save":
        tmp = f"{os.sep}{at}.orbax-checkpoint-tmp"  # orbax writes a step there, then renames it into place

        def dying(rename):
            def inner(src, dst, *args, **kwargs):
                if tmp in os.fspath(src):
                    _die()
                return rename(src, dst, *args, **kwargs)

            return inner

        os.rename, os.replace = dying(os.rename), dying(os.replace)
    elif fault != "none":
        raise SystemExit(f"unknown fault {fault!r}")
    summary = loop.train(c, workdir, progress=False)
    print(json.dumps({k: summary.get(k) for k in ("start_step", "end_step", "complete", "stopped_by")}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
