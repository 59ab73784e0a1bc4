"""The layered run config: `ml_collections.ConfigDict` sections shared by pretraining and RL.

`shared_config()` holds what every run has, each section defined once:
  seed, steps, micro_batches
  model       a preset of `m1jax.config.PRESETS` plus `ModelConfig` overrides
              (`--config.model.num_hidden_layers=16` works from the command line)
  optim       AdamW and its learning-rate schedule
  data        where the text comes from and how it is tokenised
  mesh        device-mesh axis sizes
  log         metrics cadence
  eval        evaluation cadence
  checkpoint  checkpoint cadence and retention
`base_config()` adds pretraining's fields (batch, sequence length, held-out evaluation);
`rl.config.base_config()` adds the `rl` section. Config files (configs/*.py) start from one of
them and change what they need. Keys of the flat configs before this layout are in `RENAMED`:
using one is an error naming its new key, and `upgrade` converts a stored flat config.json.
"""

from __future__ import annotations

import dataclasses
import difflib
import json

import ml_collections

from m1jax import config as presets
from m1jax.config import ModelConfig
from m1jax.data.pipeline import parse_mixture
from m1jax.mesh import batch_parallel

SCHEDULES = ("cosine", "wsd", "constant")


def shared_config() -> ml_collections.ConfigDict:
    """The sections every run has (pretraining defaults; RL changes some)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 200
    c.micro_batches = 1  # gradient accumulation: a scan, one optimizer update per step
    c.model = ml_collections.ConfigDict({"preset": "tiny"})
    # AdamW after global-norm clipping (0: none); linear warmup, then the schedule.
    c.optim = ml_collections.ConfigDict(
        {
            "learning_rate": 3e-3,
            "schedule": "cosine",  # or "wsd" (warmup-stable-decay), "constant"
            "warmup_steps": 20,
            "min_lr_ratio": 0.1,  # cosine / wsd end at this fraction of the peak
            "decay_fraction": 0.2,  # wsd: the final fraction of steps that decays
            "b1": 0.9,
            "b2": 0.95,
            "eps": 1e-8,
            "weight_decay": 0.1,
            "grad_clip": 1.0,
        }
    )
    # Data: "tasks" (the embedded reasoning corpus); pretraining also reads text/jsonl/parquet files.
    c.data = ml_collections.ConfigDict()
    c.data.source = "tasks"
    c.data.seed = 0
    c.data.tasks = ("add", "sub", "mul", "copy", "reverse", "sort", "linear")
    c.data.tokenizer = "byte"  # or a tokenizers JSON file
    # Mesh: axis sizes; -1 takes all remaining devices. One device by default.
    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, "sequence": 1})
    c.log = ml_collections.ConfigDict({"every": 10})
    c.eval = ml_collections.ConfigDict({"every": 100})
    c.checkpoint = ml_collections.ConfigDict({"every": 100, "keep": 3})
    return c


def base_config() -> ml_collections.ConfigDict:
    """The pretraining config: the shared sections plus batch, sequence and held-out evaluation."""
    c = shared_config()
    c.batch_size = 16  # global (all hosts); micro_batches splits it
    c.seq_len = 256
    # LM head + cross entropy this many tokens at a time (0: whole rows); long sequences with a
    # large vocabulary need it (M1: one 32K row's fp32 logits are 26 GB).
    c.loss_chunk = 0
    c.max_bad_steps = 5  # consecutive non-finite steps before the run stops
    c.data.num_train_docs = 100_000
    c.data.num_eval_docs = 1_000
    c.data.text_field = "text"
    # Prepared directories with weights, "dirA:0.7,dirB:0.3" (instead of data.source); each source
    # keeps its own epochs and held-out documents. Deterministic in data.seed.
    c.data.mixture = ""
    c.data.prefetch = 2  # batches packed ahead in a background thread (0: on the step's thread)
    c.log.peak_tflops = 0.0  # per device, for MFU; 0: look up the device kind (None on CPU)
    c.eval.batches = 2  # held-out loss over this many batches
    c.eval.num_samples = 16  # greedy samples from held-out prompts at the end
    c.eval.max_new_tokens = 96
    return c


# The flat keys of the configs before the sections (config.json of older workdirs): old -> new.
_OPTIM = ("learning_rate", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "b1", "b2", "eps")
SHARED_RENAMED = {k: f"optim.{k}" for k in _OPTIM + ("weight_decay", "grad_clip")} | {
    "log_every": "log.every",
    "eval_every": "eval.every",
    "checkpoint_every": "checkpoint.every",
    "keep_checkpoints": "checkpoint.keep",
}
RENAMED = SHARED_RENAMED | {
    "eval_batches": "eval.batches",
    "num_samples": "eval.num_samples",
    "max_new_tokens": "eval.max_new_tokens",
    "peak_tflops": "log.peak_tflops",
}


def unknown_message(names, known, where: str, renamed: dict | None = None) -> str | None:
    """An error message for `names` missing from `known` (a renamed key with its new name, else
    close matches), or None. `renamed` maps full dotted names ("config.x") to new ones."""
    bad = sorted(set(names) - set(known))
    if not bad:
        return None
    renamed = renamed or {}
    moved = [f"{where}.{b} is now {renamed[f'{where}.{b}']}" for b in bad if f"{where}.{b}" in renamed]
    if moved:
        return "renamed field(s): " + "; ".join(moved) + " (configs are in sections now)"
    hints = []
    for b in bad:
        close = difflib.get_close_matches(b, list(known), n=1)
        hints.append(f"{b!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown field(s) {', '.join(hints)} in {where}; it has: {', '.join(sorted(known))}"


def dotted(renamed: dict) -> dict:
    """RENAMED with "config." in front of both names, as `unknown_message` takes it."""
    return {f"config.{k}": f"config.{v}" for k, v in renamed.items()}


def model_config(model: ml_collections.ConfigDict, where: str = "config.model") -> ModelConfig:
    """The `ModelConfig` of a config's model section (a preset name plus overrides)."""
    overrides = dict(model)
    name = overrides.pop("preset", "tiny")
    if name not in presets.PRESETS:
        raise ValueError(f"{where}.preset={name!r} is not one of {sorted(presets.PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if msg := unknown_message(overrides, known | {"preset"}, f"{where} (ModelConfig fields)"):
        raise ValueError(msg)
    return presets.PRESETS[name](**overrides)


def unknown_fields(c, base, prefix: str = "config", renamed: dict | None = None) -> None:
    """Raise ValueError naming any field of `c` that `base` lacks, at any depth (`model` holds
    ModelConfig overrides and is checked by `model_config`)."""
    if msg := unknown_message(c.keys(), base.keys(), prefix, renamed):
        raise ValueError(msg)
    for k, v in base.items():
        section = isinstance(v, ml_collections.ConfigDict) and isinstance(c.get(k), ml_collections.ConfigDict)
        if k != "model" and section:
            unknown_fields(c[k], v, f"{prefix}.{k}", renamed)


def checker(c, base, renamed: dict):
    """Reject fields `base` lacks; return need(ok, field, msg), which raises naming field and value
    (`field` dotted: "optim.learning_rate")."""
    unknown_fields(c, base, renamed=dotted(renamed))

    def need(ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ValueError(f"config.{name}={field(c, name)!r}: {msg}")

    return need


def check_shared(c, need) -> None:
    """The checks of the shared sections."""
    for f in ("steps", "micro_batches", "log.every", "eval.every", "checkpoint.every", "checkpoint.keep"):
        need(int(field(c, f)) >= 1, f, "must be a positive integer")
    o = c.optim
    need(o.learning_rate > 0, "optim.learning_rate", "must be positive")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must lie in [0, 1]")
    need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(o.schedule in SCHEDULES, "optim.schedule", f"must be one of {SCHEDULES}")
    need(0 < o.decay_fraction <= 1, "optim.decay_fraction", "must lie in (0, 1]")
    need(0 <= o.b1 < 1, "optim.b1", "Adam betas must lie in [0, 1)")
    need(0 <= o.b2 < 1, "optim.b2", "Adam betas must lie in [0, 1)")
    need(o.eps > 0, "optim.eps", "must be positive")
    need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")


def field(c, name: str):
    """The value of dotted field `name` ("optim.learning_rate") of config `c`."""
    for part in name.split("."):
        c = c[part]
    return c


def validate(c: ml_collections.ConfigDict, tokenizer_vocab: int | None = None) -> ModelConfig:
    """Check a pretraining config before anything is compiled; returns the model config."""
    need = checker(c, base_config(), RENAMED)
    check_shared(c, need)
    for f in ("batch_size", "seq_len", "max_bad_steps"):
        need(int(c[f]) >= 1, f, "must be a positive integer")
    need(c.batch_size % c.micro_batches == 0, "batch_size", f"must be divisible by micro_batches={c.micro_batches}")
    need(c.optim.warmup_steps <= c.steps, "optim.warmup_steps", f"must lie in [0, steps={c.steps}]")
    need(int(c.data.prefetch) >= 0, "data.prefetch", "must be >= 0 (batches packed ahead)")
    if c.data.mixture:
        parse_mixture(c.data.mixture)  # names the bad entry
        need(c.data.source == "tasks", "data.mixture", f"replaces data.source ({c.data.source!r}): set one of them")
    cfg = model_config(c.model)
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


# -- stored configs of older workdirs ---------------------------------------------------------

# The alphas the presets baked in before they were derived from the layer count (flat configs):
# a stored model section that did not set them keeps the value its checkpoint was trained with.
_OLD_PRESET_ALPHA = {"tiny": (2 * 4) ** 0.25, "small": (2 * 8) ** 0.25, "minimax_m1": (2 * 80) ** 0.25}
_ALPHA_FIELDS = ("layernorm_full_attention_alpha", "layernorm_linear_attention_alpha", "layernorm_mlp_alpha")


def upgrade(stored: dict, renamed: dict = RENAMED) -> dict:
    """A config dict as stored in a workdir's config.json, in the current layout: flat keys of
    the layout before sections move to their sections, and a flat config's model keeps the
    DeepNorm alphas its preset had then. A current config comes back unchanged."""
    if not any(k in stored for k in renamed):
        return stored
    out: dict = {}
    for k, v in stored.items():
        if k in renamed:
            *parents, leaf = renamed[k].split(".")
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
        elif isinstance(v, dict):
            out[k] = out.get(k, {}) | v
        else:
            out[k] = v
    model = dict(out.get("model", {}))
    alpha = _OLD_PRESET_ALPHA.get(model.get("preset", "tiny"))
    if alpha is not None:
        out["model"] = {f: alpha for f in _ALPHA_FIELDS} | model
    return out


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def load_stored(path: str) -> ml_collections.ConfigDict:
    """The pretraining config a workdir stored in `path` (its config.json), in the current layout
    (a flat one is upgraded). ValueError naming the file if it cannot be read as one."""
    try:
        with open(path) as fh:
            stored = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e})") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path} holds a JSON {type(stored).__name__}, not a config")
    c = base_config()
    try:
        c.update_from_flattened_dict(_flatten(upgrade(stored)))
        model_config(c.model, where=f"{path}: model")
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not a pretraining config this version reads ({e})") from None
    return c
