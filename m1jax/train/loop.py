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

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from m1jax import config as presets
from m1jax import sharding as shd
from m1jax.data.pipeline import Packer, load_sources, mixed_packer, parse_mixture, source_names
from m1jax.data.tokenizer import load_tokenizer
from m1jax.errors import RunError
from m1jax.evals import heldout
from m1jax.train import flops as flops_lib
from m1jax.train import optim
from m1jax.train.config import check_batch_layout, load_stored, model_config, validate
from m1jax.train.metrics import last_value
from m1jax.train.run import Run
from m1jax.train.step import Trainer

log = logging.getLogger("m1jax")


class NonFiniteError(RunError):
    """`max_bad_steps` steps in a row had a non-finite loss or gradient."""


def _shard_packer(corpus, c, **kwargs) -> Packer:
    """This process's packer: its `batch_size / processes` rows of every batch from its corpus shard."""
    n = jax.process_count()
    return Packer(corpus, c.seq_len, c.batch_size // n, shard=jax.process_index(), num_shards=n, **kwargs)


def _train_packer(sources, c) -> Packer:
    """This process's training packer: of its one source, or of the `data.mixture` sources."""
    if not c.data.get("mixture"):
        return _shard_packer(sources[0], c, seed=c.data.seed)
    n, weights = jax.process_count(), [w for _, w in parse_mixture(c.data.mixture)]
    return mixed_packer(sources, weights, c.seq_len, c.batch_size // n, seed=c.data.seed,
                        shard=jax.process_index(), num_shards=n)  # fmt: skip


def _load_corpora(c, tokenizer, workdir: str):
    """(train, eval) corpora, lists of one per source. Process 0 tokenises and caches them first,
    the others then read its cache: concurrent writers of the same cache file (and of the datasets
    cache under it) race. Without a shared filesystem the others just build their own (one barrier
    later)."""
    first = jax.process_index() == 0
    if not first:
        multihost_utils.sync_global_devices("m1jax: corpus cached")
    corpora = load_sources(c.data, tokenizer, workdir, "train"), load_sources(c.data, tokenizer, workdir, "eval")
    if first and jax.process_count() > 1:
        multihost_utils.sync_global_devices("m1jax: corpus cached")
    return corpora


def _eval_loss(trainer: Trainer, params, corpora, names, c) -> dict[str, float]:
    """Held-out loss: "eval_loss" over every source's first `eval.batches` batches (in corpus order,
    the same rows every time), and per source of a mixture "eval_loss/<name>"."""
    out, total, count = {}, 0.0, 0.0
    for name, corpus in zip(names, corpora, strict=True):
        packer = _shard_packer(corpus, c, shuffle=False)
        s_sum, n_sum = 0.0, 0.0
        for _ in range(c.eval.batches):
            s, n = jax.device_get(trainer.eval(params, trainer.put_batch(packer.next_batch())))
            s_sum, n_sum = s_sum + float(s), n_sum + float(n)
        if len(corpora) > 1:
            out[f"eval_loss/{name}"] = s_sum / max(n_sum, 1.0)
        total, count = total + s_sum, count + n_sum
    return {"eval_loss": total / max(count, 1.0), **out}


def _data_metrics(packer: Packer, state: dict, names, source_tokens) -> dict[str, float]:
    """Epochs each source has given (this process's shard, at the consumed position) and, for a
    mixture, each source's share of the tokens trained on since the last log."""
    epochs = packer.epochs_at(state)
    if len(names) == 1:
        return {"data/epochs": epochs[0]}
    share = source_tokens / max(int(source_tokens.sum()), 1)
    out = {f"data/{n}/epochs": e for n, e in zip(names, epochs, strict=True)}
    return out | {f"data/{n}/share": float(f) for n, f in zip(names, share, strict=True)}


def samples(cfg, params, tokenizer, c) -> tuple[list[dict], float | None]:
    """Greedy completions of held-out prompts; accuracy for the embedded task corpus (else none)."""
    if c.eval.num_samples <= 0 or c.data.source != "tasks":  # only the task corpus has checkable answers
        return [], None
    return heldout.greedy_accuracy(
        cfg, params, tokenizer, seed=c.data.seed + 1, tasks=tuple(c.data.tasks), n=c.eval.num_samples,
        max_new_tokens=c.eval.max_new_tokens,
    )  # fmt: skip


def make_optimizer(c: ml_collections.ConfigDict):
    """(lr schedule, AdamW transformation) of a pretraining config: one update per step."""
    return optim.from_config(c.optim, c.steps)


def _complete(workdir: str, done: dict) -> dict:
    """The summary a rerun of a finished run returns (samples from samples.jsonl)."""
    path, rows = os.path.join(workdir, "samples.jsonl"), []
    if os.path.exists(path):
        with open(path) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
    start = done["end_step"]
    return dict(done, workdir=workdir, start_step=start, stopped_by=None, complete=True, samples=rows)


def check_same_model(workdir: str, cfg) -> None:
    """A resumed run must train the model its checkpoints hold: compare `cfg` with the model of the
    workdir's config.json (upgraded from the flat layout), implementation fields aside."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return
    try:
        stored = model_config(load_stored(path).model)
    except ValueError as e:
        log.warning(f"{e}; not comparing its model with config.model")
        return
    skip = set(presets.IMPL_FIELDS)
    differ = [f for f in stored.to_dict() if f not in skip and getattr(stored, f) != getattr(cfg, f)]
    if differ:
        shown = ", ".join(f"{f}={getattr(stored, f)!r} (config: {getattr(cfg, f)!r})" for f in differ[:4])
        raise ValueError(
            f"the checkpoints in {workdir} are of another model: config.model differs from {path} in {shown}; "
            "set those fields (--config.model.<field>=...) or use a new workdir"
        )


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
    run = Run(c, workdir, desc="pretrain", progress=progress)
    if (done := run.finished()) is not None:
        return _complete(workdir, done)

    if run.ckpt.steps():
        check_same_model(workdir, cfg)
    mesh = shd.mesh_from_config(dict(c.mesh))
    check_batch_layout(c, dict(mesh.shape), jax.process_count())
    train_sources, eval_sources = _load_corpora(c, tokenizer, workdir)
    names = source_names(c.data)
    packer = _train_packer(train_sources, c)
    from m1jax.data import loader  # Grain: imported by a run that trains (~1.5 s), not by every CLI call

    batches = loader.make_iterator(packer, c.data.prefetch)
    lr_fn, tx = make_optimizer(c)
    trainer = Trainer(cfg, tx, lr_fn, mesh, c.micro_batches, loss_chunk=c.loss_chunk)
    fresh = lambda: trainer.init(jax.random.PRNGKey(c.seed))
    state, start, data = run.begin(trainer.abstract_state, fresh, final_keys=("sample_accuracy",))
    if data is not None:
        batches.set_state(data)  # this process's entry; a different process count is an error

    fpt = flops_lib.train_flops_per_token(cfg, c.seq_len)
    peak = flops_lib.peak_flops_per_device(override_tflops=c.log.peak_tflops)
    tokens_per_step = c.batch_size * c.seq_len
    clock = {"t": time.perf_counter(), "steps": 0, "pending": None, "last_loss": None}
    source_tokens = np.zeros(len(names), np.int64)  # since the last log

    def body(state, step):
        batch, from_sources = next(batches)
        source_tokens[:] += from_sources
        state, metrics = trainer.step(state, trainer.put_batch(batch))
        step += 1
        clock["steps"] += 1
        # Read the previous step's metrics while this one runs (keeps the device busy).
        if clock["pending"] is not None:
            check_finite(*clock["pending"], c.max_bad_steps)
        clock["pending"] = (step, metrics)
        if step % c.log.every == 0 or step == c.steps:
            m = jax.device_get(metrics)
            dt = time.perf_counter() - clock["t"]
            tps = clock["steps"] * tokens_per_step / dt
            load = np.asarray(m.pop("expert_load"))
            row = dict(m, finite=float(m["finite"]), perplexity=float(np.exp(min(float(m["loss"]), 50.0))))
            row.update(
                tokens_per_s=tps,
                step_time_s=dt / clock["steps"],
                mfu=flops_lib.mfu(tps, fpt, mesh.size, peak),
                expert_load_max=float(load.max() * cfg.num_local_experts),
                expert_load=load,
                **_data_metrics(packer, batches.get_state(), names, source_tokens),
            )
            source_tokens[:] = 0
            run.writer.write(step, row)
            clock["last_loss"] = float(m["loss"])
            if run.bar is not None:
                run.bar.set_postfix(loss=f"{clock['last_loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            clock["t"], clock["steps"] = time.perf_counter(), 0
        if step % c.eval.every == 0 or step == c.steps:
            run.writer.write(step, _eval_loss(trainer, state["params"], eval_sources, names, c))
        return state

    def after():
        if clock["pending"] is not None:
            check_finite(*clock["pending"], c.max_bad_steps)

    data_state = lambda _: loader.gather_state(packer, batches.get_state())
    try:
        state, step = run.loop(state, start, body, data_state, stop_at=stop_at, after=after)
    finally:
        batches.close()  # stops the prefetch thread
    last_loss = clock["last_loss"]
    if last_loss is None:  # nothing trained now (the final stage of a finished run is repeated)
        last_loss = last_value(workdir, "loss")
    summary = {"workdir": workdir, "start_step": start, "stopped_by": run.stopped_by, "end_step": step}
    summary.update(last_loss=last_loss, checkpoints=run.ckpt.steps())
    if run.stopped_by:
        run.close()
        return summary

    rows, acc = samples(cfg, state["params"], tokenizer, c)  # every process: generate is a collective
    if rows:
        run.write_file("samples.jsonl", rows)
        run.writer.write(step, {"sample_accuracy": acc})
        run.writer.write_text("samples", "\n\n".join(f"{r['prompt']}{r['completion']}" for r in rows[:8]), step)
    summary.update(samples=rows, sample_accuracy=acc)
    keep = ("end_step", "last_loss", "sample_accuracy", "checkpoints")
    run.close({k: summary[k] for k in keep} | {"num_samples": len(rows)})
    return summary


def check_finite(step: int, metrics, max_bad: int) -> None:
    streak = int(metrics["bad_streak"])
    if streak:
        log.warning(f"step {step}: non-finite loss or gradient (loss={float(metrics['loss'])}); update skipped")
    if streak >= max_bad:
        raise NonFiniteError(
            f"{streak} consecutive steps up to step {step} had a non-finite loss or gradient norm "
            f"(max_bad_steps={max_bad}); lower the learning rate or check the data. The last good checkpoint is kept."
        )
