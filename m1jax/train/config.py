"""The pretraining config: an `ml_collections.ConfigDict` with few keys, checked before compiling.

`base_config()` holds every key with a default; config files (configs/pretrain_*.py) start from it
and change what they need. `model` is a preset name plus `ModelConfig` overrides, so
`--config.model.num_hidden_layers=16` works from the command line.
"""

from __future__ import annotations

import dataclasses
import difflib

import ml_collections

from m1jax import config as presets
from m1jax.config import ModelConfig
from m1jax.mesh import batch_parallel

SCHEDULES = ("cosine", "wsd", "constant")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Model: a preset of m1jax.config plus overrides of ModelConfig fields.
    c.model = ml_collections.ConfigDict({"preset": "tiny"})
    # Steps and batches. batch_size is global (all hosts); micro_batches splits it for
    # gradient accumulation (a scan, one optimizer update per step).
    c.steps = 200
    c.batch_size = 16
    c.micro_batches = 1
    # LM head + cross entropy this many tokens at a time (0: whole rows); long sequences with a
    # large vocabulary need it (M1: one 32K row's fp32 logits are 26 GB).
    c.loss_chunk = 0
    c.seq_len = 256
    # Optimizer: AdamW, warmup then cosine / WSD (warmup-stable-decay) / constant.
    c.learning_rate = 3e-3
    c.min_lr_ratio = 0.1
    c.warmup_steps = 20
    c.schedule = "cosine"
    c.decay_fraction = 0.2  # WSD: the final fraction of steps that decays
    c.b1 = 0.9
    c.b2 = 0.95
    c.eps = 1e-8
    c.weight_decay = 0.1
    c.grad_clip = 1.0
    c.max_bad_steps = 5  # consecutive non-finite steps before the run stops
    # Logging, evaluation, checkpoints.
    c.log_every = 10
    c.eval_every = 100
    c.eval_batches = 2
    c.checkpoint_every = 100
    c.keep_checkpoints = 3
    c.num_samples = 16  # greedy samples from held-out prompts at the end
    c.max_new_tokens = 96
    c.peak_tflops = 0.0  # per device, for MFU; 0: look up the device kind (None on CPU)
    # Data: "tasks" (the embedded reasoning corpus) or comma-separated text/jsonl/parquet files,
    # or a hub dataset name (online only).
    c.data = ml_collections.ConfigDict()
    c.data.source = "tasks"
    c.data.seed = 0
    c.data.tasks = ("add", "sub", "mul", "copy", "reverse", "sort", "linear")
    c.data.num_train_docs = 100_000
    c.data.num_eval_docs = 1_000
    c.data.text_field = "text"
    c.data.tokenizer = "byte"  # or a tokenizers JSON file
    # Mesh: axis sizes; -1 takes all remaining devices. One device by default.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, "sequence": 1})
    return c


def unknown_message(names, known, where: str) -> str | None:
    """An error message for `names` missing from `known` (with close matches), or None."""
    bad = sorted(set(names) - set(known))
    if not bad:
        return None
    hints = []
    for b in bad:
        close = difflib.get_close_matches(b, list(known), n=1)
        hints.append(f"{b!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown field(s) {', '.join(hints)} in {where}; it has: {', '.join(sorted(known))}"


def model_config(c: ml_collections.ConfigDict) -> ModelConfig:
    """The `ModelConfig` of a training config (a preset name plus overrides)."""
    overrides = dict(c.model)
    name = overrides.pop("preset", "tiny")
    if name not in presets.PRESETS:
        raise ValueError(f"config.model.preset={name!r} is not one of {sorted(presets.PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if msg := unknown_message(overrides, known | {"preset"}, "config.model (ModelConfig fields)"):
        raise ValueError(msg)
    return presets.PRESETS[name](**overrides)


def unknown_fields(c: ml_collections.ConfigDict, base: ml_collections.ConfigDict, prefix: str = "config") -> None:
    """Raise ValueError naming any field of `c` that `base` lacks, at any depth (`model` holds
    ModelConfig overrides and is checked by `model_config`)."""
    if msg := unknown_message(c.keys(), base.keys(), prefix):
        raise ValueError(msg)
    for k, v in base.items():
        section = isinstance(v, ml_collections.ConfigDict) and isinstance(c.get(k), ml_collections.ConfigDict)
        if k != "model" and section:
            unknown_fields(c[k], v, f"{prefix}.{k}")


def checker(c: ml_collections.ConfigDict, base: ml_collections.ConfigDict):
    """Reject fields `base` lacks; return need(ok, field, msg), which raises naming field and value."""
    unknown_fields(c, base)

    def need(ok: bool, field: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"config.{field}={c[field]!r}: {msg}")

    return need


def validate(c: ml_collections.ConfigDict, tokenizer_vocab: int | None = None) -> ModelConfig:
    """Check the config before anything is compiled; returns the model config."""
    need = checker(c, base_config())

    for f in ("steps", "batch_size", "micro_batches", "seq_len", "log_every", "eval_every", "checkpoint_every"):
        need(int(c[f]) >= 1, f, "must be a positive integer")
    need(c.batch_size % c.micro_batches == 0, "batch_size", f"must be divisible by micro_batches={c.micro_batches}")
    need(c.learning_rate > 0, "learning_rate", "must be positive")
    need(0 <= c.min_lr_ratio <= 1, "min_lr_ratio", "must lie in [0, 1]")
    need(0 <= c.warmup_steps <= c.steps, "warmup_steps", f"must lie in [0, steps={c.steps}]")
    need(c.schedule in SCHEDULES, "schedule", f"must be one of {SCHEDULES}")
    need(0 < c.decay_fraction <= 1, "decay_fraction", "must lie in (0, 1]")
    need(0 <= c.b1 < 1 and 0 <= c.b2 < 1, "b2" if not 0 <= c.b2 < 1 else "b1", "Adam betas must lie in [0, 1)")
    need(c.eps > 0, "eps", "must be positive")
    need(c.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
    need(c.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    need(c.max_bad_steps >= 1, "max_bad_steps", "must be >= 1")
    cfg = model_config(c)
    need(
        c.seq_len % cfg.block_size == 0,
        "seq_len",
        f"must be a multiple of the lightning block size (model.block_size={cfg.block_size})",
    )
    need(
        c.loss_chunk >= 0 and (c.loss_chunk == 0 or c.seq_len % c.loss_chunk == 0),
        "loss_chunk",
        f"must be 0 or a positive divisor of seq_len={c.seq_len}",
    )
    if tokenizer_vocab is not None and tokenizer_vocab > cfg.vocab_size:
        raise ValueError(
            f"config.model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary ({tokenizer_vocab})"
        )
    return cfg


def check_batch_layout(c: ml_collections.ConfigDict, mesh_shape: dict, num_processes: int = 1) -> None:
    """Each micro-batch must split evenly over the batch-parallel mesh axes, the batch over processes."""
    dp = batch_parallel(mesh_shape)
    if (c.batch_size // c.micro_batches) % dp:
        raise ValueError(
            f"config.batch_size={c.batch_size} / micro_batches={c.micro_batches} is not divisible by the "
            f"{dp} batch-parallel devices of mesh {dict(mesh_shape)}"
        )
    seq = int(mesh_shape.get("sequence", 1))
    if c.seq_len % seq:
        raise ValueError(f"config.seq_len={c.seq_len} is not divisible by the sequence mesh axis ({seq})")
    if c.batch_size % num_processes:
        raise ValueError(f"config.batch_size={c.batch_size} is not divisible by the {num_processes} processes")
