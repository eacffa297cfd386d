"""Corpora, tokenizers and the packed-sequence input pipeline."""
