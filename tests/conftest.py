"""Test set-up: 8 simulated CPU devices, so sharding tests run on any machine.

XLA reads the flag when the CPU backend starts, so it must be set before JAX is first used.
"""

import os

os.environ["XLA_FLAGS"] = " ".join(
    flag for flag in [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
    if flag
)

import jax  # noqa: E402  (after XLA_FLAGS on purpose)

# Float32 matmuls at full precision on every platform (GPUs default to TF32), so the numpy
# comparisons mean the same on a GPU host as on the CPU.
jax.config.update("jax_default_matmul_precision", "highest")
