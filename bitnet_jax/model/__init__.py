"""The decoder: layers, the Transformer and its config, the KV cache, and its accounting (parameters, FLOPs, energy, memory)."""
