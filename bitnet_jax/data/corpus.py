"""Corpora: the documents of a train and a validation split, read from the source a config names.

    load_corpus(DataConfig) -> Corpus (documents per split, or token arrays for `tokens`)

Sources: the running Python's standard library (`builtin`), text files (.txt / .jsonl /
.parquet), a Hugging Face dataset, or pre-tokenized files (.npy / .bin). Splits are
deterministic: documents go to validation by a hash of their key, so the same config gives the
same documents on every machine.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from bitnet_jax.config import DataConfig
from bitnet_jax import files
from bitnet_jax.errors import ConfigError, require

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


def unit_hash(key: str, salt: str = "") -> float:
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
    scores = np.array([unit_hash(k, "split") for k in keys])
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
        order = np.argsort([unit_hash(k, "subset") for k in keys], kind="stable")
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
    try:  # streamed (corpora can be large), each line decoded on its own to name it if bad
        handle = path.open("rb")
    except OSError as error:
        raise ConfigError(f"data file {files.os_error_line(path, error)}") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if limit is not None and len(docs) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(f"data file {path}:{number}: not UTF-8 text; convert the file "
                                  f"to UTF-8 (or check that it is JSONL)") from None
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

    columns = files.read_with(path, lambda name: pq.read_schema(name).names, "data file",
                              "check that it is a Parquet file")
    require(text_field in columns, f"{path}: no column data.text_field={text_field!r}; "
                                   f"columns: {', '.join(columns)}; set data.text_field")
    # Reading only the text column keeps other (possibly huge) columns off memory.
    column = files.read_with(path, lambda name: pq.read_table(name, columns=[text_field]),
                             "data file", "check that it is a Parquet file").column(text_field)
    if limit is not None:
        column = column.slice(0, limit)
    texts = column.to_pylist()
    require(all(t is None or isinstance(t, str) for t in texts),
            f"{path}: column {text_field!r} is {column.type}, not text")
    return [t for t in texts if t]


def _read_text_file(path: Path, text_field: str, limit: Optional[int]) -> list[str]:
    if path.suffix == ".txt":
        # Binary files (an executable renamed .txt) and other encodings are refused, naming
        # the file and line, rather than trained on as replacement characters.
        text = files.read_text(path, "data file")
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

