"""Metrics to `metrics.jsonl` (one JSON object per logged step) and TensorBoard (tensorboardX)."""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np

log = logging.getLogger("m1jax")
# tensorboardX warns once per non-finite value written; the trainer already reports such a step.
logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)


def _scalar(v):
    v = float(v)
    return v if math.isfinite(v) else str(v)  # JSON has no NaN / inf


def parse_metrics(path: str) -> tuple[list[dict], list[int]]:
    """(rows, numbers of the lines that are not JSON objects) of a metrics file.

    A run killed while writing leaves a torn last line; a damaged file may hold others. Neither
    must block a resume, so they are reported, not raised.
    """
    rows, bad = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and isinstance(row.get("step", 0), int):
                rows.append(row)
            else:
                bad.append(number)
    return rows, bad


class MetricWriter:
    """Appends to `workdir/metrics.jsonl` and writes TensorBoard events under `workdir/tb`.

    `resume_step`: entries logged after this step (by a run that was killed before its next
    checkpoint) are dropped, so the file holds one curve however often the run was resumed; so
    are lines that are not JSON (a torn last line from a kill during a write), with a warning, and
    rows at `resume_step` holding a key of `drop_at_resume` (a stage that will be logged again).
    `enabled=False` (every process of a multi-host run but the first, which share one workdir)
    touches no file and makes every method a no-op: one writer per curve, else the processes
    would truncate and append to the same files concurrently.
    """

    def __init__(
        self,
        workdir: str,
        resume_step: int | None = None,
        tensorboard: bool = True,
        enabled: bool = True,
        drop_at_resume: tuple[str, ...] = (),
    ):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.enabled = enabled
        self._fh = self._tb = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            rows, bad = parse_metrics(self.path)
            if bad:
                log.warning(f"{self.path}: dropped {len(bad)} unreadable line(s) {bad[:5]} (a torn write?)")
            keep = [
                r
                for r in rows
                if r.get("step", 0) < resume_step
                or (r.get("step", 0) == resume_step and not set(drop_at_resume) & r.keys())
            ]
            if len(keep) < len(rows):
                log.info(f"{self.path}: {len(rows) - len(keep)} row(s) after step {resume_step} superseded")
            tmp = self.path + ".tmp"
            with open(tmp, "w") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in keep)
            os.replace(tmp, self.path)  # a kill now leaves the old file or the new one, never half of it
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
    """The rows of `workdir/metrics.jsonl`; unreadable lines are skipped with a warning naming them."""
    path = os.path.join(workdir, "metrics.jsonl")
    rows, bad = parse_metrics(path)
    if bad:
        log.warning(f"{path}: skipped {len(bad)} unreadable line(s) {bad[:5]}")
    return rows


SUMMARY = "summary.json"


def write_summary(workdir: str, summary: dict) -> None:
    """`workdir/summary.json`: a finished run's results; its presence marks the run complete."""
    path = os.path.join(workdir, SUMMARY)
    with open(path + ".tmp", "w") as fh:
        json.dump(summary, fh, indent=2, default=float)
    os.replace(path + ".tmp", path)


def clear_summary(workdir: str) -> None:
    """Remove the summary of an earlier run (a fresh run in an old workdir)."""
    try:
        os.remove(os.path.join(workdir, SUMMARY))
    except FileNotFoundError:
        pass


def read_summary(workdir: str) -> dict | None:
    """The finished run's summary, or None if there is none (or it is unreadable: the run then
    finishes again)."""
    path = os.path.join(workdir, SUMMARY)
    try:
        with open(path) as fh:
            out = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        log.warning(f"{path}: unreadable ({e}); the run's final stage runs again")
        return None
    return out if isinstance(out, dict) else None


def last_value(workdir: str, key: str):
    """The newest logged value of `key` in `workdir/metrics.jsonl`, or None."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = [r for r in parse_metrics(path)[0] if key in r]
    return rows[-1][key] if rows else None
