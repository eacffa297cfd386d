"""Data: corpora, tokenizers and the grain pipeline of packed, shuffled, host-sharded sequences.

The chain is plain functions on plain data:

    load_corpus(DataConfig) -> Corpus (documents per split, or token arrays for `tokens`)
    load_tokenizer(spec)    -> Tokenizer (bytes, or an HF `tokenizers` tokenizer.json)
    tokenize_split(docs, tokenizer) -> TokenizedSplit (one flat int32 stream, EOD after each doc)
    make_train_iterator(split, ...) -> grain DatasetIterator of {"inputs", "targets"} batches
    make_eval_batches(split, ...)   -> list of {"inputs", "targets", "target_bytes"} batches

Splits are deterministic: the same config gives the same documents, the same tokens and the same
batches on every machine, and the iterator position is saved with the checkpoint (`get_state`,
or orbax through `iterator_checkpoint_args`), so a resumed run reads exactly what it would have.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import grain
import numpy as np

from bitnet_jax.config import DataConfig
from bitnet_jax.errors import ConfigError, require

# ----------------------------------------------------------------------------------------------
# Corpora.

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKEN_SUFFIXES = (".npy", ".bin")
# `.bin` token files are raw little-endian uint16, the layout of nanoGPT's `prepare.py` (so its
# files load as they are); vocabularies above 65536 ids need `.npy`, which records its dtype.
BIN_DTYPE = np.dtype("<u2")

# Directories of the standard library left out of the built-in corpus: other people's packages,
# test suites (huge, full of deliberately odd code and non-UTF-8 files), bundled apps and demos,
# and generated tables (encodings' codec maps, pydoc's topic dump) that are data, not code.
BUILTIN_EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "idlelib",
    "lib2to3", "turtledemo", "ensurepip", "encodings", "pydoc_data",
})


@dataclass
class Corpus:
    """Documents of a train and a validation split, plus what run summaries report about them.

    For `source: tokens` the text lists are empty and `train_tokens` / `validation_tokens` hold the
    pre-tokenized streams instead.
    """

    name: str
    train: list[str]
    validation: list[str]
    stats: dict
    train_tokens: Optional[np.ndarray] = None
    validation_tokens: Optional[np.ndarray] = None

    @property
    def is_tokenized(self) -> bool:
        return self.train_tokens is not None


def _unit_hash(key: str, salt: str = "") -> float:
    """A stable number in [0, 1) for `key` (Python's `hash` is salted per process, so no)."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little") / 2.0**64


def validation_mask(keys: Sequence[str], fraction: float) -> np.ndarray:
    """Which items go to validation: the `round(fraction * n)` (at least 1 if fraction > 0) with
    the smallest hash of their key, plus any duplicates of those keys.

    Ranking by a hash of the key (a relative path, a document's text) rather than by position keeps
    the split stable: adding an item moves at most one other item across splits. Identical keys
    share a hash, so identical documents land in the same split and cannot leak into validation.
    """
    mask = np.zeros(len(keys), dtype=bool)
    if fraction <= 0 or not keys:
        return mask
    count = min(len(keys), max(1, int(round(fraction * len(keys)))))
    scores = np.array([_unit_hash(k, "split") for k in keys])
    return scores <= np.sort(scores)[count - 1]


def _split_stats(docs: Sequence[str]) -> dict:
    return {"documents": len(docs), "bytes": sum(len(d.encode("utf-8")) for d in docs)}


def _split_documents(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    mask = validation_mask(docs, fraction)
    train = [d for d, v in zip(docs, mask) if not v]
    validation = [d for d, v in zip(docs, mask) if v]
    return train, validation


def builtin_corpus_files() -> list[Path]:
    """The running interpreter's non-empty standard-library `.py` files, sorted by relative path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    # os.walk rather than Path.rglob: pruning excluded directories in place skips site-packages,
    # which can be far larger than the standard library itself.
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in BUILTIN_EXCLUDED_DIRS]
        files.extend(Path(directory) / n for n in names if n.endswith(".py"))
    # Empty files (many `__init__.py`) would be empty documents: left out, so files == documents.
    files = [p for p in files if p.is_file() and p.stat().st_size > 0]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _load_builtin(cfg: DataConfig) -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = builtin_corpus_files()
    require(bool(files), f"data.source='builtin': no .py files found under {str(root)!r}; "
                         "use data.source=files with data.paths")
    keys = [p.relative_to(root).as_posix() for p in files]
    if cfg.max_documents is not None:
        # A hash-ranked subset spreads over the whole library (sorted order would take only
        # `__future__`, `_collections_abc`, `asyncio`, ...) and is stable as files are added.
        order = np.argsort([_unit_hash(k, "subset") for k in keys], kind="stable")
        keep = sorted(order[: max(0, cfg.max_documents)].tolist())
        files, keys = [files[i] for i in keep], [keys[i] for i in keep]
    # Stdlib sources are UTF-8 (PEP 3120); `replace` only guards against a patched install.
    docs = [p.read_bytes().decode("utf-8", errors="replace") for p in files]
    mask = validation_mask(keys, cfg.validation_fraction)
    train = [d for d, v in zip(docs, mask) if not v]
    validation = [d for d, v in zip(docs, mask) if v]
    _require_documents(train, validation, "data.source='builtin'")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stats = {"root": str(root),
             "train": {**_split_stats(train), "files": int((~mask).sum())},
             "validation": {**_split_stats(validation), "files": int(mask.sum())}}
    return Corpus(f"builtin:python{version}-stdlib", train, validation, stats)


def resolve_paths(patterns: Sequence[str], suffixes: Sequence[str], field_name: str) -> list[Path]:
    """Expand files, directories (searched recursively for `suffixes`) and globs, in order.

    Every entry must match something: a typo should fail here, not train on less data.
    """
    require(bool(patterns), f"{field_name} is empty; list files, directories or globs")
    found: list[Path] = []
    for pattern in patterns:
        pattern = str(Path(pattern).expanduser())
        if glob.has_magic(pattern):
            matches = [Path(m) for m in sorted(glob.glob(pattern, recursive=True))]
            matches = [m for m in matches if m.is_file()]
            require(bool(matches), f"{field_name}: the glob {pattern!r} matches no files; "
                                   "check the path (relative paths start at the working directory)")
        elif Path(pattern).is_dir():
            matches = sorted(p for p in Path(pattern).rglob("*")
                             if p.is_file() and p.suffix in suffixes)
            require(bool(matches), f"{field_name}: the directory {pattern!r} holds no "
                                   f"{'/'.join(suffixes)} files")
        else:
            require(Path(pattern).is_file(), f"{field_name}: {pattern!r} does not exist; "
                                             "check the path or use a glob such as 'data/*.jsonl'")
            matches = [Path(pattern)]
        for path in matches:
            require(path.suffix in suffixes,
                    f"{field_name}: {str(path)!r} has an unsupported suffix {path.suffix!r}; "
                    f"supported: {', '.join(suffixes)}")
        found.extend(m for m in matches if m not in found)
    return found


def _read_jsonl(path: Path, text_field: str, limit: Optional[int]) -> list[str]:
    docs: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if limit is not None and len(docs) >= limit:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{number}: not valid JSON ({error})") from None
            require(isinstance(record, dict) and text_field in record,
                    f"{path}:{number}: no field data.text_field={text_field!r}; the record has "
                    f"{sorted(record) if isinstance(record, dict) else type(record).__name__}; "
                    "set data.text_field")
            text = record[text_field]
            require(isinstance(text, str) or text is None,
                    f"{path}:{number}: field {text_field!r} holds {type(text).__name__}, not text")
            if text:
                docs.append(text)
    return docs


def _read_parquet(path: Path, text_field: str, limit: Optional[int]) -> list[str]:
    import pyarrow.parquet as pq

    columns = pq.read_schema(path).names
    require(text_field in columns, f"{path}: no column data.text_field={text_field!r}; "
                                   f"columns: {', '.join(columns)}; set data.text_field")
    # Reading only the text column keeps other (possibly huge) columns off memory.
    column = pq.read_table(path, columns=[text_field]).column(text_field)
    if limit is not None:
        column = column.slice(0, limit)
    texts = column.to_pylist()
    require(all(t is None or isinstance(t, str) for t in texts),
            f"{path}: column {text_field!r} is {column.type}, not text")
    return [t for t in texts if t]


def _read_text_file(path: Path, text_field: str, limit: Optional[int]) -> list[str]:
    if path.suffix == ".txt":
        text = path.read_bytes().decode("utf-8", errors="replace")
        return [text] if text and limit != 0 else []
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field, limit)
    return _read_parquet(path, text_field, limit)


def _require_documents(train: list, validation: list, what: str) -> None:
    require(bool(train) or bool(validation), f"{what}: the corpus is empty (no non-empty "
                                             "documents); check data.paths and data.text_field")
    require(bool(train), f"{what}: every document went to validation; lower "
                         "data.validation_fraction or add documents")


def _load_files(cfg: DataConfig) -> Corpus:
    paths = resolve_paths(cfg.paths, TEXT_SUFFIXES, "data.paths")
    docs: list[str] = []
    for path in paths:
        limit = None if cfg.max_documents is None else cfg.max_documents - len(docs)
        if limit is not None and limit <= 0:
            break
        docs.extend(_read_text_file(path, cfg.text_field, limit))
    require(bool(docs), f"data.paths={cfg.paths!r}: the corpus is empty (no non-empty documents "
                        f"in {len(paths)} file(s)); check the files and data.text_field")
    train, validation = _split_documents(docs, cfg.validation_fraction)
    _require_documents(train, validation, f"data.paths={cfg.paths!r}")
    stats = {"files": len(paths), "train": _split_stats(train),
             "validation": _split_stats(validation)}
    name = f"files:{paths[0].name}" + (f"+{len(paths) - 1}" if len(paths) > 1 else "")
    return Corpus(name, train, validation, stats)


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / name).is_file()
                                 for name in ("state.json", "dataset_dict.json"))


def _load_hf_dataset(cfg: DataConfig):
    try:
        import datasets  # lazily: heavy, and only this source needs it
    except ImportError:
        raise ConfigError("data.source='hf' needs the `datasets` package: pip install datasets"
                          ) from None
    path = Path(str(cfg.hf_path)).expanduser()
    try:
        if _is_saved_dataset(path):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                require(cfg.hf_split in loaded, f"data.hf_split={cfg.hf_split!r} is not in "
                                                f"{str(path)!r}; splits: {', '.join(loaded)}")
                loaded = loaded[cfg.hf_split]
            return loaded
        return datasets.load_dataset(cfg.hf_path, cfg.hf_name, split=cfg.hf_split)
    except ConfigError:
        raise
    except Exception as error:  # network, missing dataset, bad split: one message for people
        raise ConfigError(f"data.hf_path={cfg.hf_path!r} (hf_name={cfg.hf_name!r}, "
                          f"hf_split={cfg.hf_split!r}) cannot be loaded: "
                          f"{type(error).__name__}: {error}") from None


def _load_hf(cfg: DataConfig) -> Corpus:
    require(cfg.hf_path is not None, "data.source='hf' needs data.hf_path")
    dataset = _load_hf_dataset(cfg)
    require(cfg.text_field in dataset.column_names,
            f"data.hf_path={cfg.hf_path!r}: no column data.text_field={cfg.text_field!r}; "
            f"columns: {', '.join(dataset.column_names)}; set data.text_field")
    if cfg.max_documents is not None:
        dataset = dataset.select(range(min(len(dataset), max(0, cfg.max_documents))))
    texts = dataset[cfg.text_field]
    require(all(t is None or isinstance(t, str) for t in texts),
            f"data.hf_path={cfg.hf_path!r}: column {cfg.text_field!r} does not hold text")
    docs = [t for t in texts if t]
    require(bool(docs), f"data.hf_path={cfg.hf_path!r}: the corpus is empty (no non-empty "
                        f"{cfg.text_field!r} values)")
    train, validation = _split_documents(docs, cfg.validation_fraction)
    _require_documents(train, validation, f"data.hf_path={cfg.hf_path!r}")
    stats = {"train": _split_stats(train), "validation": _split_stats(validation)}
    name = f"hf:{cfg.hf_path}" + (f"/{cfg.hf_name}" if cfg.hf_name else "") + f":{cfg.hf_split}"
    return Corpus(name, train, validation, stats)


def read_token_file(path: Path) -> np.ndarray:
    """A 1-D integer `.npy` array, or a `.bin` of raw little-endian uint16 (nanoGPT's layout)."""
    if path.suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        require(array.ndim == 1 and np.issubdtype(array.dtype, np.integer),
                f"{path}: expected a 1-D integer array, got shape {array.shape} {array.dtype}")
    else:
        require(path.stat().st_size % BIN_DTYPE.itemsize == 0,
                f"{path}: {path.stat().st_size} bytes is not a whole number of uint16 tokens; "
                ".bin token files are raw little-endian uint16 (use .npy for other dtypes)")
        array = np.fromfile(path, dtype=BIN_DTYPE)
    require(array.size == 0 or int(array.min()) >= 0, f"{path}: negative token ids")
    require(array.size == 0 or int(array.max()) < 2**31, f"{path}: token ids beyond int32")
    return np.asarray(array, dtype=np.int32)


def _load_tokens(cfg: DataConfig) -> Corpus:
    paths = resolve_paths(cfg.paths, TOKEN_SUFFIXES, "data.paths")
    # Files are concatenated in order; each is expected to end with the end-of-document id, as
    # nanoGPT-style preparation scripts write it after every document.
    tokens = np.concatenate([read_token_file(p) for p in paths])
    require(tokens.size > 0, f"data.paths={cfg.paths!r}: the token files are empty")
    # The last fraction of tokens is validation (cut at a token, not a document boundary:
    # the tokenizer, and so the end-of-document id, is not known here).
    cut = tokens.size - int(round(cfg.validation_fraction * tokens.size))
    if cfg.validation_fraction > 0:
        cut = min(cut, tokens.size - 1)
    require(cut > 0, f"data.validation_fraction={cfg.validation_fraction} leaves no training "
                     "tokens; lower it")
    train, validation = tokens[:cut], tokens[cut:]
    stats = {"files": len(paths), "train": {"tokens": int(train.size)},
             "validation": {"tokens": int(validation.size)}}
    name = f"tokens:{paths[0].name}" + (f"+{len(paths) - 1}" if len(paths) > 1 else "")
    return Corpus(name, [], [], stats, train_tokens=train, validation_tokens=validation)


_LOADERS = {"builtin": _load_builtin, "files": _load_files, "hf": _load_hf, "tokens": _load_tokens}


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the corpus `cfg.source` names and split it into train and validation."""
    require(cfg.source in _LOADERS, f"data.source={cfg.source!r} is unknown; choose one of "
                                    f"{', '.join(_LOADERS)}")
    require(0.0 <= cfg.validation_fraction < 1.0, f"data.validation_fraction must be in [0, 1), "
                                                  f"got {cfg.validation_fraction}")
    require(cfg.max_documents is None or cfg.max_documents > 0,
            f"data.max_documents must be positive or null, got {cfg.max_documents}")
    return _LOADERS[cfg.source](cfg)


# ----------------------------------------------------------------------------------------------
# Tokenizers.

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
        path = path / "tokenizer.json"
    require(path.is_file(), f"data.tokenizer={spec!r}: no such file; use 'bytes' or the path of "
                            "a tokenizer.json (train one with `bitnet tokenizer train`)")
    return HFTokenizer(path)


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
        out = out / "tokenizer.json"
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


# ----------------------------------------------------------------------------------------------
# Tokenized splits.

@dataclass
class TokenizedSplit:
    """One split as a flat stream: every document followed by the end-of-document id.

    `token_bytes[i]` is the number of UTF-8 bytes `tokens[i]` stands for (0 for EOD), so
    bits per byte = sum(nll) / ln 2 / sum(bytes of the target tokens), exactly.
    """

    tokens: np.ndarray
    token_bytes: np.ndarray
    documents: int

    @property
    def max_token_id(self) -> int:
        """The largest id in the stream (-1 if empty): must be below the model's vocabulary."""
        return int(self.tokens.max()) if self.tokens.size else -1

    @property
    def bytes(self) -> int:
        return int(self.token_bytes.sum())

    def __len__(self) -> int:
        return int(self.tokens.size)


def tokenize_split(docs: Sequence[str], tokenizer: Tokenizer) -> TokenizedSplit:
    """Tokenize documents and join them with the EOD id after each one (int32, in memory)."""
    pieces = tokenizer.encode_batch(docs)
    lengths = np.fromiter((p.size for p in pieces), dtype=np.int64, count=len(pieces))
    flat = np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32)
    # One vectorised insert of every EOD instead of a Python loop over documents.
    tokens = np.insert(flat, np.cumsum(lengths), np.int32(tokenizer.eod_id)).astype(np.int32)
    return TokenizedSplit(tokens, tokenizer.token_bytes(tokens).astype(np.int32), len(pieces))


def split_from_tokens(tokens: np.ndarray, tokenizer: Tokenizer) -> TokenizedSplit:
    """A pre-tokenized stream as a TokenizedSplit; documents = the number of EOD ids."""
    tokens = np.asarray(tokens, dtype=np.int32)
    require(tokens.size == 0 or int(tokens.max()) < tokenizer.vocab_size,
            f"the token files hold id {int(tokens.max()) if tokens.size else -1}, beyond "
            f"data.tokenizer={tokenizer.name!r} (vocab_size {tokenizer.vocab_size}); set "
            "data.tokenizer to the tokenizer that made them")
    return TokenizedSplit(tokens, tokenizer.token_bytes(tokens).astype(np.int32),
                          int(np.count_nonzero(tokens == tokenizer.eod_id)))


def prepare_data(cfg: DataConfig, tokenizer: Tokenizer
                 ) -> tuple[TokenizedSplit, TokenizedSplit, dict]:
    """Corpus -> tokenized (train, validation) and the stats a run summary reports."""
    corpus = load_corpus(cfg)
    if corpus.is_tokenized:
        train = split_from_tokens(corpus.train_tokens, tokenizer)
        validation = split_from_tokens(corpus.validation_tokens, tokenizer)
    else:
        train = tokenize_split(corpus.train, tokenizer)
        validation = tokenize_split(corpus.validation, tokenizer)
    stats: dict = {"corpus": corpus.name, "tokenizer": tokenizer.name,
                   "vocab_size": tokenizer.vocab_size,
                   **{k: v for k, v in corpus.stats.items() if k not in ("train", "validation")}}
    for name, split in (("train", train), ("validation", validation)):
        stats[name] = {**corpus.stats.get(name, {}), "documents": split.documents,
                       "tokens": len(split), "token_bytes": split.bytes}
    return train, validation, stats


# ----------------------------------------------------------------------------------------------
# Packed sequences with grain.

def num_windows(num_tokens: int, seq_len: int) -> int:
    """Non-overlapping windows of seq_len + 1 tokens, stepping by seq_len (they share one token:
    the last target of a window is the first input of the next)."""
    return max(0, (num_tokens - 1) // seq_len)


def _windows(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """(B, seq_len + 1) token windows, gathered with one fancy index."""
    index = np.asarray(window_ids, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len + 1)
    return tokens[index]


@dataclass
class _HostBatch:
    """Global batch of window ids -> this host's rows of inputs and targets.

    A class rather than a closure so that grain's worker processes can pickle it.
    """

    tokens: np.ndarray
    seq_len: int
    start: int
    stop: int

    def __call__(self, global_ids: np.ndarray) -> dict[str, np.ndarray]:
        window = _windows(self.tokens, global_ids[self.start:self.stop], self.seq_len)
        return {"inputs": window[:, :-1], "targets": window[:, 1:]}


def shuffle_seed(seed: int) -> int:
    """The grain shuffle seed for data.seed.

    Grain shuffles epoch e with seed + e, so adjacent data seeds would replay each other's epochs
    one epoch apart; hashing the seed first makes runs with different seeds independent.
    """
    return int(_unit_hash(str(seed), "shuffle") * 2**32)


def make_train_dataset(tokens: TokenizedSplit, seq_len: int, batch_size: int, seed: int,
                       process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """The endless grain MapDataset of this host's training batches (see make_train_iterator)."""
    require(seq_len > 0 and batch_size > 0,
            f"data.seq_len={seq_len} and the batch size={batch_size} must be positive")
    require(0 <= process_index < process_count,
            f"process_index={process_index} must be in [0, process_count={process_count})")
    global_batch = batch_size * process_count
    windows = num_windows(len(tokens), seq_len)
    require(windows >= global_batch,
            f"the train split has {len(tokens)} tokens = {windows} windows of data.seq_len="
            f"{seq_len}, fewer than one global batch of {global_batch} sequences; use more data "
            "or lower data.seq_len / train.batch_size")
    return (grain.MapDataset.range(windows)
            .shuffle(seed=shuffle_seed(seed))
            # Every host builds the same global batch of window ids and keeps its own rows.
            .batch(global_batch, drop_remainder=True)
            .repeat()
            .map(_HostBatch(tokens.tokens, seq_len, process_index * batch_size,
                            (process_index + 1) * batch_size)))


def make_train_iterator(tokens: TokenizedSplit, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1, num_workers: int = 0
                        ) -> grain.DatasetIterator:
    """An endless grain iterator of {"inputs", "targets"}: int32 (batch_size, seq_len) batches.

    - Windows: non-overlapping seq_len + 1 tokens stepping by seq_len; targets are inputs shifted
      by one. Windows cross document boundaries (the EOD id separates documents).
    - Epochs: windows are shuffled by grain (`MapDataset.shuffle`, a random permutation of all
      windows) and cut into global batches of batch_size * process_count with drop_remainder, so
      an epoch skips its last `windows % global_batch` windows; `repeat()` then runs forever and
      grain reshuffles every epoch (a different permutation, so different windows are skipped).
    - Hosts: `batch_size` is per host. Host h yields rows h*B .. (h+1)*B of every global batch,
      so the hosts' batches, stacked in process order, are the single-host global batch.
    - State: `get_state()` / `set_state()` (a small JSON-able dict) resume exactly; save it with
      orbax through `iterator_checkpoint_args`.
    - num_workers > 0 prefetches in grain worker processes (`mp_prefetch`): the same batches as
      with 0, but a state has another layout, so resume with the num_workers it was saved with.
      Close such an iterator (`iterator.close()`) to stop its workers.
    """
    dataset = make_train_dataset(tokens, seq_len, batch_size, seed, process_index, process_count)
    # In-memory data: no reader threads (grain's advice: they only contend for the GIL).
    iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                             prefetch_buffer_size=0))
    require(num_workers >= 0, f"data.num_workers must be >= 0, got {num_workers}")
    if num_workers > 0:
        _mark_absl_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers))
    return iter(iter_dataset)


def _mark_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags, which must count as parsed in the main process
    (a program that does not run `absl.app` never parses them)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def iterator_checkpoint_args(iterator: grain.DatasetIterator, save: bool):
    """The orbax args that save (save=True) or restore into (save=False) a grain iterator.

    Use it as one item of a Composite checkpoint:
        manager.save(step, args=ocp.args.Composite(
            state=..., data=iterator_checkpoint_args(iterator, save=True)))
        manager.restore(step, args=ocp.args.Composite(
            state=..., data=iterator_checkpoint_args(iterator, save=False)))
    Restoring sets the iterator's state in place (and returns it). Grain's handler writes one JSON
    file per process (`process_{i}-of-{n}.json`, from jax.process_index()), so every host saves
    and restores its own position.
    """
    return (grain.checkpoint.CheckpointSave(iterator) if save
            else grain.checkpoint.CheckpointRestore(iterator))


# ----------------------------------------------------------------------------------------------
# Evaluation batches.

def make_eval_batches(tokens: TokenizedSplit, seq_len: int, batch_size: int,
                      max_batches: int) -> list[dict[str, np.ndarray]]:
    """Up to `max_batches` batches of consecutive windows from the start of the split.

    Each batch: "inputs", "targets" and "target_bytes" (UTF-8 bytes of each target token), all
    int32 (batch_size, seq_len), so bits per byte = sum(nll) / ln 2 / sum(target_bytes) exactly.
    The same split and shapes give the same batches in every run.
    """
    windows = num_windows(len(tokens), seq_len)
    count = min(max_batches, windows // batch_size)
    require(count > 0,
            f"the validation split has {len(tokens)} tokens; one eval batch of {batch_size} "
            f"sequences of data.seq_len={seq_len} needs {batch_size * seq_len + 1}; lower "
            "data.seq_len or the batch size, or raise data.validation_fraction")
    batches = []
    for b in range(count):
        ids = np.arange(b * batch_size, (b + 1) * batch_size)
        window = _windows(tokens.tokens, ids, seq_len)
        target_bytes = _windows(tokens.token_bytes, ids, seq_len)[:, 1:]
        batches.append({"inputs": window[:, :-1], "targets": window[:, 1:],
                        "target_bytes": target_bytes.astype(np.int32)})
    return batches
