"""The input pipeline: tokenized splits and grain's packed, shuffled, host-sharded batches.

The chain is plain functions on plain data (corpora in `corpus`, tokenizers in `tokenizers`):

    prepare_data(DataConfig, tokenizer) -> TokenizedSplit per split (one flat int32 stream,
                                           EOD after each document) and their stats
    make_train_iterator(split, ...) -> grain DatasetIterator of {"inputs", "targets"} batches
    make_eval_batches(split, ...)   -> list of {"inputs", "targets", "target_bytes"} batches

Batches are deterministic: the same config gives the same tokens and the same batches on every
machine, and the iterator position is saved with the checkpoint (`get_state`, or orbax through
`iterator_checkpoint_args`), so a resumed run reads exactly what it would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import grain
import numpy as np

from bitnet_jax.config import DataConfig
from bitnet_jax.data.corpus import load_corpus, unit_hash
from bitnet_jax.data.tokenizers import Tokenizer
from bitnet_jax.errors import require

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
    return int(unit_hash(str(seed), "shuffle") * 2**32)


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
    """Up to `max_batches` batches of windows spread evenly over the whole split.

    Spread, not the first windows: a split starts with a few documents (the first 32 x 16 x 128
    tokens of the built-in validation split lie in 4 of its 23 files, 0.08-0.12 nats easier for
    cpu_scaling's models than the whole split), so the first windows measure those documents. The
    windows are in stream order; when the cap covers the split, every window is used once.
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
    # Window k of the n taken is window floor(k * windows / n): distinct, first at 0, ascending.
    window_ids = np.arange(count * batch_size, dtype=np.int64) * windows // (count * batch_size)
    batches = []
    for b in range(count):
        ids = window_ids[b * batch_size:(b + 1) * batch_size]
        window = _windows(tokens.tokens, ids, seq_len)
        target_bytes = _windows(tokens.token_bytes, ids, seq_len)[:, 1:]
        batches.append({"inputs": window[:, :-1], "targets": window[:, 1:],
                        "target_bytes": target_bytes.astype(np.int32)})
    return batches
