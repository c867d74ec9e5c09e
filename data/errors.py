"""The data layer's errors: bad input (a corpus, a packed set, a mixture, a tokenizer, or the data config
naming them). Each message is the one line the user sees; anything else raised in data/ is a bug.

They derive from ValueError (and the "not found" ones from FileNotFoundError too), so callers that ask
for those still catch them.
"""

from __future__ import annotations


class DataError(ValueError):
    """Data keel cannot train on, or a data setting it cannot use."""


class DataNotFound(DataError, FileNotFoundError):
    """A corpus or packed set that is not where it was named."""


class TokenizerError(DataError):
    """A tokenizer keel cannot use."""


class TokenizerNotFound(TokenizerError, FileNotFoundError):
    """A tokenizer that is not where it was named."""
