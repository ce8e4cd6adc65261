"""The one exception type for bad data input.

Every user-fixable problem (a missing path, an empty corpus, a shard written with another
tokenizer, a truncated shard...) raises ``DataError`` with one message that names the file
and the fix, so the CLI and the trainer can print it without a traceback.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad data input; the message names the offending file and how to fix it."""
