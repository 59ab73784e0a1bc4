"""Needle-in-a-haystack retrieval, generated deterministically: training documents and a scored eval grid.

A document is `<bos>` + a haystack of random lowercase words with a needle `" KEY=1234 "` hidden at
a chosen depth (and optionally distractor needles with other keys) + the query `" ?KEY="` + the
answer `1234` + `<eos>`. Keys are uppercase letters and values digits, neither of which occurs in
the haystack, so the answer can only come from the needle: the model must find `KEY=` earlier in
the context and copy what followed it. With `distractors > 0` it must also match the key.

`document(...)` builds one (its token count is exactly `length`, the needle at `depth`: 0 = the
start of the haystack, 1 = just before the query); `corpus(...)` many with random lengths and depths
(training data for `m1jax.data.pipeline.Packer`, mixed with another corpus by `concat`);
`grid(...)` a padded evaluation batch over lengths x depths, which `m1jax.evals.needle.score`
scores (teacher-forced loss and exact-match accuracy on the answer tokens).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence

import numpy as np

from m1jax.data.pipeline import Corpus

_WORD_CHARS = string.ascii_lowercase
_KEY_CHARS = string.ascii_uppercase
_DIGITS = string.digits


@dataclasses.dataclass(frozen=True)
class Needle:
    """One document: token ids and where its answer lies."""

    tokens: list[int]
    answer_start: int  # index in `tokens` of the first answer token
    answer_len: int
    needle_pos: int  # index in `tokens` of the needle's first character (its leading space)
    key: str
    value: str

    @property
    def text_length(self) -> int:
        return len(self.tokens)


def haystack(rng: np.random.Generator, n: int) -> str:
    """Exactly `n` characters of random lowercase words (2-7 letters) separated by single spaces."""
    out: list[str] = []
    size = -1  # the length of " ".join(out)
    while size < n:
        w = "".join(rng.choice(list(_WORD_CHARS), int(rng.integers(2, 8))))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n]


def _kv(rng: np.random.Generator, key_len: int, value_len: int, avoid: set[str]) -> tuple[str, str]:
    while True:
        key = "".join(rng.choice(list(_KEY_CHARS), key_len))
        if key not in avoid:
            break
    return key, "".join(rng.choice(list(_DIGITS), value_len))


def document(
    tokenizer,
    rng: np.random.Generator,
    length: int,
    depth: float,
    *,
    key_len: int = 3,
    value_len: int = 4,
    distractors: int = 0,
) -> Needle:
    """One needle document of exactly `length` tokens (with `<bos>` and `<eos>`), needle at `depth`.

    `tokenizer` must encode each character as one token (the byte tokenizer does); distractor
    needles (other keys, other values) go at uniformly random positions of the haystack.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1]")
    key, value = _kv(rng, key_len, value_len, set())
    needle, query = f" {key}={value} ", f" ?{key}="
    others = []
    for _ in range(distractors):
        k, v = _kv(rng, key_len, value_len, {key, *(o[0] for o in others)})
        others.append((k, v))
    fixed = 2 + len(needle) + len(query) + value_len + sum(len(f" {k}={v} ") for k, v in others)
    n_hay = length - fixed
    if n_hay < 0:
        raise ValueError(f"length={length} is too short for a needle document (at least {fixed} tokens)")
    hay = haystack(rng, n_hay)
    # Distractors first (random points), then the needle at its depth of the haystack characters.
    pieces = [(int(round(depth * n_hay)), needle, True)]
    pieces += [(int(rng.integers(0, n_hay + 1)), f" {k}={v} ", False) for k, v in others]
    pieces.sort(key=lambda p: (p[0], not p[2]))
    text, cut, needle_char = "", 0, None
    for pos, piece, is_needle in pieces:
        text += hay[cut:pos]
        if is_needle:
            needle_char = len(text)
        text += piece
        cut = pos
    text += hay[cut:] + query
    tokens = tokenizer.encode(text, bos=True) + tokenizer.encode(value) + [tokenizer.eos_id]
    if len(tokens) != length:
        raise ValueError(f"tokenizer {tokenizer!r} does not encode one character as one token")
    return Needle(tokens, length - 1 - value_len, value_len, 1 + needle_char, key, value)


def corpus(
    tokenizer,
    num_docs: int,
    seed: int,
    *,
    min_length: int,
    max_length: int,
    key_len: int = 3,
    value_len: int = 4,
    distractors: int = 0,
) -> Corpus:
    """`num_docs` needle documents, lengths uniform in [min_length, max_length], depths uniform in [0, 1]."""
    if not 0 < min_length <= max_length:
        raise ValueError(f"need 0 < min_length={min_length} <= max_length={max_length}")
    rng = np.random.default_rng([seed, 7])
    docs = [
        document(
            tokenizer,
            rng,
            int(rng.integers(min_length, max_length + 1)),
            float(rng.random()),
            key_len=key_len,
            value_len=value_len,
            distractors=distractors,
        ).tokens
        for _ in range(num_docs)
    ]
    return _corpus(docs)


def _corpus(docs: Sequence[Sequence[int]]) -> Corpus:
    lengths = np.asarray([len(d) for d in docs], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate([np.asarray(d, np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
    return Corpus(tokens, offsets)


def concat(*corpora: Corpus) -> Corpus:
    """The documents of every corpus, in order (a `Packer` with shuffling then mixes them)."""
    return _corpus([c.doc(d) for c in corpora for d in range(len(c))])


def grid(
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    per_cell: int,
    seed: int,
    *,
    seq_len: int | None = None,
    key_len: int = 3,
    value_len: int = 4,
    distractors: int = 0,
) -> dict[str, np.ndarray]:
    """An evaluation batch: `per_cell` documents for each (length, depth), one per row, right-padded.

    Returns tokens / segment_ids [N, seq_len] (segment 1 = the document, 0 = padding), answer_mask
    [N, seq_len] (1.0 at the positions whose *next* token is an answer token: the positions the
    trainer's next-token targets score), and length / depth [N] of each row. seq_len defaults to
    max(lengths).
    """
    seq_len = max(lengths) if seq_len is None else seq_len
    if max(lengths) > seq_len:
        raise ValueError(f"max(lengths)={max(lengths)} exceeds seq_len={seq_len}")
    rng = np.random.default_rng([seed, 11])
    rows = [(n, d) for n in lengths for d in depths for _ in range(per_cell)]
    tokens = np.full((len(rows), seq_len), tokenizer.pad_id, np.int32)
    segs = np.zeros((len(rows), seq_len), np.int32)
    mask = np.zeros((len(rows), seq_len), np.float32)
    for i, (n, d) in enumerate(rows):
        doc = document(tokenizer, rng, n, d, key_len=key_len, value_len=value_len, distractors=distractors)
        tokens[i, :n], segs[i, :n] = doc.tokens, 1
        mask[i, doc.answer_start - 1 : doc.answer_start - 1 + doc.answer_len] = 1.0
    return {
        "tokens": tokens,
        "segment_ids": segs,
        "answer_mask": mask,
        "length": np.asarray([n for n, _ in rows], np.int32),
        "depth": np.asarray([d for _, d in rows], np.float32),
    }
