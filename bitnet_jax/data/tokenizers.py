"""Tokenizers: UTF-8 bytes, or a Hugging Face `tokenizers` tokenizer.json, and BPE training.

    load_tokenizer(spec) -> Tokenizer ("bytes", or the path of a tokenizer.json)
    train_bpe(corpus, vocab_size, out) -> the tokenizer.json written

Every tokenizer knows how many UTF-8 bytes each id stands for, so bits per byte are exact.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from bitnet_jax import files
from bitnet_jax.data.corpus import Corpus
from bitnet_jax.errors import ConfigError, require
from bitnet_jax.run_files import TOKENIZER_FILE

# Special tokens that end a document, in order of preference, for a tokenizer.json.
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
BPE_SPECIAL_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    """What the data pipeline, the trainer and the evaluator need of a tokenizer."""

    name: str
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def token_bytes(self, ids: Sequence[int] | np.ndarray) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and the end-of-document id 256: bits per byte are exact."""

    name = "bytes"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def token_bytes(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return (np.asarray(ids) < 256).astype(np.int32)


_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


def _is_byte_level(tokenizer_json: dict) -> bool:
    """Whether the decoder (possibly inside a Sequence) is ByteLevel."""
    def visit(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(visit(v) for v in node.values())
        if isinstance(node, list):
            return any(visit(v) for v in node)
        return False
    return visit(tokenizer_json.get("decoder"))


def _bytes_per_token(tokenizer, byte_level: bool) -> np.ndarray:
    """UTF-8 bytes each id stands for: 0 for special tokens.

    Byte-level BPE stores each byte as one printable character (GPT-2's byte-to-unicode map), so a
    token's byte count is its character count, not the UTF-8 length of its string ('Ġ' is one
    space byte; 'Ã©' is the two bytes of 'é'). Added non-special tokens are stored as raw text.
    For other tokenizers: a byte-fallback `<0xNN>` is one byte, SentencePiece's '▁' one space.
    """
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    added = tokenizer.get_added_tokens_decoder()
    table = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int32)
    for index in range(table.size):
        token = tokenizer.id_to_token(index)
        if token is None or (index in added and added[index].special):
            continue
        if index in added:
            table[index] = len(added[index].content.encode("utf-8"))
        elif byte_level:
            table[index] = sum(1 if c in alphabet else len(c.encode("utf-8")) for c in token)
        elif _BYTE_FALLBACK.match(token):
            table[index] = 1
        else:
            table[index] = len(token.replace("\u2581", " ").encode("utf-8"))
    return table


class HFTokenizer:
    """An HF `tokenizers` tokenizer.json; EOD is the first of `EOD_TOKENS` it has.

    Documents are encoded without the tokenizer's own special tokens (BOS, ...): packing puts the
    end-of-document id between documents itself. `token_bytes` is exact for byte-level BPE.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        try:
            self._tokenizer = _Tokenizer.from_file(str(self.path))
        except Exception as error:
            raise ConfigError(f"data.tokenizer={str(path)!r} is not a readable tokenizer.json "
                              f"({error}); use 'bytes' or train one with `bitnet tokenizer "
                              "train`") from None
        eod = [t for t in EOD_TOKENS if self._tokenizer.token_to_id(t) is not None]
        require(bool(eod), f"data.tokenizer={str(path)!r} has no end-of-document token; add one "
                           f"of {', '.join(EOD_TOKENS)} as a special token")
        self.eod_id = int(self._tokenizer.token_to_id(eod[0]))
        self.vocab_size = int(self._tokenizer.get_vocab_size(with_added_tokens=True))
        self.name = str(self.path)
        self.byte_level = _is_byte_level(json.loads(self._tokenizer.to_str()))
        self._bytes = _bytes_per_token(self._tokenizer, self.byte_level)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids,
                          dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch runs in parallel in Rust: the built-in corpus takes seconds.
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        return self._bytes[np.asarray(ids, dtype=np.int64)]


def load_tokenizer(spec: str) -> Tokenizer:
    """"bytes", or the path of an HF tokenizer.json (or of a directory holding one)."""
    if spec == "bytes":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / TOKENIZER_FILE
    require(path.is_file(), f"data.tokenizer={spec!r}: no such file; use 'bytes' or the path of "
                            "a tokenizer.json (train one with `bitnet tokenizer train`)")
    # A damaged or foreign file: one line naming it (the tokenizers library raises its own).
    return files.read_with(path, lambda name: HFTokenizer(Path(name)), "tokenizer",
                           "pass a tokenizer.json written by `bitnet tokenizer train` or "
                           "a Hugging Face tokenizer")


def train_bpe(corpus: Corpus, vocab_size: int, out_path: str | Path) -> Path:
    """Train a byte-level BPE (GPT-2 style) on the corpus' train split; save its tokenizer.json.

    `out_path` is the file to write, or a directory to write `tokenizer.json` into. Returns the
    path written. The vocabulary holds the 256 byte symbols and `<|endoftext|>` at least.
    """
    from tokenizers import Tokenizer as _Tokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    require(not corpus.is_tokenized, f"corpus {corpus.name!r} is already tokenized; a tokenizer "
                                     "is trained on text (data.source builtin, files or hf)")
    require(vocab_size >= 257, f"--vocab-size={vocab_size} is too small: a byte-level BPE needs "
                               "256 byte symbols plus <|endoftext|>; use at least 257")
    out = Path(out_path).expanduser()
    if out.is_dir() or not out.suffix:
        out = out / TOKENIZER_FILE
    out.parent.mkdir(parents=True, exist_ok=True)

    tokenizer = _Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BPE_SPECIAL_TOKEN],
        # Every byte is in the vocabulary, whether the corpus has it or not: no unknown tokens.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=sys.stderr.isatty())
    print(f"training a byte-level BPE of {vocab_size} tokens on {len(corpus.train)} documents "
          f"of {corpus.name}", file=sys.stderr)
    tokenizer.train_from_iterator(corpus.train, trainer=trainer, length=len(corpus.train))
    tokenizer.save(str(out))
    print(f"saved {out} ({tokenizer.get_vocab_size()} tokens)", file=sys.stderr)
    return out

