"""Tests for bitnet_jax.data: corpora, tokenizers, packing, host sharding and iterator state."""

from __future__ import annotations

import json
import sysconfig
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bitnet_jax.data import corpus as corpora
from bitnet_jax.data import pipeline, tokenizers
from bitnet_jax.config import DataConfig
from bitnet_jax.errors import ConfigError

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Grüße aus Köln — naïve café, 東京 and emoji 🙂!",
         "def f(x):\n    return x * 2\n",
         "short",
         "Pack my box with five dozen liquor jugs. " * 3]


def corpus_of(docs: list[str]) -> corpora.Corpus:
    return corpora.Corpus("test", list(docs), [], {})


def split_of(docs: list[str], tokenizer=None) -> pipeline.TokenizedSplit:
    return pipeline.tokenize_split(docs, tokenizer or tokenizers.ByteTokenizer())


def numbered_split(num_tokens: int) -> pipeline.TokenizedSplit:
    """A stream whose token i is i: a window is identified by its first token."""
    tokens = np.arange(num_tokens, dtype=np.int32)
    return pipeline.TokenizedSplit(tokens, np.ones(num_tokens, np.int32), 1)


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


# ----------------------------------------------------------------------------------------------
# Built-in corpus.

@pytest.fixture(scope="module")
def builtin() -> corpora.Corpus:
    return corpora.load_corpus(DataConfig(source="builtin", validation_fraction=0.05))


def test_builtin_files_sorted_filtered_deterministic():
    files = corpora.builtin_corpus_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100
    assert files == corpora.builtin_corpus_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel)
    assert all(r.endswith(".py") for r in rel)
    for excluded in ("site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"):
        assert not any(excluded in r.split("/")[:-1] for r in rel), excluded
    assert "os.py" in rel and "json/decoder.py" in rel


def test_builtin_split_by_file(builtin):
    files = corpora.builtin_corpus_files()
    assert builtin.train and builtin.validation
    assert builtin.name.startswith("builtin:python")
    n = len(builtin.train) + len(builtin.validation)
    assert n == len(files)
    assert builtin.stats["validation"]["files"] == len(builtin.validation)
    assert abs(len(builtin.validation) / n - 0.05) < 0.01
    # Files are documents: every document is a whole file, in exactly one split.
    contents = {f.read_bytes().decode("utf-8", "replace") for f in files}
    assert set(builtin.train) <= contents and set(builtin.validation) <= contents
    assert not set(builtin.train) & set(builtin.validation)
    for split in ("train", "validation"):
        docs = getattr(builtin, split)
        assert builtin.stats[split]["documents"] == len(docs)
        assert builtin.stats[split]["bytes"] == sum(len(d.encode()) for d in docs)


def test_builtin_deterministic_and_max_documents(builtin):
    again = corpora.load_corpus(DataConfig(source="builtin", validation_fraction=0.05))
    assert again.train == builtin.train and again.validation == builtin.validation
    small = corpora.load_corpus(DataConfig(source="builtin", max_documents=40,
                                        validation_fraction=0.1))
    assert len(small.train) + len(small.validation) == 40
    assert len(small.validation) == 4
    assert set(small.train) <= set(builtin.train) | set(builtin.validation)
    tiny = corpora.load_corpus(DataConfig(source="builtin", max_documents=3,
                                       validation_fraction=0.01))
    assert len(tiny.validation) == 1  # at least one file when the fraction is positive
    none = corpora.load_corpus(DataConfig(source="builtin", max_documents=10,
                                       validation_fraction=0.0))
    assert len(none.train) == 10 and none.validation == []


def test_validation_mask_is_stable_when_items_are_added():
    keys = [f"file{i}.py" for i in range(200)]
    before = dict(zip(keys, corpora.validation_mask(keys, 0.1)))
    after = dict(zip(keys + ["new.py"], corpora.validation_mask(keys + ["new.py"], 0.1)))
    assert sum(before.values()) == 20
    moved = [k for k in keys if before[k] != after[k]]
    assert len(moved) <= 1
    # Duplicates share a split, so a repeated document cannot be both trained on and evaluated.
    docs = [f"doc {i % 50}" for i in range(200)]
    mask = corpora.validation_mask(docs, 0.1)
    assert 0 < mask.sum() < 200
    assert all(len({bool(m) for d, m in zip(docs, mask) if d == key}) == 1 for key in set(docs))


# ----------------------------------------------------------------------------------------------
# Files, HF and token sources.

