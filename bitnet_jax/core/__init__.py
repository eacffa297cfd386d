"""The numerics every recipe shares: quantizers, precision recipes, ternary packing and the CPU integer kernels."""
