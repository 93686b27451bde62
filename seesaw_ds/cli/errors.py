"""How the command line reports a configuration that cannot run: one line naming the value and the fix, exit 2."""
from __future__ import annotations

import sys


EXIT_CONFIG = 2


class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line naming the value and the fix."""


def fail(message: str, code: int = EXIT_CONFIG) -> None:
    """Print one line to stderr and exit (no traceback)."""
    print(f"seesaw_ds: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def one_line_error(error: BaseException) -> str:
    """One line out of Hydra's and OmegaConf's multi-line errors: what failed, why, and what is valid."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    message = lines[0].rstrip(".") if lines else type(error).__name__
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        message += ": " + str(cause).strip().splitlines()[0]
    if "Available options in" in str(error):
        options = [line for line in lines if "Available options" not in line and "Config search path" not in line
                   and not line.startswith("provider=")][1:]
        message += f"; available: {', '.join(options)}"
    if "not in '" in message:
        message += " (every key and its meaning: seesaw_ds/config.py)"
    return message