@pytest.fixture
def text_files(tmp_path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text(TEXTS[0])
    (tmp_path / "b.txt").write_text(TEXTS[1])
    (tmp_path / "empty.txt").write_text("")
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS[2:])] + [""]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    pq.write_table(pa.table({"text": [f"parquet row {i}" for i in range(6)],
                             "n": list(range(6))}), tmp_path / "d.parquet")
    return tmp_path


def test_files_source_txt_jsonl_parquet(text_files: Path):
    cfg = DataConfig(source="files", paths=[str(text_files / "*.txt"),
                                            str(text_files / "c.jsonl"),
                                            str(text_files / "d.parquet")],
                     validation_fraction=0.2)
    corpus = corpora.load_corpus(cfg)
    docs = corpus.train + corpus.validation
    expected = TEXTS + [f"parquet row {i}" for i in range(6)]
    assert sorted(docs) == sorted(expected)  # the empty .txt is dropped
    assert len(corpus.validation) == 2
    assert corpus.stats["files"] == 5
    assert corpus.stats["train"]["bytes"] == sum(len(d.encode()) for d in corpus.train)
    assert corpora.load_corpus(cfg).validation == corpus.validation
    # A directory expands to its supported files; max_documents caps what is read, in order.
    capped = corpora.load_corpus(replace(cfg, paths=[str(text_files)], max_documents=4,
                                      validation_fraction=0.0))
    assert capped.train == [TEXTS[0], TEXTS[1], TEXTS[2], TEXTS[3]]


def test_files_source_errors(text_files: Path, tmp_path: Path):
    def load(**kw):
        return corpora.load_corpus(DataConfig(source="files", **kw))

    with pytest.raises(ConfigError, match=r"nope\.txt.*does not exist"):
        load(paths=[str(tmp_path / "nope.txt")])
    with pytest.raises(ConfigError, match=r"\*\.xyz.*matches no files"):
        load(paths=[str(tmp_path / "*.xyz")])
    with pytest.raises(ConfigError, match="corpus is empty"):
        load(paths=[str(text_files / "empty.txt")])
    with pytest.raises(ConfigError, match=r"data\.text_field='body'.*columns: text, n"):
        load(paths=[str(text_files / "d.parquet")], text_field="body")
    with pytest.raises(ConfigError, match=r"c\.jsonl:1: no field data\.text_field='body'.*'id'"):
        load(paths=[str(text_files / "c.jsonl")], text_field="body")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ConfigError, match=r"unsupported suffix '\.csv'"):
        load(paths=[str(tmp_path / "x.csv")])
    with pytest.raises(ConfigError, match=r"data\.source='nope' is unknown"):
        corpora.load_corpus(DataConfig(source="nope"))


def test_hf_source_offline(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": [f"document number {i} " * (i + 1) for i in range(20)],
            "label": list(range(20))}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "saved"))
    corpus = corpora.load_corpus(DataConfig(source="hf", hf_path=str(tmp_path / "saved"),
                                         validation_fraction=0.1))
    assert sorted(corpus.train + corpus.validation) == sorted(rows["text"])
    assert len(corpus.validation) == 2
    capped = corpora.load_corpus(DataConfig(source="hf", hf_path=str(tmp_path / "saved"),
                                         max_documents=5, validation_fraction=0.0))
    assert capped.train == rows["text"][:5]
    with pytest.raises(ConfigError, match=r"text_field='body'.*columns: text, label"):
        corpora.load_corpus(DataConfig(source="hf", hf_path=str(tmp_path / "saved"),
                                    text_field="body"))
    # A local directory of data files (not a saved dataset) goes through `load_dataset`.
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "rows.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS))
    from_files = corpora.load_corpus(DataConfig(source="hf", hf_path=str(tmp_path / "raw"),
                                             validation_fraction=0.0))
    assert from_files.train == TEXTS
    assert from_files.name == f"hf:{tmp_path / 'raw'}:train"


def test_hf_source_errors():
    pytest.importorskip("datasets")
    with pytest.raises(ConfigError, match=r"data\.hf_path='/no/such/dataset'.*cannot be loaded"):
        corpora.load_corpus(DataConfig(source="hf", hf_path="/no/such/dataset"))


