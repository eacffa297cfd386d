"""bitnet-jax: scaling-law experiments on 1-bit (ternary) language models in JAX/Flax."""

__version__ = "0.1.0"
