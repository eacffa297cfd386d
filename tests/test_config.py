"""Run configs: YAML, key=value overrides, clear errors before any compute."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bitnet_jax.config import RunConfig, load_config, parse_override
from bitnet_jax.core.precision import get_recipe
from bitnet_jax.errors import ConfigError
from bitnet_jax.model.resolve import resolve_run
from bitnet_jax.model.transformer import get_model_config

ROOT = Path(__file__).resolve().parents[1]

# Run configs (sweep files, with `axes`, are checked in test_sweep.py).
EXPERIMENTS = [path for path in sorted((Path(__file__).resolve().parents[1] / "experiments")
                                       .glob("*.yaml"))
               if "axes" not in yaml.safe_load(path.read_text())]


def test_defaults_validate():
    config = resolve_run(load_config()).config
    assert isinstance(config, RunConfig)
    assert config.precision == "b1.58" and config.model.preset == "ladder-800k"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiment_configs_parse_and_validate(path):
    config = resolve_run(load_config(path)).config
    assert config.train.steps > 0


def test_overrides_and_types():
    config = load_config(overrides=["train.steps=20", "optimizer.warmup_steps=2", "precision=bf16", "model.d_model=96",
                                    "optimizer.lr=3e-3", "mesh.rules=[[batch, data]]",
                                    "optimizer.clip_norm=null"])
    assert config.train.steps == 20 and config.precision == "bf16"
    assert config.model.overrides == {"d_model": 96}
    assert config.optimizer.lr == 3e-3 and config.optimizer.clip_norm is None
    assert config.mesh.rules == [["batch", "data"]]
    assert parse_override("data.paths=[a.txt, b.txt]") == ("data.paths", ["a.txt", "b.txt"])


@pytest.mark.parametrize("override,message", [
    ("train.stepz=5", "did you mean 'steps'"),
    ("trian.steps=5", "did you mean 'train'"),
    ("model.d_modle=64", "did you mean 'd_model'"),
    ("train.steps=ten", "train.steps: expected an integer, got 'ten'"),
    ("train.integer_forward=maybe", "expected true or false"),
    ("train.int8_backward=true", "train.int8_backward=true needs train.integer_forward=true"),
    ("optimizer.lr=fast", "optimizer.lr: expected a number"),
    ("precision=b1.59", "unknown precision recipe 'b1.59'"),
    ("model.preset=ladder-9m", "unknown model preset 'ladder-9m'"),
    ("data.source=web", "data.source='web'; choose one of builtin, files, hf, tokens"),
    ("data.source=files", "data.source='files' needs data.paths"),
    ("train.batch_size=10", "not divisible by train.grad_accum=4"),
    ("data.seq_len=4096", "exceeds the model's max_seq_len"),
    ("mesh.data=0", "mesh.data must be positive or -1"),
])
def test_bad_configs_fail_with_one_clear_message(override, message):
    overrides = [override] + (["train.grad_accum=4"] if "batch_size" in override else [])
    with pytest.raises(ConfigError) as info:
        resolve_run(load_config(overrides=overrides))  # names resolve with the model
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.steps"])


def test_a_resolved_run_holds_the_model_config_and_recipes_of_its_names():
    config = load_config(overrides=["precision=a4.8", "train.stage1_precision=b1.58",
                                    "model.ffn_activation=relu2", "model.d_model=96"])
    run = resolve_run(config)
    assert run.config is config
    assert run.model == get_model_config("ladder-800k", ffn_activation="relu2", d_model=96)
    assert run.recipe == get_recipe("a4.8") and run.stage1_recipe == get_recipe("b1.58")
    assert run.recipes == {"b1.58": get_recipe("b1.58"), "a4.8": get_recipe("a4.8")}
    assert resolve_run(run) is run  # resolved once, passed on as it is
    plain = resolve_run(load_config())
    assert plain.stage1_recipe is None and list(plain.recipes) == ["b1.58"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plain.recipe = get_recipe("bf16")


def test_group_sizes_are_checked_against_the_model_when_resolving():
    config = load_config(overrides=["precision=b1.58@g48"])  # 48 does not divide d_model=128
    with pytest.raises(ConfigError, match="group size 48 does not divide"):
        resolve_run(config)


def test_reading_a_config_imports_no_model_and_no_jax():
    code = ("import sys; from bitnet_jax.config import load_config; "
            "load_config(overrides=['train.steps=5', 'optimizer.warmup_steps=1']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'jax' "
            "or m.startswith(('bitnet_jax.model', 'bitnet_jax.core'))))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
