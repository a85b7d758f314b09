"""The errors minipipe raises on purpose.

Every error a user can cause (a missing file, an unsupported config, a prompt that does not fit)
is a `MinipipeError`: the command line prints its message on one line and exits non-zero,
without a traceback. Anything else that escapes is a bug in minipipe.
"""


class MinipipeError(Exception):
    """Base class: a clear, one-line problem that the user can act on."""


class CheckpointError(MinipipeError):
    """A checkpoint directory is missing, incomplete or malformed."""


class UnsupportedConfigError(MinipipeError):
    """A config.json describes a model minipipe does not implement (refused by name)."""


class TokenizerError(MinipipeError):
    """A tokenizer file is missing or malformed, or text cannot be encoded."""


class InputError(MinipipeError):
    """Bad user input: a prompt longer than the context, token ids out of range, bad flags."""


class KVCacheError(MinipipeError):
    """A KV-cache rule was broken (e.g. two cells for one sequence at one position)."""
