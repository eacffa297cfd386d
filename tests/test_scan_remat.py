"""model.scan_layers and model.remat: the same numbers as the unrolled, keep-everything model;
checkpoints, run loading and generation work with either layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.config import load_config
from bitnet_jax.core.precision import get_recipe
from bitnet_jax.errors import ConfigError
from bitnet_jax.model import layer_stack
from bitnet_jax.model.transformer import Transformer, get_model_config
from bitnet_jax.train.loop import SCANNED_ON_CPU_WARNING, train
from bitnet_jax.train.metrics import read_jsonl

TOKENS = jnp.arange(2 * 16).reshape(2, 16) % 300
SMALL = ["model.preset=ladder-100k", "train.steps=6", "train.batch_size=8", "data.seq_len=32",
         "data.max_documents=30", "model.overrides.dtype=float32", "optimizer.warmup_steps=1", "train.eval_every=0",
         "train.eval_batches=1", "train.checkpoint_every=3", "train.log_every=1",
         "train.progress=false", "train.peak_flops=1e11", "logging.wandb=disabled"]


def unrolled_params(config, recipe):
    return nn.unbox(Transformer(config, recipe).init(jax.random.PRNGKey(0), TOKENS)["params"])


def test_stack_and_unstack_are_inverse_and_name_the_layers_axis():
    config = get_model_config("ladder-100k")
    params = unrolled_params(config, get_recipe("b1.58"))
    stacked = layer_stack.stack_layers(params)
    assert layer_stack.is_scanned(stacked) and layer_stack.layer_count(stacked) == 2
    assert stacked["layers"]["mlp"]["up_proj"]["kernel"].shape[0] == 2
    back = layer_stack.unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, back, params)
    abstract = jax.eval_shape(lambda: Transformer(config.replace(scan_layers=True)).init(
        jax.random.PRNGKey(0), TOKENS)["params"])
    spec = nn.get_partition_spec(abstract)["layers"]["mlp"]["up_proj"]["kernel"]
    assert tuple(spec)[0] == "layers"
    assert jax.tree.structure(nn.unbox(abstract)) == jax.tree.structure(stacked)


@pytest.mark.parametrize("precision", ["bf16", "b1.58"])
def test_scanned_model_computes_the_unrolled_logits(precision):
    config, recipe = get_model_config("ladder-100k", dtype="float32"), get_recipe(precision)
    params = unrolled_params(config, recipe)
    want = Transformer(config, recipe).apply({"params": params}, TOKENS)
    got = Transformer(config.replace(scan_layers=True), recipe).apply(
        {"params": layer_stack.stack_layers(params)}, TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["minimal", "dots", "full"])
@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_leave_the_gradients_unchanged(remat, scan):
    config, recipe = get_model_config("ladder-100k", dtype="float32"), get_recipe("b1.58")
    params = layer_stack.to_layout(unrolled_params(config, recipe), scan)

    def grads(model_config):
        model = Transformer(model_config.replace(scan_layers=scan), recipe)
        return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, TOKENS) ** 2))(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 grads(config.replace(remat=remat)), grads(config))


def test_unknown_remat_policy_is_one_clear_error():
    with pytest.raises(ConfigError, match="model.remat='some'.*minimal"):
        get_model_config("ladder-100k", remat="some")


def losses(run_dir):
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]


@pytest.mark.slow
def test_training_scanned_matches_unrolled_and_checkpoints_say_how_to_convert(tmp_path, capsys):
    unrolled = train(load_config(overrides=[f"out_dir={tmp_path}", "name=unrolled", *SMALL]),
                     devices=jax.devices()[:1])
    assert SCANNED_ON_CPU_WARNING not in capsys.readouterr().err
    scanned_config = load_config(overrides=[f"out_dir={tmp_path}", "name=scanned",
                                            "model.scan_layers=true", "model.remat=full", *SMALL])
    scanned = train(scanned_config, devices=jax.devices()[:1])
    assert unrolled["status"] == scanned["status"] == "completed"
    # On CPUs a scanned run says, once, that it is the slower layout there.
    assert capsys.readouterr().err.count(SCANNED_ON_CPU_WARNING) == 1
    # Scan only changes how XLA fuses: the first steps agree to the bit, then ternary rounding
    # amplifies last-bit differences (measured: 1.8e-5 relative by step 6 in float32).
    assert losses(tmp_path / "scanned")[:2] == losses(tmp_path / "unrolled")[:2]
    np.testing.assert_allclose(losses(tmp_path / "scanned"), losses(tmp_path / "unrolled"),
                               rtol=1e-4)

    # Resuming in the other layout fails with the way out.
    other = load_config(overrides=[f"out_dir={tmp_path}", "name=scanned", *SMALL,
                                   "train.steps=9"])
    with pytest.raises(ConfigError, match="model.scan_layers=true.*to_layout"):
        train(other, devices=jax.devices()[:1])

    # A scanned run loads (unrolled) for generation, export and packing.
    from bitnet_jax.infer.generate import make_generator
    from bitnet_jax.interop.load import load_model

    bundle = load_model(tmp_path / "scanned")
    assert not bundle.config.scan_layers and "layers_1" in bundle.params
    reference = load_model(tmp_path / "unrolled")
    np.testing.assert_allclose(
        Transformer(bundle.config, bundle.recipe).apply({"params": bundle.params}, TOKENS),
        Transformer(reference.config, reference.recipe).apply({"params": reference.params},
                                                              TOKENS), rtol=0.05, atol=0.05)
    # And generation takes the scanned tree as it is (it unstacks for the KV cache).
    scanned_params = layer_stack.stack_layers(bundle.params)
    generator = make_generator(scanned_params, bundle.config.replace(scan_layers=True),
                               bundle.recipe, weights="float", dtype="float32")
    want = make_generator(bundle.params, bundle.config, bundle.recipe, weights="float",
                          dtype="float32")
    np.testing.assert_array_equal(generator.full_logits(TOKENS), want.full_logits(TOKENS))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_train_step_constrains_activations_on_the_mesh(tmp_path, scan):
    """The model's `nn.with_logical_constraint`s reach the compiled step: the residual stream
    and logits are split over the batch axes (flax drops them without rules and mesh in scope)."""
    from bitnet_jax.train import loop

    config = load_config(overrides=[f"out_dir={tmp_path}", "model.preset=ladder-100k",
                                    f"model.scan_layers={str(scan).lower()}", "data.seq_len=32",
                                    "train.batch_size=8", "mesh.data=2", "mesh.fsdp=4"])
    setup = loop.abstract_setup(config, jax.devices()[:8])
    train_step, _ = loop.compile_steps(setup, config.precision)
    batch = {key: jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=setup.batch_sharding)
             for key in ("inputs", "targets")}
    text = train_step.lower(setup.abstract_state, batch).as_text()
    constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
    assert len(constraints) >= 4, "no activation sharding constraints in the train step"
    assert all("data" in line and "fsdp" in line for line in constraints), constraints[:2]
