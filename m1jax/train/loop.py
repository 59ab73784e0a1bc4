"""The pretraining run: `train(config, workdir)`, callable from the CLI or a notebook.

Re-running with the same workdir resumes from the newest readable checkpoint (state and data
position), so the loss curve continues exactly. SIGTERM / SIGINT (preemption) finishes the
current step, saves a checkpoint at it and returns. Each process packs only its own rows of every
batch (its shard of the corpus); checkpoints hold every process's data position. In a multi-host
run every process works in the same workdir (a shared filesystem): only process 0 writes
config.json, metrics.jsonl, TensorBoard events and samples.jsonl, and it builds the corpus cache
before the others read it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from m1jax import sharding as shd
from m1jax.data import tasks as task_lib
from m1jax.data.pipeline import Packer, load_corpus
from m1jax.data.tokenizer import load_tokenizer
from m1jax.errors import RunError
from m1jax.generate import generate
from m1jax.train import flops as flops_lib
from m1jax.train import optim
from m1jax.train.checkpoint import Checkpointer
from m1jax.train.config import check_batch_layout, validate
from m1jax.train.metrics import MetricWriter, clear_summary, last_value, read_summary, write_summary
from m1jax.train.step import Trainer

log = logging.getLogger("m1jax")


class NonFiniteError(RunError):
    """`max_bad_steps` steps in a row had a non-finite loss or gradient."""


@contextlib.contextmanager
def _stop_on_signals():
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


def _shard_packer(corpus, c, **kwargs) -> Packer:
    """This process's packer: its `batch_size / processes` rows of every batch from its corpus shard."""
    n = jax.process_count()
    return Packer(corpus, c.seq_len, c.batch_size // n, shard=jax.process_index(), num_shards=n, **kwargs)


def gather_data_state(packer: Packer) -> dict:
    """{"shards": [packer state of process 0, 1, ...]}, the same on every process: only the
    primary process writes the checkpoint's JSON, so it must hold every process's position.
    A collective: every process calls it at the same step (as it does `Checkpointer.save`)."""
    local = packer.state
    pos = np.asarray([local["epoch"], local["index"], local["offset"]], np.int32)  # small counts: int32 is ample
    every = np.asarray(multihost_utils.process_allgather(pos)).reshape(packer.num_shards, 3)
    shards = [dict(local, shard=i, epoch=int(e), index=int(d), offset=int(o)) for i, (e, d, o) in enumerate(every)]
    return {"shards": shards}


def _load_corpora(c, tokenizer, workdir: str):
    """(train, eval) corpora. Process 0 tokenises and caches them first, the others then read its
    cache: concurrent writers of the same cache file (and of the datasets cache under it) race.
    Without a shared filesystem the others just build their own (one barrier later)."""
    first = jax.process_index() == 0
    if not first:
        multihost_utils.sync_global_devices("m1jax: corpus cached")
    corpora = load_corpus(c.data, tokenizer, workdir, "train"), load_corpus(c.data, tokenizer, workdir, "eval")
    if first and jax.process_count() > 1:
        multihost_utils.sync_global_devices("m1jax: corpus cached")
    return corpora


def _eval_loss(trainer: Trainer, params, corpus, c) -> float:
    packer = _shard_packer(corpus, c, shuffle=False)  # the same rows every time
    total, count = 0.0, 0.0
    for _ in range(c.eval_batches):
        s, n = jax.device_get(trainer.eval(params, trainer.put_batch(packer.next_batch())))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def samples(cfg, params, tokenizer, c) -> tuple[list[dict], float | None]:
    """Greedy completions of held-out prompts; accuracy for the embedded task corpus."""
    if c.num_samples <= 0 or c.data.source != "tasks":  # only the task corpus has checkable answers
        return [], None
    stream = task_lib.examples(c.data.seed + 1, "test", tuple(c.data.tasks))
    exs = [next(stream) for _ in range(c.num_samples)]
    prompts = [tokenizer.encode(e.prompt, bos=True) for e in exs]
    gen = generate(cfg, params, prompts, c.max_new_tokens, greedy=True, stop_tokens=[tokenizer.eos_id])
    toks, lengths = np.asarray(gen.tokens), np.asarray(gen.lengths)
    rows = []
    for e, t, n in zip(exs, toks, lengths, strict=True):
        text = tokenizer.decode(t[:n].tolist(), skip_special=False).replace("<eos>", "")
        rows.append(
            {"prompt": e.prompt, "completion": text, "answer": e.answer, "reward": task_lib.score(text, e.answer)}
        )
    return rows, float(np.mean([r["reward"] for r in rows]))


def make_optimizer(c: ml_collections.ConfigDict):
    """(lr schedule, AdamW transformation) of a pretraining config."""
    lr_fn = optim.schedule(c.schedule, c.learning_rate, c.steps, c.warmup_steps, c.min_lr_ratio, c.decay_fraction)
    tx = optim.adamw(lr_fn, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, grad_clip=c.grad_clip)
    return lr_fn, tx


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


def _complete(workdir: str, done: dict, steps: int) -> dict:
    """The summary a rerun of a finished run returns (samples from samples.jsonl)."""
    if done["end_step"] > steps:
        log.warning(f"the run in {workdir} finished at step {done['end_step']}, past config.steps={steps}")
    path, rows = os.path.join(workdir, "samples.jsonl"), []
    if os.path.exists(path):
        with open(path) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    start = done["end_step"]
    return dict(done, workdir=workdir, start_step=start, stopped_by=None, complete=True, samples=rows)


def train(c: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, stop_at: int | None = None) -> dict:
    """Train (or resume) per config `c` in `workdir`. Returns a summary dict.

    stop_at: stop after this step as a preemption would (checkpoint, no samples); the schedule
    still runs to `c.steps`, so a later call resumes the same run.

    A run that already reached `c.steps` is not trained again (nothing is built, restored or
    written): the summary stored when it finished comes back with `complete=True`. With a larger
    `c.steps` it goes on from its last checkpoint (the schedule is recomputed for the new length).
    """
    tokenizer = load_tokenizer(c.data.tokenizer)
    cfg = validate(c, tokenizer.vocab_size)
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=c.keep_checkpoints)
    if (done := finished(workdir, ckpt.steps(), c.steps)) is not None:
        ckpt.close()
        return _complete(workdir, done, c.steps)
    primary = jax.process_index() == 0  # the one writer of the workdir's files (orbax coordinates its own)
    if primary:
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            fh.write(c.to_json_best_effort(indent=2))

    mesh = shd.mesh_from_config(dict(c.mesh))
    n_proc = jax.process_count()
    check_batch_layout(c, dict(mesh.shape), n_proc)
    train_corpus, eval_corpus = _load_corpora(c, tokenizer, workdir)
    packer = _shard_packer(train_corpus, c, seed=c.data.seed)

    lr_fn, tx = make_optimizer(c)
    trainer = Trainer(cfg, tx, lr_fn, mesh, c.micro_batches, loss_chunk=c.loss_chunk)

    restored = ckpt.restore_latest(trainer.abstract_state)
    if restored is None:
        state, start = trainer.init(jax.random.PRNGKey(c.seed)), 0
    else:
        start, state, data_state = restored
        packer.restore(data_state)  # this process's entry; a different process count is an error
        log.info(f"resumed from step {start} ({ckpt.directory})")
    if restored is None and primary:
        clear_summary(workdir)  # of an earlier run in this workdir
    previous = read_summary(workdir) if restored else None
    if previous is not None and previous.get("end_step") == start < c.steps:
        log.warning(
            f"extending the finished run in {workdir} from step {start} to config.steps={c.steps}; the "
            f"learning-rate schedule is recomputed for {c.steps} steps (it was for {previous.get('steps')})"
        )
    # A final stage that is repeated (killed before summary.json) replaces its rows.
    again = ("sample_accuracy",) if start >= c.steps else ()
    writer = MetricWriter(workdir, resume_step=start if restored else None, enabled=primary, drop_at_resume=again)

    fpt = flops_lib.train_flops_per_token(cfg, c.seq_len)
    peak = flops_lib.peak_flops_per_device(override_tflops=c.peak_tflops)
    tokens_per_step = c.batch_size * c.seq_len
    summary = {"workdir": workdir, "start_step": start, "stopped_by": None}

    bar = None
    if progress and primary and start < c.steps:  # one bar, not one per process
        from tqdm.auto import tqdm

        bar = tqdm(total=c.steps, initial=start, desc="pretrain", unit="step", dynamic_ncols=True)
    step, last_loss = start, None
    t_log, steps_since, pending = time.perf_counter(), 0, None
    with _stop_on_signals() as flag:
        while step < min(c.steps, stop_at or c.steps) and stop_requested(flag) is None:
            state, metrics = trainer.step(state, trainer.put_batch(packer.next_batch()))
            step += 1
            steps_since += 1
            # Read the previous step's metrics while this one runs (keeps the device busy).
            if pending is not None:
                _check_finite(*pending, c.max_bad_steps)
            pending = (step, metrics)
            if step % c.log_every == 0 or step == c.steps:
                m = jax.device_get(metrics)
                dt = time.perf_counter() - t_log
                tps = steps_since * tokens_per_step / dt
                load = np.asarray(m.pop("expert_load"))
                row = dict(m, finite=float(m["finite"]), perplexity=float(np.exp(min(float(m["loss"]), 50.0))))
                row.update(
                    tokens_per_s=tps,
                    step_time_s=dt / steps_since,
                    mfu=flops_lib.mfu(tps, fpt, mesh.size, peak),
                    expert_load_max=float(load.max() * cfg.num_local_experts),
                    expert_load=load,
                )
                writer.write(step, row)
                last_loss = float(m["loss"])
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
                t_log, steps_since = time.perf_counter(), 0
            if step % c.eval_every == 0 or step == c.steps:
                writer.write(step, {"eval_loss": _eval_loss(trainer, state["params"], eval_corpus, c)})
            if step % c.checkpoint_every == 0 and step < c.steps:
                ckpt.save(step, state, gather_data_state(packer))
            if bar is not None:
                bar.update(1)
        if pending is not None:
            _check_finite(*pending, c.max_bad_steps)
    if bar is not None:
        bar.close()

    ckpt.save(step, state, gather_data_state(packer), force=True, wait=True)
    ckpt.close()
    if last_loss is None:  # nothing trained now (the final stage of a finished run is repeated)
        last_loss = last_value(workdir, "loss")
    summary.update(end_step=step, last_loss=last_loss, checkpoints=ckpt.steps())
    if step < c.steps:
        summary["stopped_by"] = flag["signal"] or "stop_at"
        log.warning(f"{summary['stopped_by']}: saved a checkpoint at step {step}; rerun the same command to resume")
        writer.close()
        return summary

    rows, acc = samples(cfg, state["params"], tokenizer, c)  # every process: generate is a collective
    if rows and primary:
        with open(os.path.join(workdir, "samples.jsonl"), "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)
        writer.write(step, {"sample_accuracy": acc})
        writer.write_text("samples", "\n\n".join(f"{r['prompt']}{r['completion']}" for r in rows[:8]), step)
    writer.close()
    summary.update(samples=rows, sample_accuracy=acc)
    if primary:  # last: its presence says the run, final stage included, is done
        write_summary(
            workdir,
            {k: summary[k] for k in ("end_step", "last_loss", "sample_accuracy", "checkpoints")}
            | {"steps": c.steps, "num_samples": len(rows)},
        )
    return summary


def _check_finite(step: int, metrics, max_bad: int) -> None:
    streak = int(metrics["bad_streak"])
    if streak:
        log.warning(f"step {step}: non-finite loss or gradient (loss={float(metrics['loss'])}); update skipped")
    if streak >= max_bad:
        raise NonFiniteError(
            f"{streak} consecutive steps up to step {step} had a non-finite loss or gradient norm "
            f"(max_bad_steps={max_bad}); lower the learning rate or check the data. The last good checkpoint is kept."
        )