def test_tokens_source_npy_and_bin(tmp_path: Path):
    stream = np.arange(1000, dtype=np.int32) % 257
    np.save(tmp_path / "a.npy", stream[:600])
    stream[600:].astype("<u2").tofile(tmp_path / "b.bin")
    corpus = corpora.load_corpus(DataConfig(source="tokens", paths=[str(tmp_path / "a.npy"),
                                                                 str(tmp_path / "b.bin")],
                                         validation_fraction=0.1))
    assert corpus.is_tokenized and corpus.train == []
    np.testing.assert_array_equal(corpus.train_tokens, stream[:900])
    np.testing.assert_array_equal(corpus.validation_tokens, stream[900:])
    assert corpus.train_tokens.dtype == np.int32
    assert corpus.stats["train"]["tokens"] == 900 and corpus.stats["files"] == 2
    train, validation, stats = pipeline.prepare_data(
        DataConfig(source="tokens", paths=[str(tmp_path / "*.npy"), str(tmp_path / "*.bin")],
                   validation_fraction=0.1), tokenizers.ByteTokenizer())
    assert train.documents == int((stream[:900] == 256).sum()) == 3
    assert stats["validation"]["tokens"] == 100
    np.testing.assert_array_equal(train.token_bytes, (stream[:900] < 256).astype(np.int32))
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ConfigError, match="not a whole number of uint16"):
        corpora.load_corpus(DataConfig(source="tokens", paths=[str(tmp_path / "odd.bin")]))
    np.save(tmp_path / "big.npy", np.array([5, 300], np.int32))
    with pytest.raises(ConfigError, match="id 300, beyond data.tokenizer='bytes'"):
        pipeline.prepare_data(DataConfig(source="tokens", paths=[str(tmp_path / "big.npy")],
                                     validation_fraction=0.0), tokenizers.ByteTokenizer())


# ----------------------------------------------------------------------------------------------
# Tokenizers.

def test_byte_tokenizer_round_trip_and_bytes():
    tok = tokenizers.load_tokenizer("bytes")
    assert (tok.vocab_size, tok.eod_id, tok.name) == (257, 256, "bytes")
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.max() < 256
        assert tok.decode(ids) == text
        assert len(ids) == len(text.encode())
    np.testing.assert_array_equal(tok.token_bytes([0, 255, 256, 65]), [1, 1, 0, 1])
    assert tok.decode([104, 105, 256, 33]) == "hi!"


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory) -> Path:
    docs = TEXTS * 30 + [f"line {i}: the value is {i * i}\n" for i in range(300)]
    out = tmp_path_factory.mktemp("tok")
    return tokenizers.train_bpe(corpus_of(docs), 400, out)


