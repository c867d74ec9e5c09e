"""keel's errors by kind. Bad input is one line naming the problem and the fix; anything else is a bug
and shows its traceback.

Each layer raises its own kind of bad input, all ValueErrors:
- `ConfigError` (models.config): a setting keel cannot run with: the model's, the optimizer's, the run's;
- `DataError` (data.errors): a corpus, a packed set, a mixture, the data config; `TokenizerError` for a
  tokenizer; `data.sources.InputError` for what the packer reads (all three DataErrors);
- `CheckpointError` (pretrain.checkpoint): a damaged, forged, incompatible or unwritable checkpoint.
An OSError of the storage (no space, a file-size limit, no rights) is no bug either: `pretrain.run` makes
it a one-line ConfigError naming the cause and the path.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from data.errors import DataError
from models.config import ConfigError
from pretrain.checkpoint.errors import CheckpointError

BAD_INPUT = (ConfigError, DataError, CheckpointError)
DEBUG = "KEEL_DEBUG"  # set: bad input shows its traceback too


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextmanager
def bad_input_is_one_line(program: str = "keel"):
    """Inside the block, bad input ends the process with `PROGRAM: error: LINE` on stderr and exit code 2;
    any other exception passes through with its traceback."""
    try:
        yield
    except BAD_INPUT as e:
        if os.environ.get(DEBUG):
            raise
        print(f"{program}: error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


def require_extra(module: str, extra: str):
    """`module` imported, or a one-line ConfigError naming the optional extra that installs it (keel's core
    install leaves out what only some runs use: lm-evaluation-harness, W&B)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{module} is not installed ({one_line(e)}); install keel's {extra} extra: "
                          f"pip install -e '.[{extra}]'") from None
