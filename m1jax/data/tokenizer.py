"""Tokenizers with one small interface: a dependency-free byte tokenizer and a `tokenizers` JSON wrapper.

Both expose `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `encode(text, bos=, eos=, special=)`,
`decode(ids, skip_special=)` and `token_to_id(s)`. Special strings written literally in the text (e.g.
"<think>") encode to their single id, unless `special=False` (text from outside the model, such as a
tool's output, must not smuggle control tokens in).

Tool use (`rl.tools`) needs four more specials, TOOL_SPECIALS. `load_tokenizer("byte+tools")` is the
byte tokenizer with them appended after the bytes (ids 261..264, vocab 265), so every other id keeps
its meaning and the plain "byte" tokenizer, its checkpoints and prepared corpora are unchanged. An
HF tokenizer has them when its vocabulary holds the four strings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

SPECIALS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>")
TOOL_SPECIALS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
_BYTE_OFFSET = len(SPECIALS)


def _special_re(names) -> re.Pattern:
    return re.compile("(" + "|".join(re.escape(s) for s in sorted(names, key=len, reverse=True)) + ")")


# Common spellings of special tokens in published tokenizers, most specific first.
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>")
_BOS_NAMES = ("<bos>", "<s>", "<|begin_of_text|>", "<|startoftext|>", "<|bos|>")
_EOS_NAMES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<|eos|>")


class ByteTokenizer:
    """UTF-8 bytes plus five special tokens: ids 0..4 are SPECIALS, byte b is id 5 + b; with
    `tools=True` also TOOL_SPECIALS at ids 261..264."""

    def __init__(self, tools: bool = False) -> None:
        self.tools = tools
        self.specials = SPECIALS + (TOOL_SPECIALS if tools else ())
        self._special_ids = {s: i for i, s in enumerate(SPECIALS)}
        if tools:
            self._special_ids |= {s: _BYTE_OFFSET + 256 + i for i, s in enumerate(TOOL_SPECIALS)}
        self._names = {i: s for s, i in self._special_ids.items()}
        self._re = _special_re(self._special_ids)
        self.vocab_size = _BYTE_OFFSET + 256 + (len(TOOL_SPECIALS) if tools else 0)
        self.pad_id = self._special_ids["<pad>"]
        self.bos_id = self._special_ids["<bos>"]
        self.eos_id = self._special_ids["<eos>"]
        self.think_id = self._special_ids["<think>"]
        self.end_think_id = self._special_ids["</think>"]

    def __repr__(self) -> str:  # stable: callers key caches on it
        return "ByteTokenizer(tools=True)" if self.tools else "ByteTokenizer()"

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, special: bool = True) -> list[int]:
        ids = [self.bos_id] if bos else []
        for piece in self._re.split(text) if special else [text]:  # odd pieces are the special strings
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            else:
                ids.extend(_BYTE_OFFSET + b for b in piece.encode("utf-8"))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text for `ids`; pad is always dropped, invalid UTF-8 and unknown ids become U+FFFD."""
        out: list[str] = []
        buf = bytearray()
        for i in (int(i) for i in ids):
            if _BYTE_OFFSET <= i < _BYTE_OFFSET + 256:
                buf.append(i - _BYTE_OFFSET)
                continue
            # Flush bytes before a special so a split multi-byte char is replaced, not glued across it.
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if i == self.pad_id:
                continue
            if i in self._names:
                if not skip_special:
                    out.append(self._names[i])
            else:  # e.g. a sampled id from a model vocab padded past 261
                out.append("\ufffd")
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_to_id(self, s: str) -> int | None:
        """Id of a special string or of a single one-byte character; None otherwise."""
        if s in self._special_ids:
            return self._special_ids[s]
        b = s.encode("utf-8")
        return _BYTE_OFFSET + b[0] if len(b) == 1 else None


class HFTokenizer:
    """A `tokenizers.Tokenizer` JSON file behind the ByteTokenizer interface."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        pad_token: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        try:
            import tokenizers
        except ImportError as e:  # optional dependency, only needed for HF tokenizer files
            raise ImportError("HFTokenizer needs the `tokenizers` package: pip install tokenizers") from e
        self.path = os.fspath(path)
        self._tok = tokenizers.Tokenizer.from_file(self.path)
        self.eos_id = self._find("eos", eos_token, _EOS_NAMES)
        if self.eos_id is None:
            raise ValueError(f"{self.path}: no eos token found (tried {_EOS_NAMES}); pass eos_token=")
        bos_id = self._find("bos", bos_token, _BOS_NAMES)
        pad_id = self._find("pad", pad_token, _PAD_NAMES)
        # GPT-2 style vocabularies have a single <|endoftext|> that serves as every special.
        self.bos_id = self.eos_id if bos_id is None else bos_id
        self.pad_id = self.eos_id if pad_id is None else pad_id
        added = self._tok.get_added_tokens_decoder().values()
        self._added = sorted((t.content for t in added if t.special and len(t.content) > 1), key=len)

    def __repr__(self) -> str:  # stable: callers key caches on it
        return f"HFTokenizer({self.path!r}, pad_id={self.pad_id}, bos_id={self.bos_id}, eos_id={self.eos_id})"

    def _find(self, role: str, override: str | None, names: tuple[str, ...]) -> int | None:
        if override is not None:
            i = self._tok.token_to_id(override)
            if i is None:
                raise ValueError(f"{self.path}: {role}_token {override!r} is not in the vocabulary")
            return i
        for name in names:
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, special: bool = True) -> list[int]:
        if not special:  # special tokens always match whole: a zero-width space inside breaks each one up
            for s in self._added:
                text = text.replace(s, s[0] + "\u200b" + s[1:])
        # add_special_tokens=False: bos/eos are ours to place, not the file's post-processor template.
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        kept = [int(i) for i in ids if int(i) != self.pad_id]
        return self._tok.decode(kept, skip_special_tokens=skip_special)

    def token_to_id(self, s: str) -> int | None:
        return self._tok.token_to_id(s)


def load_tokenizer(spec: str | os.PathLike | None) -> ByteTokenizer | HFTokenizer:
    """None or "byte" -> ByteTokenizer; "byte+tools" -> ByteTokenizer(tools=True); a tokenizer .json file
    (or a folder holding tokenizer.json) -> HFTokenizer."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    if spec == "byte+tools":
        return ByteTokenizer(tools=True)
    path = os.fspath(spec)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        return HFTokenizer(os.path.join(path, "tokenizer.json"))
    if path.endswith(".json"):
        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file not found: {path}")
        return HFTokenizer(path)
    raise ValueError(
        f"unknown tokenizer spec {path!r}: use None, 'byte', 'byte+tools', or a path to a tokenizers .json file"
    )
