"""Tokenize a text corpus once into memory-mapped token shards for pretraining.

    python -m experiments.prepare_data --input 'data/*.jsonl,more/*.parquet' --output corpora/web \
        [--tokenizer byte|PATH/tokenizer.json] [--text_field text] [--shard_rows 100000] [--num_proc 8]

Then train on it with `--config.data.source=corpora/web` (and the same `--config.data.tokenizer`).
Inputs are text / jsonl / parquet files read through `datasets`; each shard of `--shard_rows` input
rows is tokenized in `--num_proc` processes and written as `shard-NNNNN.{tokens,offsets}.npy` plus a
record, then `manifest.json` (format: `m1jax.data.prepared`). Re-running a killed prepare resumes at
its first unfinished shard; re-running a finished one does nothing. A bad input (an empty glob, an
unknown file kind, a missing text field) is one `error:` line, exit 1.
"""

from __future__ import annotations

import os

from absl import app, flags

from experiments import cli

_INPUT = flags.DEFINE_string("input", None, "comma-separated file globs (txt, jsonl, json, parquet)", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "directory of the prepared corpus", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", "byte", "'byte' or a tokenizers JSON file (as data.tokenizer)")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "the column holding the text (jsonl / parquet)")
_SHARD_ROWS = flags.DEFINE_integer("shard_rows", 100_000, "input rows per shard")
_NUM_PROC = flags.DEFINE_integer("num_proc", os.cpu_count() or 1, "tokenizer processes")
_PROGRESS = flags.DEFINE_bool("progress", True, "show progress bars")


def main(argv) -> None:
    del argv
    from m1jax.data.prepare import prepare

    with cli.main_errors():
        manifest = prepare(
            _INPUT.value,
            _OUTPUT.value,
            _TOKENIZER.value,
            text_field=_TEXT_FIELD.value,
            shard_rows=_SHARD_ROWS.value,
            num_proc=_NUM_PROC.value,
            progress=_PROGRESS.value,
        )
    print(
        f"{_OUTPUT.value}: {manifest['docs']:,} documents, {manifest['tokens']:,} tokens "
        f"in {len(manifest['shards'])} shard(s)"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
