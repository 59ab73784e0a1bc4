"""RL step time of m1jax (`rl.loop.rl_step`) against TRL's `GRPOTrainer(loss_type="cispo")`, side by side.

Usage: python -m experiments.benchmarks.rl_step [--quick] [--config configs/cispo_toy.py] [--steps 20]
       [--warmup 2] [--block 4] [--threads 2] [--pad-multiple 8] [--init-from DIR] [--out rl_step_benchmark.json]

Needs `trl` beside m1jax (not a test dependency: install both into a venv of their own, e.g.
`pip install torch==2.13.0 -e . trl`, torch pinned on the same command line so pip keeps the CPU build).

One RL step = one rollout (P prompts x G samples of up to N tokens, scored by the task reward) and U
optimizer updates on disjoint minibatches of it (`cispo_toy`: 32 x 8 samples, 4 tokens, 2 updates,
random init; `cispo_tiny`: 16 x 8 samples, up to 64 tokens, 4 updates, from the pretrained embedded
default in `rl.init_from` or `--init-from`). m1jax runs `rl.loop.rl_step` as `rl.loop.train` builds it
(`setup`, `make_trainer`, `initial_state`: the config's model, sampler, reward, AdamW and CISPO loss).
TRL's GRPOTrainer starts from the *same* initial weights (`m1jax.hf.save_pretrained`, loaded by
transformers' MiniMaxForCausalLM through `experiments.benchmarks.forward.torch_twin`) with the same
prompts in the same order (the config's `rl.prompts.batch` of each step; the toy's DigitTokenizer or the
byte tokenizer wrapped as a transformers tokenizer built in code), num_generations = G,
max_completion_length = N, the same temperature / top-p / top-k, the same reward function (`rl.rewards`
on the same decoded texts), CISPO with epsilon_high = rl.cispo.ratio_max, beta = 0 (no reference model),
AdamW with the config's learning rate, betas, eps, weight decay and clipping, a constant schedule, fp32,
no gradient checkpointing, and steps_per_generation = U with one sample row per minibatch row
(per_device_train_batch_size = P x G / U, gradient accumulation 1), so a generation is followed by U
optimizer steps, each on P x G / U rows: the same work as one m1jax step. TRL recomputes the old
log-probs (its steps are not aligned with generation), as m1jax does (rl.old_logp = "trainer"). torch
runs on `--threads` threads (default: all cores, as XLA does).

transformers' MiniMax applies RoPE to the whole head, so a model with partial RoPE (`mini`:
rotary_dim 16 of head_dim 32) runs with rotary_dim = head_dim on both sides (`rope` in the report).
Before timing, the log-probs of one m1jax rollout under both frameworks' initial weights are compared
(`parity.max_abs_logp_diff`): the two sides start from the same function. Then TRL trains and, through
a callback at rollout boundaries, hands over to m1jax every `--block` rollouts, so machine drift hits
both alike: TRL rollouts 0..b-1, m1jax steps 0..b-1, TRL b..2b-1, ... Each side's first `--warmup`
rollouts are not timed (compilation, allocator warm-up), nor is the first rollout of each block after
the first (a switch step: the other framework just ran; recorded in `switch_times_s`). The m1jax time
of a step is the wall time of `rl_step` (`step_time_s`; its phases `gen_time_s`, `reward_time_s`,
`logprob_time_s`, `update_time_s` come from the metrics row). The TRL time of a rollout is the wall time
of its U optimizer steps (from the end of the step before, callback time excluded, to the end of the
U-th: data loading, generation, scoring, old log-probs, U forward/backward/AdamW steps and the
trainer's bookkeeping); its phases are measured by wrapping GRPOTrainer's `_generate` (generation),
`_calculate_rewards` (reward), the rest of `_generate_and_score_completions` (old log-probs,
advantages, padding) and the remainder (updates). `ratio` = TRL median / m1jax median (> 1: m1jax is
faster); the medians of the per-optimizer-step times are also reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import runpy
import statistics
import tempfile
import time
from types import SimpleNamespace

import jax
import ml_collections
import numpy as np

from experiments.benchmarks.forward import env, torch_twin, write_report
from m1jax import host
from m1jax import sharding as shd
from rl import loop
from rl import prompts as prompt_lib
from rl.config import max_new_tokens_at, validate
from rl.evaluate import decode_responses
from rl.rollouts import Producer


def load_config(path: str, quick: bool, pad_multiple: int = 0, init_from=None) -> ml_collections.ConfigDict:
    c = runpy.run_path(path)["get_config"]()
    if init_from is not None:
        c.rl.init_from = init_from
    if pad_multiple:  # the toy's 6-token prompts padded to the default 32 would make m1jax compute on 36 positions
        c.rl.sampling.pad_multiple = pad_multiple
    if c.rl.max_staleness:
        raise SystemExit(f"--config {path}: rl.max_staleness={c.rl.max_staleness}; rl_step is the synchronous step")
    if quick:  # a smoke test of the whole path: a small batch
        c.rl.update(prompts_per_step=4, samples_per_prompt=4)
    validate(c)
    return c


# --- the TRL side ---------------------------------------------------------------------------------


def hf_tokenizer(tok, vocab_size: int):
    """`tok` (the toy's DigitTokenizer, or the byte tokenizer of the `tasks` configs: one id per ASCII
    character) as a transformers tokenizer: the same ids for the prompt texts (<bos> then one id per
    character), <pad> / <eos> special; every other id (non-ASCII bytes, unused ids up to the model's
    vocabulary) a placeholder of its own, so every id the model can sample has a token. `grpo_trainer`
    checks that both encode every prompt alike."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = {tok.pad_id: "<pad>", tok.bos_id: "<bos>", tok.eos_id: "<eos>"}
    vocab = {}
    for i in range(vocab_size):
        text = specials.get(i) or (tok.decode([i]) if i < tok.vocab_size else "")
        vocab[text if (i in specials or len(text) == 1) and text not in vocab else f"<unused{i}>"] = i
    t = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.bos_id)])
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def trl_reward(reward_fn, tok):
    """The m1jax reward as a TRL reward function: completion ids (stop token included, as TRL keeps it)
    decoded as `rl.evaluate.decode_responses` does, scored by `reward_fn` against the prompt's ref (the
    dataset's `ref` column: the ref dict as JSON)."""

    def reward(prompts, completions, completion_ids, ref, **_):
        lengths = np.asarray([len(ids) for ids in completion_ids])
        tokens = np.full((len(lengths), max(lengths.max(initial=0), 1)), tok.pad_id)
        for row, ids in zip(tokens, completion_ids, strict=True):
            row[: len(ids)] = ids
        texts = decode_responses(tok, SimpleNamespace(tokens=tokens, lengths=lengths), tok.eos_id)
        return [float(x) for x in reward_fn(texts, [json.loads(x) for x in ref])]

    reward.__name__ = "m1jax_reward"
    return reward