def test_train_bpe_and_load(bpe_path: Path):
    assert bpe_path.name == "tokenizer.json" and bpe_path.is_file()
    tok = tokenizers.load_tokenizer(str(bpe_path))
    assert tok.vocab_size == 400
    assert tok.eod_id == tok._tokenizer.token_to_id("<|endoftext|>")
    assert tokenizers.load_tokenizer(str(bpe_path.parent)).vocab_size == 400  # a directory works too
    for text in TEXTS + ["unseen: Ωmega ∑ 𝔘nicode\ttabs  and  spaces"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        # Exact bits per byte: every UTF-8 byte is counted once, however BPE merged them.
        assert int(tok.token_bytes(ids).sum()) == len(text.encode("utf-8"))
    assert len(tok.encode(TEXTS[0] * 3)) < len(TEXTS[0] * 3)  # merges happened
    assert tok.token_bytes([tok.eod_id])[0] == 0


def test_tokenizer_errors(tmp_path: Path, bpe_path: Path):
    with pytest.raises(ConfigError, match=r"data\.tokenizer='missing\.json': no such file"):
        tokenizers.load_tokenizer("missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable tokenizer.json"):
        tokenizers.load_tokenizer(str(tmp_path / "bad.json"))
    spec = json.loads(bpe_path.read_text())
    spec["added_tokens"] = []
    spec["model"]["vocab"].pop("<|endoftext|>")
    (tmp_path / "no_eod.json").write_text(json.dumps(spec))
    with pytest.raises(ConfigError, match="no end-of-document token"):
        tokenizers.load_tokenizer(str(tmp_path / "no_eod.json"))
    with pytest.raises(ConfigError, match="at least 257"):
        tokenizers.train_bpe(corpus_of(TEXTS), 100, tmp_path)


def test_tokenize_split_joins_with_eod(bpe_path: Path):
    for tok in (tokenizers.ByteTokenizer(), tokenizers.load_tokenizer(str(bpe_path))):
        split = pipeline.tokenize_split(TEXTS, tok)
        assert split.tokens.dtype == np.int32 and split.token_bytes.dtype == np.int32
        assert split.documents == len(TEXTS)
        eods = np.flatnonzero(split.tokens == tok.eod_id)
        assert len(eods) == len(TEXTS) and eods[-1] == len(split) - 1
        pieces = np.split(split.tokens, eods + 1)[:-1]
        assert [tok.decode(p[:-1]) for p in pieces] == TEXTS
        assert split.bytes == sum(len(t.encode()) for t in TEXTS)
        assert split.max_token_id == int(split.tokens.max()) < tok.vocab_size


def test_prepare_data_stats(text_files: Path):
    cfg = DataConfig(source="files", paths=[str(text_files / "*.txt"),
                                            str(text_files / "*.jsonl")],
                     validation_fraction=0.2)
    train, validation, stats = pipeline.prepare_data(cfg, tokenizers.ByteTokenizer())
    assert stats["tokenizer"] == "bytes" and stats["corpus"].startswith("files:")
    assert stats["train"]["tokens"] == len(train)
    assert stats["train"]["documents"] == train.documents
    assert stats["train"]["bytes"] == stats["train"]["token_bytes"] == train.bytes
    assert train.documents + validation.documents == len(TEXTS)


# ----------------------------------------------------------------------------------------------
# Packing, shuffling, host sharding.

def test_train_batches_shift_and_windows():
    split = numbered_split(4001)  # 400 windows of 10
    it = pipeline.make_train_iterator(split, seq_len=10, batch_size=8, seed=0)
    batches = take(it, 50)  # exactly one epoch of 400 windows
    for batch in batches:
        assert set(batch) == {"inputs", "targets"}
        assert batch["inputs"].shape == batch["targets"].shape == (8, 10)
        assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        np.testing.assert_array_equal(batch["targets"][:, -1], batch["inputs"][:, -1] + 1)
    starts = np.concatenate([b["inputs"][:, 0] for b in batches])
    # Non-overlapping windows stepping by seq_len: one epoch visits each start exactly once.
    windows = np.arange(400) * 10
    assert sorted(starts.tolist()) == sorted(windows.tolist())
    assert not np.array_equal(starts, windows)  # shuffled
    # The next epoch is a different permutation of the same windows.
    next_epoch = np.concatenate([b["inputs"][:, 0] for b in take(it, 50)])
    assert sorted(next_epoch.tolist()) == sorted(windows.tolist())
    assert not np.array_equal(next_epoch, starts)


def test_packed_stream_has_eod_between_documents():
    docs = ["aaaa", "bbbbbb", "cc"]
    split = split_of(docs)
    batches = pipeline.make_eval_batches(split, seq_len=3, batch_size=1, max_batches=100)
    assert len(batches) == 4  # 15 tokens -> (15 - 1) // 3 windows
    # Consecutive windows tile the stream: inputs, then the final target.
    stream = np.concatenate([b["inputs"][0] for b in batches] + [batches[-1]["targets"][0, -1:]])
    expected = np.array(list(b"aaaa") + [256] + list(b"bbbbbb") + [256] + list(b"cc") + [256])
    np.testing.assert_array_equal(stream, expected[:13])
    np.testing.assert_array_equal(split.tokens, expected)


def test_shuffle_deterministic_per_seed():
    split = numbered_split(2001)

    def firsts(seed: int) -> np.ndarray:
        it = pipeline.make_train_iterator(split, seq_len=10, batch_size=4, seed=seed)
        return np.stack([b["inputs"] for b in take(it, 10)])

    np.testing.assert_array_equal(firsts(1), firsts(1))
    assert not np.array_equal(firsts(1), firsts(2))
    # Grain shuffles epoch e with seed + e; hashed seeds keep seed 1 from replaying seed 0's
    # second epoch.
    it0 = pipeline.make_train_iterator(split, seq_len=10, batch_size=4, seed=0)
    second_epoch_of_0 = np.stack([b["inputs"] for b in take(it0, 100)[50:60]])
    assert not np.array_equal(second_epoch_of_0, firsts(1))


def test_host_split_is_a_partition_of_the_global_batch():
    split = numbered_split(3001)
    single = take(pipeline.make_train_iterator(split, 10, batch_size=8, seed=3), 12)
    hosts = [take(pipeline.make_train_iterator(split, 10, batch_size=4, seed=3,
                                           process_index=h, process_count=2), 12)
             for h in range(2)]
    for step in range(12):
        rows = [hosts[h][step]["inputs"] for h in range(2)]
        # Host h holds rows h*B..(h+1)*B of the single-host global batch.
        np.testing.assert_array_equal(np.concatenate(rows), single[step]["inputs"])
        assert not set(rows[0][:, 0].tolist()) & set(rows[1][:, 0].tolist())


def test_train_iterator_errors():
    with pytest.raises(ConfigError, match="fewer than one global batch of 16"):
        pipeline.make_train_iterator(numbered_split(101), 10, batch_size=8, seed=0, process_count=2)
    with pytest.raises(ConfigError, match="process_index=2"):
        pipeline.make_train_iterator(numbered_split(1001), 10, 4, 0, process_index=2,
                                 process_count=2)


# ----------------------------------------------------------------------------------------------
# Iterator state.

def test_iterator_state_resumes_exactly():
    split = numbered_split(2001)
    it = pipeline.make_train_iterator(split, seq_len=16, batch_size=4, seed=5)
    take(it, 7)
    state = it.get_state()
    json.dumps(state)  # a JSON-able dict, which is how grain's orbax handler stores it
    expected = take(it, 5)
    fresh = pipeline.make_train_iterator(split, seq_len=16, batch_size=4, seed=5)
    fresh.set_state(state)
    assert_same_batches(take(fresh, 5), expected)
    # Across an epoch boundary (31 windows of 4 per epoch -> 7 batches per epoch) as well.
    take(it, 20)
    state = it.get_state()
    fresh.set_state(state)
    assert_same_batches(take(fresh, 9), take(it, 9))


def test_iterator_state_through_orbax(tmp_path: Path):
    ocp = pytest.importorskip("orbax.checkpoint")
    split = numbered_split(2001)
    it = pipeline.make_train_iterator(split, seq_len=16, batch_size=4, seed=5)
    take(it, 7)
    options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        manager.save(7, args=ocp.args.Composite(
            data=pipeline.iterator_checkpoint_args(it, save=True)))
        manager.wait_until_finished()
    expected = take(it, 5)

    fresh = pipeline.make_train_iterator(split, seq_len=16, batch_size=4, seed=5)
    take(fresh, 2)  # a position that the restore must overwrite
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        assert manager.latest_step() == 7
        restored = manager.restore(7, args=ocp.args.Composite(
            data=pipeline.iterator_checkpoint_args(fresh, save=False)))
    assert restored["data"] is fresh
    assert_same_batches(take(fresh, 5), expected)


@pytest.mark.slow
def test_iterator_with_worker_processes_matches_in_process():
    split = numbered_split(2001)
    reference = take(pipeline.make_train_iterator(split, 16, 4, seed=5), 12)
    it = pipeline.make_train_iterator(split, 16, 4, seed=5, num_workers=2)
    try:
        assert_same_batches(take(it, 7), reference[:7])
        state = it.get_state()
        assert_same_batches(take(it, 5), reference[7:])
    finally:
        it.close()
    fresh = pipeline.make_train_iterator(split, 16, 4, seed=5, num_workers=2)
    try:
        fresh.set_state(state)
        assert_same_batches(take(fresh, 5), reference[7:])
    finally:
        fresh.close()


# ----------------------------------------------------------------------------------------------
# Evaluation batches.

def test_eval_batches_deterministic_with_target_bytes(bpe_path: Path):
    tok = tokenizers.load_tokenizer(str(bpe_path))
    split = split_of(TEXTS * 10, tok)
    batches = pipeline.make_eval_batches(split, seq_len=8, batch_size=3, max_batches=4)
    assert len(batches) == 4
    assert_same_batches(batches, pipeline.make_eval_batches(split, 8, 3, 4))
    # 12 windows spread over the split's windows, in stream order, from window 0.
    windows = pipeline.num_windows(len(split), 8)
    ids = np.arange(12) * windows // 12
    starts = np.concatenate([b["inputs"][:, 0] for b in batches])
    np.testing.assert_array_equal(starts, split.tokens[ids * 8])
    assert ids[-1] >= windows - windows // 12 - 1  # the last window is near the split's end
    for batch, batch_ids in zip(batches, ids.reshape(4, 3)):
        for row, i in zip(batch["inputs"], batch_ids):
            np.testing.assert_array_equal(row, split.tokens[i * 8:i * 8 + 8])
    for batch in batches:
        assert set(batch) == {"inputs", "targets", "target_bytes"}
        assert batch["target_bytes"].shape == (3, 8) and batch["target_bytes"].dtype == np.int32
        np.testing.assert_array_equal(batch["target_bytes"], tok.token_bytes(batch["targets"]))
        assert np.all(batch["target_bytes"][batch["targets"] == tok.eod_id] == 0)
    # max_batches is a cap: a short split gives what it has.
    assert len(pipeline.make_eval_batches(split, 8, 3, 10_000)) == (len(split) - 1) // 8 // 3


def test_eval_batches_error_when_too_small():
    split = split_of(["tiny"])  # 5 tokens
    with pytest.raises(ConfigError, match=r"has 5 tokens.*needs 33.*data\.seq_len"):
        pipeline.make_eval_batches(split, seq_len=8, batch_size=4, max_batches=2)
