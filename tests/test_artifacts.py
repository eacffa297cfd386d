import flax.linen as nn
import jax
import numpy as np
import pytest

from bitnet_jax import run_files
from bitnet_jax.interop import run_dir as artifacts
from bitnet_jax.interop.load import load_model
from bitnet_jax.train.checkpoint import Checkpointer
from bitnet_jax.config import load_config
from bitnet_jax.errors import ConfigError
from bitnet_jax.model.transformer import get_model_config, init_params
from bitnet_jax.core.precision import get_recipe


def bundle(tokenizer="bytes"):
    config = get_model_config("ladder-50k")
    params = nn.unbox(init_params(config, get_recipe("b1.58"), jax.random.PRNGKey(3)))
    return artifacts.ModelBundle(config, "b1.58", params, tokenizer)


def test_saved_run_loads_back_and_configures_training_from_itself(tmp_path):
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text("{}")
    saved = bundle(str(tokenizer))
    out = artifacts.save_run(saved, tmp_path / "run", source="test")
    loaded = load_model(out)
    assert loaded.config == saved.config and loaded.precision == "b1.58"
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded.params, saved.params))
    assert loaded.tokenizer == str(out / "tokenizer.json")  # copied in with the run
    config = load_config(out / "config.yaml")
    assert config.model.preset is None and config.init_from == str(out)
    assert get_model_config(None, **config.model.overrides) == saved.config


def test_saving_over_a_run_needs_overwrite(tmp_path):
    artifacts.save_run(bundle(), tmp_path / "run")
    with pytest.raises(ConfigError, match="not empty"):
        artifacts.save_run(bundle(), tmp_path / "run")
    artifacts.save_run(bundle(), tmp_path / "run", overwrite=True)


def test_fresh_directory_keeps_a_tokenizer_that_lives_in_the_replaced_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "tokenizer.json").write_text('{"kept": 1}')
    (out / "stale.bin").write_text("x")
    directory, tokenizer = artifacts.fresh_directory(out, True, str(out))  # a directory works
    assert sorted(p.name for p in directory.iterdir()) == ["tokenizer.json"]
    assert tokenizer == str(out / "tokenizer.json")
    assert (out / "tokenizer.json").read_text() == '{"kept": 1}'
    assert artifacts.fresh_directory(tmp_path / "other", False) == (tmp_path / "other", "bytes")
    with pytest.raises(ConfigError, match="not a file"):
        artifacts.fresh_directory(tmp_path / "third", False, str(tmp_path / "missing.json"))


def test_unknown_directories_and_incomplete_configs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="holds no model"):
        load_model(tmp_path)
    with pytest.raises(ConfigError, match="missing"):
        get_model_config(None, vocab_size=320, d_model=64)


def test_a_saved_run_has_the_layout_of_a_trained_run(tmp_path):
    out = artifacts.save_run(bundle(), tmp_path / "run", source="test")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [run_files.CONFIG_FILE, run_files.META_FILE, run_files.CHECKPOINT_DIR])
    checkpointer = Checkpointer(out / run_files.CHECKPOINT_DIR, keep=1)  # the trainer's reader
    assert checkpointer.latest_step() == 0
    assert checkpointer.restore_meta(0) == {"tokenizer": "bytes", "source": "test"}
    checkpointer.close()
    run = artifacts.read_resolved_run(out)
    assert run.model == bundle().config and run.recipe.name == "b1.58"