class Phases:
    """Wall time of wrapped GRPOTrainer methods, summed since the last `take()`."""

    def __init__(self):
        self.acc: dict[str, float] = {}

    def wrap(self, obj, name: str, key: str, when=lambda: True):
        fn = getattr(obj, name)

        def timed(*args, **kw):
            if not when():
                return fn(*args, **kw)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.acc[key] = self.acc.get(key, 0.0) + time.perf_counter() - t0

        setattr(obj, name, timed)

    def take(self) -> dict[str, float]:
        out, self.acc = self.acc, {}
        return out


def grpo_trainer(c, cfg, model, tok, reward_fn, rollouts: int, outdir: str, threads: int):
    import datasets
    import torch
    from trl import GRPOConfig, GRPOTrainer

    r, o, s = c.rl, c.optim, c.rl.sampling
    rows = r.prompts_per_step * r.samples_per_prompt
    pairs = [  # the prompts of m1jax's steps, as its Producer draws them
        p for step in range(rollouts) for p in prompt_lib.for_config(c, step, r.prompts_per_step)
    ]
    data = datasets.Dataset.from_list([{"prompt": p, "ref": json.dumps(ref)} for p, ref in pairs])
    hf_tok = hf_tokenizer(tok, cfg.vocab_size)
    for p, _ in pairs:
        ids, want = hf_tok(p)["input_ids"], tok.encode(p, bos=True)
        if ids != want:
            raise SystemExit(f"the wrapped tokenizer encodes {p!r} as {ids}, the toy's as {want}")
    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    no_ckpt = {k: False for k in ("gradient_checkpointing", "activation_checkpointing") if k in fields}
    args = GRPOConfig(
        output_dir=outdir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        **no_ckpt,
        seed=c.seed,
        max_steps=rollouts * r.updates_per_rollout,
        per_device_train_batch_size=rows // r.updates_per_rollout,
        gradient_accumulation_steps=1,
        steps_per_generation=r.updates_per_rollout,
        num_iterations=1,
        num_generations=r.samples_per_prompt,
        max_completion_length=max_new_tokens_at(c, 0),
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        shuffle_dataset=False,  # rollout k takes the prompts of m1jax's step k
        loss_type="cispo",
        epsilon_high=r.cispo.ratio_max,
        beta=r.kl_coef,
        scale_rewards="group",
        mask_truncated_completions=bool(r.mask_truncated),
        router_aux_loss_coef=cfg.router_aux_loss_coef if r.aux_loss else 0.0,
        learning_rate=o.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=o.b1,
        adam_beta2=o.b2,
        adam_epsilon=o.eps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.grad_clip or 0.0,
        logging_strategy="no",  # m1jax's rl_step computes its metrics row but writes nothing either
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=trl_reward(reward_fn, tok),
        args=args,
        train_dataset=data,
        processing_class=hf_tok,
    )
    torch.set_num_threads(threads)
    return trainer, args


