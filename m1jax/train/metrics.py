"""Metrics to `metrics.jsonl` (one JSON object per logged step) and TensorBoard (tensorboardX)."""

from __future__ import annotations

import json
import math
import os

import numpy as np


def _scalar(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)  # JSON has no NaN / inf


class MetricWriter:
    """Appends to `workdir/metrics.jsonl` and writes TensorBoard events under `workdir/tb`.

    `resume_step`: entries logged after this step (by a run that was killed before its next
    checkpoint) are dropped, so the file holds one curve however often the run was resumed.
    `enabled=False` (every process of a multi-host run but the first, which share one workdir)
    touches no file and makes every method a no-op: one writer per curve, else the processes
    would truncate and append to the same files concurrently.
    """

    def __init__(self, workdir: str, resume_step: int | None = None, tensorboard: bool = True, enabled: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._fh = self._tb = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path) as fh:
                keep = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as fh:
                fh.writelines(keep)
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)  # a fresh run in an old workdir starts a fresh curve
        self._fh = open(self.path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            if v is None:
                continue
            arr = np.asarray(v)
            if arr.ndim == 0:
                row[k] = _scalar(arr)
                if self._tb is not None:
                    self._tb.add_scalar(k, float(arr), step)
            else:
                row[k] = np.round(arr.astype(np.float64), 6).tolist()
                if self._tb is not None:
                    self._tb.add_histogram(k, arr, step)
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def write_text(self, tag: str, text: str, step: int) -> None:
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]
