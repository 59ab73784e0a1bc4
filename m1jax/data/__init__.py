"""Data: the embedded reasoning-task corpus, tokenizers, and packing."""