# --- parity: the same initial function on both sides ----------------------------------------------


def logp_parity(c, parts, trainer, params, model) -> dict:
    """Max |log pi_m1jax - log pi_torch| over the response tokens of one m1jax rollout (step 0)."""
    import torch

    producer = Producer(c, parts.cfg, parts.tokenizer, parts.reward_fn, parts.sampling)
    rollout, _, _ = producer.generate(params, 0)
    host_r = jax.device_get(rollout)
    dev = trainer.shard_rows(
        {k: np.asarray(getattr(host_r, k)) for k in ("prompt", "prompt_lengths", "tokens")}
        | {"mask": np.asarray(host_r.mask)}
    )
    ours = np.asarray(trainer.logprobs(params, dev))
    prompt, plen = np.asarray(host_r.prompt), np.asarray(host_r.prompt_lengths)
    toks, mask = np.asarray(host_r.tokens), np.asarray(host_r.mask)
    t, n = prompt.shape[1], toks.shape[1]
    theirs = np.zeros_like(ours)
    temperature = c.rl.sampling.temperature
    for length in np.unique(plen):  # rows of one prompt length: no padding inside the sequence
        rows = np.flatnonzero(plen == length)
        seq = np.concatenate([prompt[rows, t - length :], toks[rows]], axis=1).astype(np.int64)
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(seq), use_cache=False).logits.float()
        logits = logits[:, length - 1 : length + n - 1] / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(seq[:, length:, None])).squeeze(-1)
        theirs[rows] = lp.numpy()
    on = mask > 0
    diff = np.abs(ours - theirs)[on]
    return {
        "rows": int(mask.shape[0]),
        "tokens": int(on.sum()),
        # Positions per row in the trainer's forwards: m1jax's rollout pads prompts (to a multiple of the
        # sampler's pad_multiple) and runs [padded prompt | N]; TRL pads to the batch's longest prompt.
        "sequence_length": {"m1jax": int(t + n), "trl": int(plen.max() + n)},
        "max_abs_logp_diff": float(diff.max()),
        "mean_abs_logp_diff": float(diff.mean()),
    }


# --- the run --------------------------------------------------------------------------------------


