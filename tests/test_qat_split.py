"""When to quantize, as an axis: `train.qat_start_fraction` trains in bf16 first, switches to the
run's recipe at that fraction of the steps keeping the optimizer state, and a run killed after
the switch resumes exactly."""

import jax
import pytest

from bitnet_jax.config import load_config
from bitnet_jax.errors import ConfigError
from bitnet_jax.model.resolve import resolve_run
from bitnet_jax.train import loop, sharding
from bitnet_jax.train.metrics import read_jsonl

SMALL = ["model.preset=ladder-50k", "train.steps=12", "train.batch_size=8", "data.seq_len=64",
         "data.max_documents=40", "optimizer.warmup_steps=2", "train.eval_every=0",
         "train.eval_batches=2", "train.checkpoint_every=4", "train.log_every=1",
         "train.progress=false", "train.peak_flops=1e11", "logging.wandb=disabled",
         "name=run", "optimizer.schedule=cosine"]


def config(out_dir, *overrides):
    return load_config(overrides=[f"out_dir={out_dir}", *SMALL, *overrides])


def losses(out_dir):
    return [r["loss"] for r in read_jsonl(out_dir / "run" / "metrics.jsonl")
            if r["kind"] == "train"]


@pytest.fixture
def precision_log(monkeypatch):
    """The recipe of every train step the trainer runs, in order."""
    log = []
    real = loop.compile_steps

    def spying(setup, precision):
        train_step, eval_step = real(setup, precision)

        def step(*args, **kwargs):
            log.append(precision)
            return train_step(*args, **kwargs)

        return step, eval_step

    monkeypatch.setattr(loop, "compile_steps", spying)
    return log


def test_split_is_bf16_then_the_recipe_and_one_rule_with_a4_8():
    run = resolve_run(config("/tmp/unused", "precision=b1.58", "train.qat_start_fraction=0.9"))
    assert run.config.train.first_stage() == ("bf16", 0.9)
    assert set(run.recipes) == {"bf16", "b1.58"}
    a48 = config("/tmp/unused", "precision=a4.8", "train.stage1_precision=b1.58")
    assert a48.train.first_stage() == ("b1.58", 0.95)  # the a4.8 stage, unchanged
    assert config("/tmp/unused").train.first_stage()[0] is None
    with pytest.raises(ConfigError, match="qat_start_fraction"):
        resolve_run(config("/tmp/unused", "train.qat_start_fraction=1.0"))
    with pytest.raises(ConfigError, match="set one of them"):
        resolve_run(config("/tmp/unused", "precision=a4.8", "train.stage1_precision=b1.58",
                           "train.qat_start_fraction=0.5"))


@pytest.mark.slow
def test_split_switches_at_its_step_and_resumes_exactly_after_a_kill(tmp_path, precision_log,
                                                                     monkeypatch):
    devices = jax.devices()[:1]
    split = ("precision=b1.58", "train.qat_start_fraction=0.5")
    reference = loop.train(config(tmp_path / "ref", *split), devices=devices)
    assert reference["status"] == "completed"
    assert precision_log == ["bf16"] * 6 + ["b1.58"] * 6  # 0.5 of 12 steps
    expected = losses(tmp_path / "ref")

    # The first half is a bf16 run: same init, data and schedule give the same losses.
    loop.train(config(tmp_path / "bf16", "precision=bf16"), devices=devices)
    assert losses(tmp_path / "bf16")[:6] == expected[:6]
    assert losses(tmp_path / "bf16")[6:] != expected[6:]

    # Killed at step 9, after the switch (step 6) and the step-8 checkpoint: resumes exactly.
    calls = {"n": 0}
    real = sharding.global_batch_from_host

    def crash_on_tenth_batch(batch, batch_sharding):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("simulated crash")
        return real(batch, batch_sharding)

    monkeypatch.setattr(sharding, "global_batch_from_host", crash_on_tenth_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        loop.train(config(tmp_path / "crash", *split), devices=devices)
    monkeypatch.setattr(sharding, "global_batch_from_host", real)
    assert losses(tmp_path / "crash") == expected[:9]
    precision_log.clear()
    resumed = loop.train(config(tmp_path / "crash", *split), devices=devices)
    assert resumed["status"] == "completed"
    assert precision_log == ["b1.58"] * 4  # steps 8-11, from the step-8 checkpoint
    assert losses(tmp_path / "crash") == expected
