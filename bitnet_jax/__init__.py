"""bitnet-jax: scaling-law experiments on 1-bit (ternary) language models in JAX/Flax.

The package follows the path of the main job (see README's module table):

    core/      quantizers, precision recipes, ternary codec, CPU integer kernels
    model/     layers, the Transformer, KV cache, accounting
    data/      corpora, tokenizers, the input pipeline
    train/     steps, loop, optimiser, sharding, checkpoints, metrics
    scaling/   sweeps, launchers, results, laws, reports
    infer/     generation and sampling
    interop/   run directories, Hugging Face, packed checkpoints

The most used names are importable from here (`from bitnet_jax import BitLinear, get_recipe,
Transformer`). They load on first use, so `import bitnet_jax` (and the CLI's start) stays free of
JAX until a model is needed.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BitLinear": "bitnet_jax.model.layers",
    "RMSNorm": "bitnet_jax.model.layers",
    "Transformer": "bitnet_jax.model.transformer",
    "ModelConfig": "bitnet_jax.model.transformer",
    "get_model_config": "bitnet_jax.model.transformer",
    "PrecisionRecipe": "bitnet_jax.core.precision",
    "get_recipe": "bitnet_jax.core.precision",
    "RunConfig": "bitnet_jax.config",
    "load_config": "bitnet_jax.config",
    "ConfigError": "bitnet_jax.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    # PEP 562 lazy attribute: the import happens when a name is first asked for.
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bitnet_jax' has no attribute {name!r}")