def cfg_name(c) -> str:
    return f"the pretrained model of {c.rl.init_from}" if c.rl.init_from else f"config.{c.model.preset}"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cispo_toy.py", help="an RL config (toy_* or tasks prompts)")
    ap.add_argument("--steps", type=int, default=20, help="timed rollouts per side (switch steps included)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rollouts per side first")
    ap.add_argument("--block", type=int, default=4, help="rollouts per side before handing over to the other")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="4 prompts x 4 samples, 1 warm-up + 2 timed rollouts")
    ap.add_argument("--pad-multiple", type=int, default=8, help="m1jax prompt padding (0: the config's)")
    ap.add_argument("--init-from", default=None, help="pretraining workdir (default: the config's rl.init_from)")
    ap.add_argument("--out", default="rl_step_benchmark.json")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.warmup, a.block = 2, 1, 3
    try:
        import torch
        import trl
        from transformers import TrainerCallback
    except ImportError as e:
        raise SystemExit(f"this benchmark needs trl beside m1jax ({e}); see the module docstring") from None

    load_start = os.getloadavg()  # other work on the machine slows both sides (torch's threads the most)
    c = load_config(a.config, a.quick, a.pad_multiple, a.init_from)
    r = c.rl
    rollouts = a.warmup + a.steps
    c.steps = rollouts  # the (constant) schedule's length; nothing else depends on it

    # m1jax, built as rl.loop.train builds it.
    mesh = shd.mesh_from_config(dict(c.mesh))
    parts = loop.setup(c, mesh)
    rope_note = None
    if parts.cfg.rotary_dim != parts.cfg.head_dim:  # transformers' MiniMax rotates whole heads
        rope_note = f"rotary_dim {parts.cfg.rotary_dim} -> head_dim {parts.cfg.head_dim} on both sides"
        parts = parts._replace(cfg=dataclasses.replace(parts.cfg, rotary_dim=parts.cfg.head_dim))
    cfg, tok, reward_fn, sp = parts.cfg, parts.tokenizer, parts.reward_fn, parts.sampling
    trainer, tx = loop.make_trainer(c, cfg, mesh)
    state = loop.initial_state(trainer, tx, c.seed, parts.init_params)
    ref_params = jax.tree.map(lambda x: x.copy(), state["params"])
    model = torch_twin(cfg, jax.device_get(state["params"]))  # before any update: the same initial weights
    parity = logp_parity(c, parts, trainer, state["params"], model)
    print(f"parity: max |logp diff| {parity['max_abs_logp_diff']:.2e} over {parity['tokens']} tokens")

    m1 = {"times": [], "phases": [], "rows": []}
    box = {"state": state, "step": 0}

    def m1jax_steps(count: int):
        for _ in range(count):
            t0 = time.perf_counter()
            row = loop.rl_step(c, cfg, trainer, tok, reward_fn, sp, box["state"], ref_params, box["step"])
            jax.block_until_ready(row["state"])
            m1["times"].append(time.perf_counter() - t0)
            box["state"] = row.pop("state")
            box["step"] += 1
            keys = ("gen_time_s", "reward_time_s", "logprob_time_s", "update_time_s", "step_time_s")
            m1["phases"].append({k: float(row[k]) for k in keys})
            m1["rows"].append({k: float(row[k]) for k in ("reward", "response_length", "kl", "loss")})

    phases = Phases()
    tr = {"step_times": [], "rollout_times": [], "phases": []}

    class Handover(TrainerCallback):
        """Times TRL's optimizer steps, and runs m1jax's steps at rollout boundaries (not timed for TRL)."""

        def __init__(self):
            self.resumed = None
            self.rollout_start = None

        def on_train_begin(self, args, state, control, **kw):
            self.resumed = self.rollout_start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            tr["step_times"].append(now - self.resumed)
            if state.global_step % r.updates_per_rollout == 0:  # a rollout and its U updates are done
                tr["rollout_times"].append(now - self.rollout_start)
                tr["phases"].append(phases.take())
                done = state.global_step // r.updates_per_rollout
                if done % a.block == 0 or done == rollouts:
                    m1jax_steps(done - box["step"])
                self.rollout_start = time.perf_counter()
            self.resumed = time.perf_counter()

    with tempfile.TemporaryDirectory() as outdir:
        grpo, args = grpo_trainer(c, cfg, model, tok, reward_fn, rollouts, outdir, a.threads)
        phases.wrap(grpo, "_generate", "gen_time_s")
        phases.wrap(grpo, "_calculate_rewards", "reward_time_s")
        phases.wrap(grpo, "_generate_and_score_completions", "score_total_s")
        no_grad = lambda: not torch.is_grad_enabled()  # the old log-probs; the updates' forwards take gradients
        phases.wrap(grpo, "_get_per_token_logps_and_entropies", "logprob_time_s", when=no_grad)
        grpo.add_callback(Handover())
        grpo.train()

    def timed_ix(n: int) -> tuple[list[int], list[int]]:
        """(timed rollout indices, switch indices) of a side's n rollouts."""
        timed, switch = [], []
        for i in range(a.warmup, n):
            (switch if i % a.block == 0 and i >= a.block else timed).append(i)
        return timed, switch

    m_ix, m_sw = timed_ix(len(m1["times"]))
    t_ix, t_sw = timed_ix(len(tr["rollout_times"]))
    m_med = median([m1["times"][i] for i in m_ix])
    t_med = median([tr["rollout_times"][i] for i in t_ix])
    m_phase = {k: median([m1["phases"][i][k] for i in m_ix]) for k in m1["phases"][0]}
    t_phase = {}
    for i in t_ix:
        p = tr["phases"][i]
        p["logprob_advantage_time_s"] = p["score_total_s"] - p.get("gen_time_s", 0.0) - p.get("reward_time_s", 0.0)
        p["update_time_s"] = tr["rollout_times"][i] - p["score_total_s"]
    for k in ("gen_time_s", "reward_time_s", "logprob_time_s", "logprob_advantage_time_s", "update_time_s"):
        t_phase[k] = median([tr["phases"][i].get(k, 0.0) for i in t_ix])
    u = r.updates_per_rollout
    opt_steps = [tr["step_times"][i * u + j] for i in t_ix for j in range(u)]
    rows = r.prompts_per_step * r.samples_per_prompt
    report = {
        "config": a.config,
        "quick": a.quick,
        "model": f"{cfg_name(c)} (lm_head_fp32), fp32, "
        + (f"from {c.rl.init_from}" if c.rl.init_from else f"random init (seed {c.seed})"),
        "shape": {
            "prompts": r.prompts_per_step,
            "samples_per_prompt": r.samples_per_prompt,
            "rows": rows,
            "max_new_tokens": max_new_tokens_at(c, 0),
            "updates_per_rollout": u,
            "rows_per_update": rows // u,
            "temperature": r.sampling.temperature,
            "learning_rate": c.optim.learning_rate,
            "loss": r.loss,
            "kl_coef": r.kl_coef,
        },
        "rope": rope_note or "as configured (rotary_dim == head_dim)",
        "warmup": a.warmup,
        "steps": a.steps,
        "block": a.block,
        "parity": parity,
        "m1jax": {
            "step_s": m_med,
            "phases_s": m_phase,
            "first_step_s": m1["times"][0],
            "times_s": m1["times"],
            "switch_times_s": [m1["times"][i] for i in m_sw],
            "reward_mean_first_last": [m1["rows"][0]["reward"], m1["rows"][-1]["reward"]],
        },
        "trl": {
            "step_s": t_med,
            "optimizer_step_s": median(opt_steps),
            "phases_s": t_phase,
            "first_step_s": tr["rollout_times"][0],
            "times_s": tr["rollout_times"],
            "switch_times_s": [tr["rollout_times"][i] for i in t_sw],
            "optimizer_step_times_s": tr["step_times"],
            "optim": str(args.optim),
        },
        "ratio": t_med / m_med,
        "env": env() | {"trl": trl.__version__, "torch_threads": torch.get_num_threads()},
        "loadavg_start_end": [load_start, os.getloadavg()],
    }
    print(
        f"m1jax {m_med:.3f} s/step (gen {m_phase['gen_time_s']:.3f}, reward {m_phase['reward_time_s']:.3f}, "
        f"logprob {m_phase['logprob_time_s']:.3f}, update {m_phase['update_time_s']:.3f}); "
        f"TRL {t_med:.3f} s/step ({median(opt_steps):.3f} s per optimizer step); TRL / m1jax = {report['ratio']:.2f}"
    )
    write_report(report, a.out)


if __name__ == "__main__":
    host.reexec_with_hugepages()  # first: glibc reads its tunables at start-up
    main()
