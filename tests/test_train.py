"""Training runs end to end on the built-in corpus: loss falls, sharding and resumption are exact,
and bad input fails before any compute."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bitnet_jax import allocator
from bitnet_jax.data import corpus as corpora
from bitnet_jax.data import tokenizers
from bitnet_jax.train import sharding
from bitnet_jax.config import load_config
from bitnet_jax.errors import ConfigError
from bitnet_jax.train.metrics import read_jsonl
from bitnet_jax.train.loop import TrainingDiverged, build, init_state, train

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["model.preset=ladder-50k", "train.steps=12", "train.batch_size=8", "data.seq_len=64",
         "data.max_documents=40", "optimizer.warmup_steps=2", "train.eval_every=0",
         "train.eval_batches=2", "train.checkpoint_every=4", "train.log_every=1",
         "train.progress=false", "train.peak_flops=1e11", "logging.wandb=disabled"]


def small(tmp_path, *overrides):
    return load_config(overrides=[f"out_dir={tmp_path}", *SMALL, *overrides])


def run(config, devices=None):
    """Train on one device unless told otherwise (the 8 simulated ones are for sharding tests)."""
    return train(config, devices=devices or jax.devices()[:1])


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("precision,extra", [
    ("bf16", ["optimizer.schedule=cosine", "optimizer.lr=3e-3", "logging.wandb=offline"]),
    ("b1.58", []),
    ("a4.8", ["model.ffn_activation=relu2", "train.stage1_precision=b1.58",
              "train.stage1_fraction=0.7"]),
])
def test_loss_falls_on_the_builtin_corpus(tmp_path, precision, extra):
    config = small(tmp_path, f"precision={precision}", "train.steps=40", "train.eval_every=20",
                   "optimizer.lr=4e-3", "optimizer.warmup_steps=4", *extra)
    summary = run(config)
    assert summary["status"] == "completed" and summary["step"] == 40
    run_dir = tmp_path / summary["run"]
    losses = train_losses(run_dir)
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
    evals = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["eval_bpb"] == pytest.approx(summary["eval_bpb"])
    assert written["compute"]["params"]["total"] > 0
    assert written["data"]["train"]["tokens"] > 0
    assert (run_dir / "config.yaml").exists()
    # the pytest process never restarts itself, so glibc's malloc, or a preload of the caller's
    assert json.loads((run_dir / "meta.json").read_text())["malloc"] in (
        "system", *allocator.KNOWN_ALLOCATORS)
    if "logging.wandb=offline" in extra:
        assert (run_dir / "wandb").is_dir()


@pytest.mark.parametrize("precision,rtol", [("bf16", 2e-6), ("b1.58", 2e-4)])
def test_sharded_training_equals_single_device(tmp_path, precision, rtol):
    """Same losses on 1 device and on a (data=2, fsdp=2, tensor=2) mesh of 8.

    Sharded reductions add in another order; in float32 that moves losses by ulps (bf16 recipe).
    Ternary weights amplify it a little: a mean |W| that moves by an ulp can flip the rounding
    of a weight sitting on a .5 boundary, hence the looser tolerance for b1.58.
    """
    base = ["model.dtype=float32", "train.steps=10", "train.checkpoint_every=0",
            f"precision={precision}"]
    single = run(small(tmp_path / "one", *base, "mesh.data=1"), devices=jax.devices()[:1])
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    config = small(tmp_path / "eight", *base, *mesh)
    sharded = train(config, devices=jax.devices()[:8])
    one = train_losses(tmp_path / "one" / single["run"])
    eight = train_losses(tmp_path / "eight" / sharded["run"])
    np.testing.assert_allclose(eight, one, rtol=rtol)
    # Parameters really are split: each device holds a quarter of an MLP kernel.
    setup = build(config, jax.devices()[:8])
    kernel = init_state(setup).params["layers_0"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == P("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2, kernel.shape[1] // 2)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    base = ["model.dtype=float32", "train.steps=4", "train.checkpoint_every=0"]
    whole = run(small(tmp_path / "a", *base))
    accumulated = run(small(tmp_path / "b", *base, "train.grad_accum=4"))
    np.testing.assert_allclose(train_losses(tmp_path / "b" / accumulated["run"]),
                               train_losses(tmp_path / "a" / whole["run"]), rtol=1e-5)


def test_resumed_run_continues_exactly(tmp_path, monkeypatch):
    reference = run(small(tmp_path / "ref", "name=run"))
    expected = train_losses(tmp_path / "ref" / "run")

    calls = {"n": 0}
    real = sharding.global_batch_from_host

    def crash_on_seventh_batch(batch, batch_sharding):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("simulated crash")
        return real(batch, batch_sharding)

    monkeypatch.setattr(sharding, "global_batch_from_host", crash_on_seventh_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(small(tmp_path / "crash", "name=run"))
    monkeypatch.setattr(sharding, "global_batch_from_host", real)
    assert train_losses(tmp_path / "crash" / "run") == expected[:6]
    resumed = run(small(tmp_path / "crash", "name=run"))  # restarts from the step-4 checkpoint
    assert resumed["status"] == "completed" and reference["status"] == "completed"
    assert train_losses(tmp_path / "crash" / "run") == expected


def _cli(out_dir, *extra):
    args = [f"out_dir={out_dir}", *SMALL, "name=run", "train.steps=30", "train.checkpoint_every=3",
            *extra]
    return [sys.executable, "-m", "bitnet_jax.cli", "train", *args]


def _run_until_checkpoint(out_dir, step, sig):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    proc = subprocess.Popen(_cli(out_dir), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    target = out_dir / "run" / "checkpoints" / str(step)
    deadline = time.time() + 240
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_subprocess_resumes_exactly(tmp_path, sig):
    reference = run(load_config(overrides=_cli(tmp_path / "ref")[4:]))
    expected = train_losses(tmp_path / "ref" / "run")
    assert reference["status"] == "completed"

    returncode, stderr = _run_until_checkpoint(tmp_path / "killed", 6, sig)
    if sig == signal.SIGKILL:
        assert returncode == -signal.SIGKILL
    else:  # checkpoint at the next step boundary, then a clean exit that says how to resume
        assert returncode == 130 and "resume" in stderr, stderr
        summary = json.loads((tmp_path / "killed" / "run" / "summary.json").read_text())
        assert summary["status"] == "interrupted"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    done = subprocess.run(_cli(tmp_path / "killed"), env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed" in done.stdout
    assert train_losses(tmp_path / "killed" / "run") == expected


def test_nan_guard_names_step_and_checkpoint(tmp_path):
    config = small(tmp_path, "optimizer.lr=1e30", "optimizer.clip_norm=null",
                   "optimizer.warmup_steps=1", "train.checkpoint_every=1", "precision=bf16")
    with pytest.raises(TrainingDiverged, match=r"at step \d+; last good checkpoint: step \d+"):
        run(config)
    summaries = list(tmp_path.glob("*/summary.json"))
    assert json.loads(summaries[0].read_text())["status"] == "diverged"


# ----------------------------------------------------------------- errors before compute

def test_batch_the_mesh_does_not_divide(tmp_path):
    config = small(tmp_path, "train.batch_size=4", "mesh.data=8")
    with pytest.raises(ConfigError, match="not divisible by the 8 ways"):
        build(config, jax.devices()[:8])


def test_mesh_that_does_not_use_the_devices(tmp_path):
    with pytest.raises(ConfigError, match="there are 8 devices"):
        build(small(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=1"), jax.devices()[:8])


def test_missing_data_path(tmp_path):
    config = small(tmp_path, "data.source=files", f"data.paths=[{tmp_path}/nope/*.txt]")
    with pytest.raises(ConfigError, match="nope"):
        run(config)


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    config = small(tmp_path, "data.source=files", f"data.paths=[{tmp_path}/empty.txt]")
    with pytest.raises(ConfigError, match="(?i)empty"):
        run(config)


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    corpus = corpora.load_corpus(small(tmp_path).data)
    path = tokenizers.train_bpe(corpus, 400, tmp_path / "bpe400.json")
    with pytest.raises(ConfigError, match="model.vocab_size >= "):
        build(small(tmp_path, f"data.tokenizer={path}"))


def test_resuming_with_another_tokenizer_is_refused(tmp_path):
    run(small(tmp_path, "name=run", "train.steps=4"))
    corpus = corpora.load_corpus(small(tmp_path).data)
    path = tokenizers.train_bpe(corpus, 300, tmp_path / "bpe300.json")
    with pytest.raises(ConfigError, match="checkpoint was made with tokenizer="):
        run(small(tmp_path, "name=run", "train.steps=4", f"data.tokenizer={path}"))
