"""Generation with the KV cache, and sampling."""
