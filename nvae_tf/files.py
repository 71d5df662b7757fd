"""Writing files so that a kill, a full disk or an error never leaves half a file behind."""

import contextlib
import os
from collections.abc import Callable
from typing import IO


def write_atomically(path: str, write: Callable[[IO[str]], object]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the complete new one; on any failure the temporary file is
    removed and the error re-raised. Text mode without newline translation (CSV-safe).
    """
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
