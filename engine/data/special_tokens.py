"""The special tokens every run's token stream is built with: documents end with EOT, batches pad with
PAD. Their own module so that the tokenizer wrappers (biogpt_tokenizer, role_tokenizer) and vocab,
which loads them, share the names without importing each other."""
from __future__ import annotations

EOT = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOT, PAD]
