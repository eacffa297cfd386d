"""Run configs: YAML, key=value overrides, clear errors before any compute."""

from pathlib import Path

import pytest
import yaml

from bitnet_jax.config import RunConfig, load_config, parse_override
from bitnet_jax.errors import ConfigError

# Run configs (sweep files, with `axes`, are checked in test_sweep.py).
EXPERIMENTS = [path for path in sorted((Path(__file__).resolve().parents[1] / "experiments")
                                       .glob("*.yaml"))
               if "axes" not in yaml.safe_load(path.read_text())]


def test_defaults_validate():
    config = load_config()
    assert isinstance(config, RunConfig)
    assert config.precision == "b1.58" and config.model.preset == "ladder-800k"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_shipped_experiment_configs_parse_and_validate(path):
    config = load_config(path)
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
        load_config(overrides=overrides)
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
